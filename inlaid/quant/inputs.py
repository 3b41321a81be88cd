"""Checks of `inlaid quantize` / `quantize-add` inputs that run before the model loads.

Each refusal is one line naming the flag or file (QuantizationError): --model (a float model,
not a quantized checkpoint), --out (not inside --model, nor around it), the task names, every
adapter (the server's own check, `check_servable_adapter`), and every line of every calibration
file. Without them a bad input surfaced after the
model had loaded, some only after the first layer, as a PEFT KeyError, a 400-line
size-mismatch dump or a "calibration forward overflowed".
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from inlaid.quant.calibration import MAX_CALIBRATION_LINE_BYTES, CalibrationTask, check_calibration_file
from inlaid.quant.errors import CheckpointError, QuantizationError

# PEFT adapter names become module names, which may not hold '.': the server's rule
# (`check_task_name`) without the '.'.
_QUANT_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
# The quantizer runs every adapter through PEFT, not through the server's slot pool: no rank
# limit of its own (the server that serves the checkpoint checks its max_lora_rank).
_NO_RANK_LIMIT = 1 << 30


def model_dir_problem(model: Path | None, option: str = "--model") -> str | None:
    """Why `model` cannot be the float model to quantize, or None (None when not given: the
    default model). Beyond `cli_args.model_dir_problem` (a directory with a config.json): not a
    quantized checkpoint, which transformers could load only through optimum (a traceback,
    after an UNFINISHED --out had been written)."""
    from inlaid.cli_args import model_dir_problem as directory_problem

    problem = directory_problem(model)
    if problem or model is None:
        return problem
    model = Path(model).expanduser()
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{option} {model}: config.json cannot be read as JSON ({error})"
    if isinstance(config, dict) and config.get("quantization_config"):
        return (f"{option} {model} is a quantized checkpoint; {option} takes the float model it was made from "
                "(quantize-add adds tasks to a checkpoint)")
    return None


def out_overlaps_model_problem(out: Path, model: Path) -> str | None:
    """Why `out` may not take a run's output beside `model`, or None: the same directory, one
    inside it or one around it. Nested in the model, a run wrote UNFINISHED, .partial/ and its
    Hessian state into the model cache (`quantize-add` refuses the same for --checkpoint)."""
    from inlaid.cli_args import home_problem

    if problem := home_problem(Path(out), "--out") or home_problem(Path(model), "--model"):
        return problem
    out, model = Path(out).expanduser().resolve(), Path(model).expanduser().resolve()
    if out == model or model in out.parents or out in model.parents:
        return f"--out {out} overlaps the model {model}: write the checkpoint to a directory outside it"
    return None


def task_name_problem(name: str) -> str | None:
    """Why `name` cannot name a quantization task, or None."""
    from inlaid.serve.config import ConfigError, check_task_name

    if not _QUANT_TASK_NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"
        return (f"--task name {shown}: use 1-128 ASCII letters, digits, '-' or '_', starting with a letter, "
                "a digit or '_' (no '.': PEFT adapter names cannot hold one)")
    try:
        check_task_name(name)  # the server's rule too (reserved '__name__' forms)
    except ConfigError as error:
        return f"--task {error}"
    if problem := peft_name_problem(name):
        return f"--task name {name!r}: {problem}"
    return None


def peft_name_problem(name: str) -> str | None:
    """Why PEFT cannot load an adapter under the name `name`, or None. Its adapter names are
    keys of torch's ModuleDict / ParameterDict: no '.', and no attribute of theirs (`train`,
    `eval`, `keys`, `to`...), each refused with a KeyError once the quantizer loads it."""
    if "." in name:
        return "PEFT adapter names cannot hold a '.'"
    import torch

    if hasattr(torch.nn.ModuleDict(), name) or hasattr(torch.nn.ParameterDict(), name):
        return (f"PEFT cannot load an adapter named {name!r}: it is an attribute of torch's module containers, "
                "which hold PEFT's adapters by name")
    return None


def check_tasks(tasks: Iterable[CalibrationTask], model_dir: Path) -> None:
    """Names, adapters and calibration files of the tasks, each refusal one line."""
    from inlaid.engine.adapter_config import AdapterError
    from inlaid.engine.adapter_weights import check_servable_adapter
    from inlaid.engine.config import ModelConfig

    model = None
    seen: set[str] = set()
    for task in tasks:
        problem = task_name_problem(task.name)
        if problem:
            raise QuantizationError(problem)
        if task.name in seen:
            raise QuantizationError(f"--task {task.name!r} is given twice")
        seen.add(task.name)
        if task.adapter_dir is not None:
            if model is None:
                try:
                    model = ModelConfig.from_dir(model_dir)
                except Exception as error:  # the model's own loader says it again, later
                    raise QuantizationError(f"--model {model_dir}: {error}") from None
            try:
                check_servable_adapter(task.name, str(task.adapter_dir), model, _NO_RANK_LIMIT)
            except AdapterError as error:
                raise QuantizationError(f"--task {task.name}: {error}") from None
        # the server's bound on a sample: a 20 MB line read and tokenized whole took 20 GB
        check_calibration_file(task.calib_path, max_line_bytes=MAX_CALIBRATION_LINE_BYTES)


def finished_checkpoint_problem(out_dir: Path, fingerprint: str) -> str | None:
    """Why a `quantize` run with inputs `fingerprint` may not rewrite the finished checkpoint in
    `out_dir` without --restart, or None. While its `.partial/run.json` is there,
    prepare_partial_dir decides (None here); once it is gone (the suite build removes it, a
    user may), the fingerprint the metadata records decides: the same inputs are recomputed
    into it, other ones (or none recorded) refused. None also when `out_dir` holds no finished
    checkpoint."""
    from inlaid.quant.checkpoint_files import METADATA_FILE, read_inlaid_metadata
    from inlaid.quant.partial import PARTIAL_DIR, finished_with_other_settings
    from inlaid.quant.unfinished import unfinished_problem

    metadata_path = Path(out_dir) / METADATA_FILE
    if (Path(out_dir) / PARTIAL_DIR / "run.json").is_file() or not metadata_path.is_file() \
            or unfinished_problem(Path(out_dir)):
        return None  # a partial run (prepare_partial_dir decides) or no checkpoint
    try:
        metadata = read_inlaid_metadata(Path(out_dir)) or {}
    except CheckpointError:
        metadata = {}
    calibration = metadata.get("calibration")
    recorded = calibration.get("fingerprint") if isinstance(calibration, dict) else None
    # A checkpoint `quantize-add` wrote holds more than these inputs make, whatever it recorded
    # (before 2026-12-07 it kept its base's fingerprint).
    if recorded == fingerprint and "incremental" not in metadata:
        return None
    return finished_with_other_settings(out_dir)


@dataclass
class CreatedOutput:
    """What of an output directory a run is about to create, so that a run refused before its
    first layer (a checkpoint made with rtn or without Hessian state, a truncated weights
    file...) leaves none of it: its UNFINISHED and .partial/ otherwise made every later command
    to that --out "an unfinished run with other inputs", to be resumed by a command that can
    never succeed. Only what this run created goes: never a directory an earlier run left."""

    out: Path
    created_parents: list[Path]  # missing parents of `out` the run creates, nearest first
    out_created: bool  # `out` did not exist
    was_empty: bool  # `out` existed and was empty: what is in it at failure is this run's
    kept: bool = False  # set once the run has done work worth resuming (its first layer)

    @classmethod
    def before_run(cls, out: Path) -> CreatedOutput:
        out = Path(out).expanduser().absolute()
        missing_parents = [directory for directory in out.parents if not directory.exists()]
        was_empty = out.is_dir() and not any(out.iterdir())
        return cls(out=out, created_parents=missing_parents, out_created=not out.exists(), was_empty=was_empty)

    def remove(self) -> None:
        """Undo the run's output (unless `kept`): `out` if it created it, or what it wrote into
        an empty `out` (the directory itself stays: the user made it); then the parents it
        created, each only if empty (another run started beside it may be writing there)."""
        if self.kept:
            return
        if self.out_created:
            shutil.rmtree(self.out, ignore_errors=True)
            for parent in self.created_parents:
                try:
                    parent.rmdir()
                except OSError:  # not empty (another run's output), or gone
                    break
        elif self.was_empty and self.out.is_dir():
            for entry in self.out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


@contextmanager
def output_removed_unless_kept(out: Path) -> Iterator[CreatedOutput]:
    """Run the body; if it fails (an error: a refusal) or is interrupted (Ctrl-C) before
    setting `kept` on what it yields, remove what it created of `out` (CreatedOutput), then
    let the error go on. Before the first layer is kept nothing computed would be lost, and an
    UNFINISHED --out left behind made a corrected rerun (other settings) refuse it as "an
    unfinished partial run" (an outside probe); once a layer is kept, the same command resumes."""
    created = CreatedOutput.before_run(out)
    try:
        yield created
    except (Exception, KeyboardInterrupt):
        created.remove()
        raise
