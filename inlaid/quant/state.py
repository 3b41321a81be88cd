"""The Hessian state kept beside a checkpoint: per layer, per input group, per task, the
token-average Hessian H_t and its token count — everything every aggregate needs, so a
later task addition only computes the new task's Hessians.

One safetensors file per decoder layer (`layer_007.safetensors`); each Hessian is stored as
its upper triangle (it is symmetric), fp32. The file's metadata maps tensor keys to
(group, task, tokens, features) and says which forward produced them ("adapter": each
task's adapter active; "base": adapters off, for gptq-mixed). An entry may also hold the
task's reference errors (`reference_errors`: linear -> relative error), which incremental
re-quantization's quality gate measures every later weight against.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from inlaid.quant.aggregate import TaskHessian
from inlaid.quant.errors import CheckpointError, QuantizationError
from inlaid.quant.hessian import symmetric_from_upper
from inlaid.quant.state_files import layer_state_path  # (re-exported: its callers import it from here)

LayerState = dict[str, dict[str, TaskHessian]]  # group -> task -> Hessian
# group -> task -> linear -> the task's reference relative error (incremental_linears.py)
References = dict[str, dict[str, dict[str, float]]]


@lru_cache(maxsize=8)
def _upper_triangle(features: int) -> torch.Tensor:
    """Boolean mask of the upper triangle (diagonal included), row-major: the stored order."""
    return torch.ones(features, features, dtype=torch.bool).triu_()


def save_layer_state(state_dir: Path, layer_index: int, state: LayerState, forward: str,
                     references: References | None = None) -> Path:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for group, per_task in state.items():
        for task, stat in per_task.items():
            features = stat.hessian.shape[0]
            key = f"h{len(entries)}"
            tensors[key] = stat.hessian.float()[_upper_triangle(features)]
            entries[key] = {"group": group, "task": task, "tokens": stat.tokens, "features": features}
            if reference := (references or {}).get(group, {}).get(task):
                entries[key]["reference_errors"] = reference
    path = layer_state_path(state_dir, layer_index)
    temporary = path.with_suffix(".tmp")
    try:
        save_file(tensors, str(temporary), metadata={"entries": json.dumps(entries), "forward": forward,
                                                      "layer": str(layer_index)})
        temporary.replace(path)
    except (SafetensorError, OSError) as error:
        # Named: a full disk failed a server's job with safetensors' "Error while serializing:
        # I/O error: No space left on device", which named no directory (an outside probe).
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise QuantizationError(f"the Hessian state of layer {layer_index} cannot be written in {state_dir}: "
                                f"{error}") from error
    return path


def load_layer_state(state_dir: Path, layer_index: int) -> tuple[LayerState, str]:
    """(group -> task -> TaskHessian, forward kind) of one layer."""
    path = layer_state_path(state_dir, layer_index)
    if not path.is_file():
        raise CheckpointError(f"no Hessian state for layer {layer_index} in {state_dir}")
    state: LayerState = {}
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        entries = json.loads(meta.get("entries", "{}"))
        for key, entry in entries.items():
            features = int(entry["features"])
            hessian = torch.zeros(features, features, dtype=torch.float32)
            hessian[_upper_triangle(features)] = handle.get_tensor(key)
            hessian = symmetric_from_upper(hessian)
            state.setdefault(entry["group"], {})[entry["task"]] = TaskHessian(hessian, int(entry["tokens"]))
    return state, meta.get("forward", "adapter")


def load_reference_errors(state_dir: Path, layer_index: int) -> References:
    """The reference errors one layer's state file holds (none in a full run's state, nor in
    one written before they were kept). A malformed value is left out: the gate then measures
    that task against its served error, as it did before references were kept."""
    with safe_open(str(layer_state_path(state_dir, layer_index)), framework="pt") as handle:
        entries = json.loads((handle.metadata() or {}).get("entries", "{}"))
    references: References = {}
    for entry in entries.values():
        stored = entry.get("reference_errors")
        if not isinstance(stored, dict):
            continue
        errors = {linear: float(value) for linear, value in stored.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")}
        references.setdefault(entry["group"], {})[entry["task"]] = errors
    return references
