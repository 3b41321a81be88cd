"""Where the Hessian state's files are and which tasks each holds, read from the safetensors
header alone. Torch-free: the coordinator (a torch-free process) reads it to know which removed
tasks the stored state still holds (`inlaid/serve/state_gc.py`), the requantizer to know which
stored tasks a job may aggregate (`incremental_tasks.py`)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

# A safetensors header is at most this long (safetensors' own limit): a larger length field is
# a damaged file, not a reason to read gigabytes.
MAX_HEADER_BYTES = 100_000_000


def layer_state_path(state_dir: Path, layer_index: int) -> Path:
    return Path(state_dir) / f"layer_{layer_index:03d}.safetensors"


def read_state_groups(path: Path) -> dict[str, set[str]]:
    """group -> tasks of one layer's state file (`state.save_layer_state`'s "entries"
    metadata). ValueError (or OSError) when the file is no safetensors file."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a header of {length} bytes")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is no JSON object")
    entries = json.loads((header.get("__metadata__") or {}).get("entries", "{}"))
    groups: dict[str, set[str]] = {}
    for entry in entries.values():
        groups.setdefault(str(entry["group"]), set()).add(str(entry["task"]))
    return groups


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
