"""What an `add_task` brings: its files as checked and copied (`TaskInputs`), and the check
of its calibration file against the bounds the coordinator can afford."""

from __future__ import annotations

import filecmp
from dataclasses import dataclass
from pathlib import Path

from inlaid.engine.adapter_config import ADAPTER_FILES
from inlaid.protocol import ErrorCode, ReplacedConfigEntry
from inlaid.quant import calibration  # torch-free, as is all the coordinator imports
from inlaid.quant.calibration import MAX_CALIBRATION_LINE_BYTES
from inlaid.quant.errors import CalibrationDataError
from inlaid.serve.task_registry import TaskError

# Bounds on a calibration file at add_task. The coordinator checks it line by line, holding one
# line at a time; the line bound is the offline `inlaid quantize`'s too (quant/calibration.py:
# a 1 MB line cost the cost probe 5 GB before the probe took only max_tokens tokens of a
# sample). The file cap bounds the check's time and the copy.
MAX_CALIBRATION_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class TaskInputs:
    """An added task's files, checked (copied into the state directory if any), and what its addition did."""
    name: str
    adapter_dir: str
    calibration: str | None
    copied: bool
    signature: str | None = None  # the served files' (check_adapter's answer; None: taken at the add)
    # The name serves these very files now (a re-add), from `served_path`: the Hessians stored for it stay valid.
    serves_as_now: bool = False
    served_path: str | None = None
    # Where the name's stored Hessians came from, when from these files and samples (hessian_sources.py),
    # and the store as that was judged (`hessian_sources.stored_view`)
    hessians_from: str = ""
    stored_view: tuple[object, ...] | None = None
    copy_signature: str = ""  # with calibration samples: the adapter copy's signature and the samples' sha256
    calib_sha256: str = ""
    twin: str = ""  # another task whose stored Hessians came from the same files and samples
    # the checkpoint's Hessians for the name came from other adapter files (no record of it here)
    checkpoint_hessians_differ: bool = False
    # Set by `DynamicTasks.add` (the AdminReply says them): the name's stored Hessians left the aggregate;
    # the name served these very files already (nothing read again); the config entry it replaces.
    hessians_dropped: bool = False
    already_served: bool = False
    replaced_config_entry: ReplacedConfigEntry | None = None


def check_calibration_file(path: str) -> None:
    """Refuse (TaskError, naming the file and line) a calibration file the requantizer could
    not use or could not afford: the quantizer's own check, with the bounds above (read one
    bounded line at a time: a whole file or line in memory is what they exist to avoid)."""
    try:
        calibration.check_calibration_file(Path(path), MAX_CALIBRATION_FILE_BYTES, MAX_CALIBRATION_LINE_BYTES)
    except CalibrationDataError as error:
        raise TaskError(ErrorCode.INVALID_REQUEST, str(error)) from None


def same_adapter_files(first: str, second: str) -> bool:
    """Whether two adapter directories hold the same ADAPTER_FILES, byte for byte (an unreadable
    file: not the same)."""
    try:
        for file_name in ADAPTER_FILES:
            one, other = Path(first) / file_name, Path(second) / file_name
            if one.is_file() != other.is_file() or (one.is_file() and not filecmp.cmp(one, other, shallow=False)):
                return False
    except OSError:
        return False
    return True


def requantized_name_refusal(name: str) -> str | None:
    """Why a task named `name` cannot bring calibration samples, or None: its job loads the
    adapter into PEFT under the name, which PEFT may refuse (a task named `my.task` or `train`
    was accepted and its job failed, again at every retry the status advised: outside probes)."""
    from inlaid.quant.inputs import peft_name_problem

    if problem := peft_name_problem(name):
        return (f"task {name!r} cannot have the base re-quantized for it ({problem}): add it under another name, "
                "or without calibration samples to serve it on the current base")
    return None
