"""An added task's record in the state directory's registry.json (its phase, its
re-quantization's progress and decisions), the committed layers' entries, and the
type-checked reading of both: a wrong type here once reached the executor's and the
requantizer's decoders. Torch-free."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

import msgspec

from inlaid.quant.job_effect import StoredEffect

# The phases of an added task.
SERVING = "serving"  # served on the current base; no re-quantization (none asked, or none possible)
QUEUED = "queued"
REQUANTIZING = "requantizing"
READY = "ready"  # every layer decided; the changed ones are served
FAILED = "failed"  # served on the base as it is; the message says why
PHASES = (SERVING, QUEUED, REQUANTIZING, READY, FAILED)
# The message of a job whose requantizer was lost, until the restarted one hands a layer over.
RESUMING_AT = re.compile(r"; resuming at layer (\d+)$")
RESTARTED = "the server restarted during its job"  # a restored job's message starts so (`task_restore.py`)


class Decision(TypedDict):
    """What a job decided for one linear (LayerReady's LinearOutcome, kept for task_status)."""
    layer: int
    linear: str
    action: str  # requantized | kept-unchanged | kept-quality
    reason: str
    change: float
    # each task's relative error on the served and on the re-quantized weight, while its job runs
    errors_served: NotRequired[dict[str, float]]
    errors_new: NotRequired[dict[str, float]]


@dataclass
class TaskRecord:
    name: str
    adapter_dir: str
    calibration: str | None
    phase: str
    version: int = 0  # the quantization version its re-quantization produces
    layers_done: int = 0
    layers_total: int = 0
    decisions: list[Decision] = field(default_factory=list)
    message: str = ""
    attempts: int = 0  # requantizer deaths during this task's job
    added_at: float = field(default_factory=time.time)
    started_at: float = 0.0  # first dispatch of its job
    finished_at: float = 0.0
    forward_seconds: float = 0.0
    quantize_seconds: float = 0.0
    peak_rss_bytes: int = 0
    effect: StoredEffect | None = None  # its ended job's, its decisions' errors then dropped
    # A restart that could not serve the task (its adapter copy missing or broken) shows it as failed
    # and keeps what it was here; a later one that serves it restores both. Empty: not suspended.
    suspended_phase: str = ""
    suspended_message: str = ""
    # Tasks whose Hessians had left the aggregate (removed, replaced, failed) when its job was
    # sent: what the job's move owes to them. None: a registry written before it was recorded.
    aggregate_drops: list[str] | None = None


@dataclass
class CommittedLayer:
    version: int
    file: str
    sha256: str = ""  # of the file, recorded at the commit; "" in registries written before it


def job_id(record: TaskRecord) -> str:
    """The id of the record's re-quantization job (one per version)."""
    return f"{record.name}@v{record.version}"


def checked(kind: Any, value: object, where: str) -> Any:
    """`value` converted to `kind` (msgspec: no coercion); a ValueError naming `where` if it is not."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as error:
        raise ValueError(f"{where}: {error}") from None


def entries(raw: dict, key: str) -> dict:
    entries = raw.get(key)
    if not isinstance(entries, dict):
        raise ValueError(f"{key}: a JSON object was expected, not {type(entries).__name__}")
    return entries


def layer_index(key: str) -> int:
    if not key.isascii() or not key.isdigit():
        raise ValueError(f"layers.{key}: a layer index (0, 1, ...) was expected")
    return int(key)


def task_record(name: str, raw: object) -> TaskRecord:
    """One task's entry, type-checked (a wrong type here reached the executor's and the
    requantizer's decoders once: an undecodable plan, resent forever) and range-checked."""
    record: TaskRecord = checked(TaskRecord, raw, f"tasks.{name}")
    problem = ""
    if record.name != name:
        problem = f"its name is {record.name!r}"
    elif record.phase not in PHASES or record.suspended_phase not in ("", *PHASES):
        problem = f"phase {record.phase!r} / suspended_phase {record.suspended_phase!r}: one of {', '.join(PHASES)}"
    elif min(record.version, record.layers_done, record.layers_total, record.attempts) < 0:
        problem = "version, layers_done, layers_total and attempts cannot be negative"
    elif record.layers_done > record.layers_total:
        problem = f"layers_done {record.layers_done} > layers_total {record.layers_total}"
    if problem:
        raise ValueError(f"tasks.{name}: {problem}")
    return record
