"""The state directory's run-time garbage collection. Torch-free (the coordinator's).

Layer files: each job writes `quant/layers/layer_007.v<version>.safetensors`; a layer is
committed once every executor has swapped it in (registry.json). A file stops being needed
when a later commit supersedes it or when its job ends without committing it (cancelled,
failed, the requantizer lost mid-layer). Start-up collected those; a server that ran for
days under add/remove churn piled them up meanwhile (GBs on a 7B base). So the coordinator
collects them after every registry save, keeping (the invariant):

  (a) every file the registry names: the one just written equals the one in memory (the
      collection runs only after a save succeeded: while the registry is unsaved, the one on
      disk may still name a file the memory one dropped, and a restart would restore it);
  (b) every file of a version a job may still write or hand over: the queued and
      re-quantizing tasks' versions, a cancelled job's the requantizer may still be computing,
      and the version of a handed-over layer not yet committed (it may still be, whatever
      became of its job); temporaries (`.tmp`) carry their version too;
  (c) every file an executor is to restore from (a file swap queued for it). A file a later
      commit supersedes was read by every executor told to read it: an executor applies a
      plan's swaps in order (restores first) and answers each in order, and the commit
      waits for every executor's answer to the live swap, so any restore of the old file it
      was sent lies before that answer. (A restore that fails drops its layer from the
      registry: its file may then go while another executor's restore of it is on the way,
      which then fails too.)
  (d) every served file the sent job was named (`RequantizeJob.served_layers`), until that
      job ends: it reads each when it reaches its layer, minutes later, and a commit may
      supersede one meanwhile (a cancelled job's layer the executors answer late, a failed
      restore dropping an entry: a reviewer's sequences, where the job then failed).

Names that are not a job's layer files (or safetensors' temporaries, at start-up) are never
deleted, nor adapter and calibration names other than the copies' (nothing on a guess).
The adapter and calibration copies need no run-time collection: each is deleted once no task
uses it (`DynamicTasks._discard_if_unused`); start-up collects what an unsaved registry left.

`dropped` (registry.json): the tasks whose Hessians the stored state holds but no aggregate
may use any more (removed live, or whose job failed): each job is told to leave them out
(RequantizeJob.drop_tasks). Only a name the stored state still holds needs remembering:
`prune_dropped` forgets the others (but the name just removed, and a cancelled job's task
while it may still be computing: its set-up writes the task's costs before it reads the
cancel), so the list is bounded by the tasks the state holds.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

from inlaid.quant.checkpoint_files import read_inlaid_metadata
from inlaid.quant.errors import CheckpointError
from inlaid.quant.state_files import stored_cost_tasks, stored_layer_tasks

log = logging.getLogger("inlaid.dynamic_tasks")

# What the requantizer writes (`requantizer._save_layer`): the final file, and its temporary.
LAYER_FILE = re.compile(r"layer_\d+\.v(\d+)\.(?:safetensors|tmp)")
# safetensors' own temporary, written beside the file it becomes (`.tmp` + 6 characters).
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")
# The copies `TaskStore.copy_inputs` makes: `<task>.<10 hex>` (a directory) and its calibration
# `<task>.<10 hex>.jsonl`. Collection deletes these names only: anything else in the state
# directory was put there by someone else (an outside probe's config task kept in
# `adapters/`, and a user's notes, were deleted at a start).
ADAPTER_COPY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.[0-9a-f]{10}")
CALIBRATION_COPY = re.compile(ADAPTER_COPY.pattern + r"\.jsonl")


def layer_file_version(name: str) -> int | None:
    """The job version a layer file name carries (None: not a job's layer file)."""
    match = LAYER_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


def collect_layer_files(layers_dir: Path, keep: Collection[str], busy_versions: Collection[int] | None) -> tuple[int, int]:
    """Delete the job layer files of `layers_dir` not named in `keep` (file names); busy_versions
    None: at start-up, where no job runs, every other such file goes, and safetensors'
    temporaries; else a file goes only if it is of a version not in busy_versions. A name
    no job writes is never deleted. Returns (files, bytes) deleted."""
    count = size = 0
    for file in layers_dir.iterdir():
        if file.name in keep:
            continue
        version = layer_file_version(file.name)
        if busy_versions is None:
            if version is None and not SAFETENSORS_TEMPORARY.fullmatch(file.name):
                continue
        elif version is None or version in busy_versions:
            continue
        if (length := _delete(file, "a layer file")) is not None:
            count += 1
            size += length
    return count, size


def _delete(file: Path, what: str) -> int | None:
    """Unlink `file`; its size, or None where it is gone already or cannot be deleted (a
    read-only directory: logged, and the next collection tries again)."""
    try:
        length = file.lstat().st_size
        file.unlink()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning(f"{what} could not be deleted", extra={"file": str(file), "error": error.strerror})
        return None
    return length


# A Hessian state file's temporaries: `state.save_layer_state`'s own (`layer_007.tmp`,
# renamed into place) and the one safetensors writes first and renames (`.tmp` + 6
# characters): a requantizer killed mid-write left one of 67 MB, which no start collected
# (an outside probe).
HESSIAN_TEMPORARY = re.compile(r"layer_\d+\.tmp|" + SAFETENSORS_TEMPORARY.pattern)


def collect_copies(root: Path, live_adapters: Collection[str], live_calibrations: Collection[str]) -> int:
    """At start-up: delete the adapter and calibration copies (names of `ADAPTER_COPY` /
    `CALIBRATION_COPY`) in `root`'s adapters/ and calibration/ that no task uses. Returns
    how many adapter copies went."""
    copies = 0
    for directory in (root / "adapters").iterdir():
        if (directory.name not in live_adapters and ADAPTER_COPY.fullmatch(directory.name)
                and directory.is_dir() and not directory.is_symlink()):
            shutil.rmtree(directory, ignore_errors=True)
            copies += 1
    for file in (root / "calibration").iterdir():
        if file.name not in live_calibrations and CALIBRATION_COPY.fullmatch(file.name) and not file.is_dir():
            file.unlink(missing_ok=True)
    return copies


def collect_hessian_temporaries(hessian_dir: Path) -> tuple[int, int]:
    """At start-up (no job writes): delete the Hessian state's temporaries. Returns (files, bytes)."""
    count = size = 0
    for file in hessian_dir.iterdir():
        if HESSIAN_TEMPORARY.fullmatch(file.name) and file.is_file() and not file.is_symlink():
            if (length := _delete(file, "a Hessian state temporary")) is not None:
                count += 1
                size += length
    return count, size


def prune_dropped(dropped: list[str], state_dirs: list[Path], num_layers: int,
                  keep: Callable[[str], bool] = lambda name: False) -> list[str]:
    """`dropped` without the names the stored state does not hold (no layer's Hessians, each
    layer's the first of `state_dirs` holding it, as a job reads it; nor the raw costs, whose
    mean scales every task's weight) and for which keep(name) is not true. A state file that
    cannot be read keeps every name: nothing is forgotten on a guess."""
    try:
        held = stored_cost_tasks(state_dirs)
        for layer in range(num_layers):
            groups = stored_layer_tasks(state_dirs, layer)
            for tasks in (groups or {}).values():
                held |= tasks
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("the Hessian state cannot be read: the dropped tasks are all kept", extra={"error": str(error)})
        return dropped
    return [name for name in dropped if name in held or keep(name)]


def state_holds_task(name: str, state_dirs: list[Path], num_layers: int) -> bool:
    """Whether the stored state, as a job reads it, holds `name`'s Hessians in every input
    group of every layer, and its raw cost where the state keeps costs. A state that cannot
    be read: False."""
    try:
        costs = stored_cost_tasks(state_dirs)
        if costs and name not in costs:
            return False
        for layer in range(num_layers):
            groups = stored_layer_tasks(state_dirs, layer)
            if not groups or any(name not in tasks for tasks in groups.values()):
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def hessian_dirs(state_hessian_dir: Path, quantized_dir: str | None) -> list[Path] | None:
    """Where a job reads the stored Hessian state, first match wins (`requantization_jobs._job`,
    `IncrementalQuantizer`): the state directory's, then the checkpoint's. None when the
    checkpoint's metadata cannot be read (its state might hold any name)."""
    dirs = [state_hessian_dir]
    if not quantized_dir:
        return dirs
    try:
        metadata = read_inlaid_metadata(Path(quantized_dir))
    except CheckpointError:
        return None
    if metadata is None:  # no checkpoint of `inlaid quantize`: no job ever runs on it
        return dirs
    if metadata.get("hessian_state"):
        dirs.append(Path(quantized_dir) / str(metadata["hessian_state"]))
    return dirs
