"""How a training run's files reach the disk (`inlaid train-adapter`, train.py): checkpoints
saved whole and swapped in by renames, the finished adapter's files renamed into place with
its record last, and what a kill left of a save settled at the next run.

`<out>/checkpoint/` holds the adapter, the optimizer and the step of one moment; a save is
written into `checkpoint.new/` first, the checkpoint it replaces renamed `checkpoint.old/`
meanwhile (three files written in place could hold two steps' state).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inlaid.file_modes import as_umask_allows
from inlaid.quant.unfinished import sync_file  # torch-free: the fsync the quantizer's saves use too

CHECKPOINT_DIR = "checkpoint"
# A save is written whole into STAGING_DIR, then swapped in: the checkpoint it replaces is
# renamed REPLACED_DIR meanwhile (three files written in place could hold two steps' state).
STAGING_DIR, REPLACED_DIR = CHECKPOINT_DIR + ".new", CHECKPOINT_DIR + ".old"
ADAPTER_STAGING_DIR = ".adapter.new"  # the finished adapter's files, before they are renamed into place
SAVE_DIRS = (CHECKPOINT_DIR, STAGING_DIR, REPLACED_DIR, ADAPTER_STAGING_DIR)
# What a save writes (PEFT's save_pretrained: README.md, the weights, then adapter_config.json).
_SAVED_FILES = {"README.md", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "state.json",
                "training.json", "losses.json"}


def cast_adapter_file(path: Path, dtype_name: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    dtype = getattr(torch, dtype_name)
    tensors = {name: tensor.to(dtype).contiguous() for name, tensor in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    as_umask_allows(path)


def kept_after_interrupt(out_dir: Path, steps: int) -> str:
    """What an interrupted run kept in `out_dir`, and how to go on (Ctrl-C said "interrupted"
    alone, though the rerun resumed from a kept checkpoint: an outside probe)."""
    settle_checkpoint(out_dir)  # a save the interrupt cut short
    try:
        step = int(json.loads((Path(out_dir) / CHECKPOINT_DIR / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no checkpoint was saved yet in {out_dir} (--save-every): a rerun starts from step 0"
    return (f"the checkpoint of step {step} of {steps} is kept in {Path(out_dir) / CHECKPOINT_DIR}: rerun the same "
            "command to resume from it, or add --restart to start over")


def settle_checkpoint(out_dir: Path) -> None:
    """Undo what a kill left of a save (`save_checkpoint`, `save_adapter`): a save cut short
    goes (the checkpoint before it stands), and a checkpoint renamed aside comes back where no
    new one took its place. Only directories holding a checkpoint's files are touched."""
    out = Path(out_dir)
    staging, replaced, checkpoint = out / STAGING_DIR, out / REPLACED_DIR, out / CHECKPOINT_DIR

    def ours(directory: Path) -> bool:  # empty, or nothing but files a save writes (a kill's leftovers)
        return directory.is_dir() and all(entry.is_file() and entry.name in _SAVED_FILES
                                          for entry in directory.iterdir())

    for cut_short in (staging, out / ADAPTER_STAGING_DIR):
        if ours(cut_short):
            shutil.rmtree(cut_short)
    if ours(replaced):
        if checkpoint.exists():
            shutil.rmtree(replaced)
        else:
            replaced.rename(checkpoint)


def save_checkpoint(model, optimizer, out_dir: Path, state: dict) -> None:
    """The adapter, the optimizer and the step of one moment, all or none: written into
    STAGING_DIR, then swapped for the checkpoint by renames. Written in place, a kill between
    the files resumed the weights of one step with the step count of the one before."""
    import torch

    staging, replaced, checkpoint = out_dir / STAGING_DIR, out_dir / REPLACED_DIR, out_dir / CHECKPOINT_DIR
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps(state))
    _sync_files(staging)  # on disk before the renames make it the checkpoint (a power loss)
    shutil.rmtree(replaced, ignore_errors=True)
    if checkpoint.exists():
        checkpoint.rename(replaced)
    staging.rename(checkpoint)
    shutil.rmtree(replaced, ignore_errors=True)


def save_adapter(model, out_dir: Path, save_dtype: str, records: dict[str, str]) -> None:
    """The finished adapter and its records (file name -> text) into `out_dir`, each file
    whole: written beside them first, then renamed over the old ones."""
    staging = out_dir / ADAPTER_STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    cast_adapter_file(staging / "adapter_model.safetensors", save_dtype)
    for name, text in records.items():
        (staging / name).write_text(text)
    _sync_files(staging)
    # training.json last, gone meanwhile: a kill between the renames left a new record beside
    # the old weights, which a rerun took for a finished run ("nothing rewritten").
    (out_dir / "training.json").unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == "training.json"):
        path.replace(out_dir / path.name)
    staging.rmdir()


def _sync_files(directory: Path) -> None:
    for path in directory.iterdir():
        sync_file(path)
