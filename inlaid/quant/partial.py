"""A run's per-layer results on disk (`<out>/.partial/`), so a killed run resumes.

After each decoder layer its packed tensors, per-linear errors and task weights are written
to `layer_NNN.safetensors` (atomically: a temporary file, then a rename); `run.json` holds
the fingerprint of what the run computes. A later run with the same fingerprint continues
at the first missing layer: the finished layers' weights are written back into the model
(`write_dequantized`) and the streams re-run through them. Another fingerprint is refused
unless the caller asks to restart. While a run goes on (and after one was interrupted) the
directory carries unfinished.UNFINISHED_FILE, written before anything else changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from inlaid.cli_args import safetensors_problem
from inlaid.quant.checkpoint import unpack_linear
from inlaid.quant.errors import CheckpointError
from inlaid.quant.model_io import LINEAR_NAMES, plain_linear
from inlaid.quant.spec import QuantSpec
from inlaid.quant.unfinished import sync_file

PARTIAL_DIR = ".partial"


def partial_path(out_dir: Path, layer_index: int) -> Path:
    return Path(out_dir) / PARTIAL_DIR / f"layer_{layer_index:03d}.safetensors"


def finished_with_other_settings(out_dir: Path, differing: list[str] | None = None) -> str:
    """The refusal of a run whose inputs differ from those of the finished checkpoint in
    `out_dir` (by its `.partial/run.json`, or its metadata's fingerprint once that is gone);
    `differing` names what differs where run.json recorded it."""
    what = "; ".join(differing) if differing else "model, tasks, method or flags"
    return (f"{out_dir} holds a finished checkpoint made with other settings ({what}); "
            "pass --restart to overwrite it or choose another --out")


def prepare_partial_dir(out_dir: Path, fingerprint: str, resume: bool, command: str = "quantize",
                        discard: tuple[str, ...] = (), settings: dict | None = None) -> int:
    """Check or start the partial directory; return how many leading layers are done.

    Whatever goes on, `out_dir` is marked unfinished (unfinished.mark_unfinished) before
    anything in it changes, so a run killed part-way, a restart over a finished checkpoint
    included, leaves a directory the loaders refuse. A fresh start (no partial run, or not
    `resume`) also removes the earlier run's layers and `discard` (paths under `out_dir`:
    the Hessian state an earlier run left) before this run writes its own. `settings` (what
    the fingerprint hashes, readable) goes to run.json: a refused resume names what differs."""
    from inlaid.quant.checkpoint import METADATA_FILE
    from inlaid.quant.run_support import settings_differences
    from inlaid.quant.unfinished import mark_unfinished, unfinished_problem

    out_dir = Path(out_dir)
    partial = out_dir / PARTIAL_DIR
    run_file = partial / "run.json"
    if resume and partial.is_dir() and run_file.is_file():
        run = read_run_record(out_dir)
        recorded = run.get("fingerprint")
        if recorded == fingerprint:
            mark_unfinished(out_dir, command)
            done = 0
            # A layer file torn by a crash (no header, cut short) is computed again, with the
            # layers after it: each rerun failed on it, and only --restart (all layers) got out.
            while partial_path(out_dir, done).is_file() and not safetensors_problem(partial_path(out_dir, done)):
                done += 1
            return done
        differing = settings_differences(run.get("settings"), settings or {}) if settings else []
        if (out_dir / METADATA_FILE).is_file() and not unfinished_problem(out_dir):
            raise CheckpointError(finished_with_other_settings(out_dir, differing))
        what = f" ({'; '.join(differing)})" if differing else ""
        raise CheckpointError(
            f"{out_dir} holds an unfinished partial run with other settings{what}; rerun its command to resume "
            "it, pass --restart to discard it or choose another --out"
        )
    mark_unfinished(out_dir, command)
    if partial.is_dir():
        for stale in partial.glob("layer_*.safetensors"):
            stale.unlink()
        run_file.unlink(missing_ok=True)
    for name in discard:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    partial.mkdir(parents=True, exist_ok=True)
    temporary = run_file.with_suffix(".tmp")
    record = {"fingerprint": fingerprint, "command": command, **({"settings": settings} if settings else {})}
    temporary.write_text(json.dumps(record))
    temporary.replace(run_file)
    return 0


def read_run_record(out_dir: Path) -> dict:
    """`<out_dir>/.partial/run.json` (what the partial run computes), or CheckpointError naming
    it where it is damaged: a bare JSONDecodeError named no file."""
    run_file = Path(out_dir) / PARTIAL_DIR / "run.json"
    try:
        run = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        run = error
    if not isinstance(run, dict):
        why = f": {run}" if isinstance(run, Exception) else " (not a JSON object)"
        raise CheckpointError(f"{run_file} is damaged{why}; pass --restart to start over, or choose another --out")
    return run


def save_partial_layer(out_dir: Path, layer_index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically (a temporary file, synced, then renamed) and durably (the rename synced)."""
    path = partial_path(out_dir, layer_index)
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"inlaid": json.dumps(meta)})
    sync_file(temporary)
    temporary.replace(path)
    sync_file(path.parent)


def load_partial_layer(out_dir: Path, layer_index: int) -> tuple[dict[str, torch.Tensor], dict]:
    path = partial_path(out_dir, layer_index)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            meta = json.loads((handle.metadata() or {}).get("inlaid", "{}"))
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}, a finished layer of the interrupted run, cannot be read ({error}); "
                              "pass --restart to start over") from None
    return tensors, meta


def write_dequantized(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec) -> None:
    """Put a finished layer's quantized weights (its packed tensors) back into the model."""
    from inlaid.kernels.dispatch import QuantLinearWeights

    for linear_name in LINEAR_NAMES:
        key = f"{prefix}.{linear_name}"
        linear = plain_linear(layer, linear_name)
        weights = QuantLinearWeights(
            qweight=tensors[key + ".qweight"], qzeros=tensors[key + ".qzeros"], scales=tensors[key + ".scales"],
            g_idx=tensors[key + ".g_idx"], bits=spec.bits, group_size=spec.effective_group_size(linear.in_features),
            in_features=linear.in_features, out_features=linear.out_features,
        )
        with torch.no_grad():  # a versioned write: the packed copy follows (model_io.onednn_linears)
            linear.weight.copy_(unpack_linear(weights).dequantize(linear.weight.dtype))
