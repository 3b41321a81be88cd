"""The mark of a checkpoint directory a run is still writing (or was interrupted writing).

`inlaid quantize` and `inlaid quantize-add` write it before they change anything in their
output directory and remove it once the checkpoint there is complete; every loader (the
engine's, `quantize-add --checkpoint`, the server's config check) refuses a marked
directory. Torch-free: the coordinator checks a configured checkpoint with it at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

# Written before a run (`quantize`, `quantize-add`) changes anything in its output directory and
# removed once the checkpoint there is complete: a run killed part-way (a --restart over a
# finished checkpoint included) leaves a directory every loader refuses as unfinished.
UNFINISHED_FILE = "UNFINISHED"


def mark_unfinished(out_dir: Path, command: str) -> None:
    """Mark `out_dir` as being written by `inlaid <command>` (atomically: a rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = out_dir / (UNFINISHED_FILE + ".tmp")
    temporary.write_text(f"an `inlaid {command}` run writing this checkpoint has not finished (it is running, or "
                         "was interrupted): rerun the same command to resume it, or add --restart to start over\n")
    temporary.replace(out_dir / UNFINISHED_FILE)


def mark_finished(out_dir: Path) -> None:
    """The checkpoint in `out_dir` is complete: drop the mark of mark_unfinished, once the files
    of the checkpoint (its Hessian state too; `.partial/` was synced as it was written) are on
    disk. Without the fsyncs a power loss could keep the mark's removal and lose the files'
    last writes: a checkpoint read as finished with a truncated weights or metadata file."""
    out_dir = Path(out_dir)
    for directory, subdirectories, files in os.walk(out_dir):
        subdirectories[:] = [name for name in subdirectories if name != ".partial"]  # synced as written
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                sync_file(Path(directory) / name)
        sync_file(Path(directory))
    (out_dir / UNFINISHED_FILE).unlink(missing_ok=True)
    sync_file(out_dir)


def sync_file(path: Path) -> None:
    """fsync a file's data, or a directory's entries (a rename or removal in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def unfinished_problem(checkpoint_dir: Path) -> str | None:
    """Why `checkpoint_dir` must not be loaded (a run writing it has not finished), or None."""
    path = Path(checkpoint_dir) / UNFINISHED_FILE
    if not path.is_file():
        return None
    try:
        note = path.read_text(errors="replace").strip().splitlines()[0]
    except (OSError, IndexError):
        note = "a run writing this checkpoint has not finished"
    return f"{checkpoint_dir} is an unfinished checkpoint ({UNFINISHED_FILE}): {note}"
