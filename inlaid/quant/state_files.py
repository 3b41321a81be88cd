"""Where the Hessian state's files are and which tasks each holds, read from the safetensors
header alone. Torch-free: the coordinator (a torch-free process) reads it to know which removed
tasks the stored state still holds (`inlaid/serve/state_gc.py`), the requantizer to know which
stored tasks a job may aggregate (`incremental_tasks.py`)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from inlaid.quant.errors import CheckpointError

# A safetensors header is at most this long (safetensors' own limit): a larger length field is
# a damaged file, not a reason to read gigabytes.
MAX_HEADER_BYTES = 100_000_000


def layer_state_path(state_dir: Path, layer_index: int) -> Path:
    return Path(state_dir) / f"layer_{layer_index:03d}.safetensors"


def read_state_groups(path: Path) -> dict[str, set[str]]:
    """group -> tasks of one layer's state file (`state.save_layer_state`'s "entries"
    metadata). StateFileError naming the file when it is no such file (the JSON parser's bare
    "Expecting value" reached the user), OSError when unreadable."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise _corrupt(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise _corrupt(path, f"a header of {length} bytes")
        header_bytes = handle.read(length)
        size = os.fstat(handle.fileno()).st_size  # this file's: a job may replace the path meanwhile
    if len(header_bytes) != length:
        raise _corrupt(path, f"truncated: a header of {length} bytes, {len(header_bytes)} there")
    try:
        header = json.loads(header_bytes)
        entries = json.loads((header.get("__metadata__") or {}).get("entries", "{}"))
        groups: dict[str, set[str]] = {}
        for entry in entries.values():
            groups.setdefault(str(entry["group"]), set()).add(str(entry["task"]))
        data_bytes = max((int(tensor["data_offsets"][1]) for name, tensor in header.items()
                          if name != "__metadata__"), default=0)
    except (ValueError, RecursionError, AttributeError, TypeError, KeyError, IndexError) as error:
        raise _corrupt(path, f"its header does not read as Hessian state ({type(error).__name__}: {error})") from None
    # the tensors' bytes too (a cut past the header failed only when the job reached the layer)
    if size != 8 + length + data_bytes:
        raise _corrupt(path, f"{size} bytes where its header describes {8 + length + data_bytes}")
    return groups


class StateFileError(CheckpointError, ValueError):
    """A layer's Hessian state file does not read (a ValueError too, as the callers catch)."""


def _corrupt(path: Path, why: str) -> StateFileError:
    return StateFileError(f"{path}: {why}: the Hessian state file is corrupt; delete it if it is a server's "
                          "state (the checkpoint's copy of the layer is then read, without the tasks added live: "
                          "later jobs leave each out, a WARNING names it, until it is added again with its "
                          "calibration), else re-quantize the checkpoint fully")


def stored_layer_tasks(state_dirs: Iterable[Path], layer: int) -> dict[str, set[str]] | None:
    """group -> tasks of one layer's stored Hessian state, from the file's header only (the
    first directory holding the layer wins, as `IncrementalQuantizer.stored_state` reads it);
    None when no directory holds the layer."""
    for directory in state_dirs:
        path = layer_state_path(directory, layer)
        if path.is_file():
            return read_state_groups(path)
    return None


# task_costs.COSTS_FILE (that module imports torch; tests/test_state_dir_gc.py checks they agree).
COSTS_FILE = "task_costs.json"


def stored_cost_tasks(state_dirs: Iterable[Path]) -> set[str]:
    """The tasks of the raw costs a job reads (the first directory holding them, as
    `task_costs.load_raw_costs`); empty when none has them."""
    for directory in state_dirs:
        path = Path(directory) / COSTS_FILE
        if path.is_file():
            costs = json.loads(path.read_text())
            if not isinstance(costs, dict):
                raise ValueError(f"{path}: a JSON object was expected")
            return {str(name) for name in costs}
    return set()
