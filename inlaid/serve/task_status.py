"""A task's status as `task_status` answers it: its phase, its job's progress and what the
job kept as served, from the state directory's record (torch-free, the coordinator's)."""

from __future__ import annotations

import time

from inlaid.protocol import REDO_NOT_SERVED, ErrorCode, KeptLinear, TaskErrorChange, TaskStatusReply
from inlaid.quant.job_effect import JobEffect, LinearEffect, StoredEffect, TaskEffect, job_effect
from inlaid.serve.task_registry import TaskError, TaskRegistry
from inlaid.serve.task_records import QUEUED, SERVING, TaskRecord
from inlaid.serve.task_store import TaskStore


def task_status_reply(request_id: str, name: str, store: TaskStore | None, registry: TaskRegistry,
                      num_layers: int, full_precision: bool = False,
                      change_threshold: float = 0.0) -> TaskStatusReply:
    record = store.tasks.get(name) if store else None
    served_version = store.served_version if store else 0
    if record is None:
        if name not in registry.tasks:
            raise TaskError(ErrorCode.UNKNOWN_TASK, f"unknown task {name!r}")
        return TaskStatusReply(request_id=request_id, name=name, phase=SERVING, layers_done=0,
                               layers_total=num_layers, version=0, served_version=served_version,
                               layers_swapped=0, message=(
                                   "served on the full-precision base: there is nothing to re-quantize"
                                   if full_precision else
                                   "served from the server config: the base covers it only if the checkpoint "
                                   "was quantized for it" if store is not None else
                                   "served on the base as it is: without server.state_dir nothing is "
                                   "re-quantized for a task (the base covers it only if the checkpoint was "
                                   "quantized for it)"))
    assert store is not None
    kept = [KeptLinear(layer=d["layer"], linear=d["linear"], action=d["action"], reason=d["reason"])
            for d in record.decisions if d["action"] != "requantized"]
    served_at = store.served_versions(record)
    end = record.finished_at or (time.time() if record.started_at else 0.0)
    # what the job did to the tasks already served (quantize-add prints the same): kept at its end
    effect, threshold = (stored_effect(record.effect) if record.effect is not None
                         else (record_effect(record), change_threshold))
    return TaskStatusReply(
        request_id=request_id, name=name, phase=record.phase, layers_done=record.layers_done,
        layers_total=record.layers_total, version=record.version, served_version=served_version,
        layers_swapped=store.layers_of(record.version),
        kept=kept, message=record.message, forward_seconds=record.forward_seconds,
        quantize_seconds=record.quantize_seconds, wall_seconds=end - record.started_at if record.started_at else 0.0,
        peak_rss_bytes=record.peak_rss_bytes,
        layers_superseded=sum(1 for version in served_at.values() if version > record.version),
        layers_not_served=sum(1 for version in served_at.values() if version < record.version),
        aggregate_change_median=effect.change_median if effect else 0.0,
        aggregate_change_max=effect.change_max if effect else 0.0, change_threshold=threshold,
        task_errors=[TaskErrorChange(task=task.task, error_before=task.error_before, error_after=task.error_after)
                     for task in (effect.tasks if effect else [])])


def not_served_note(store: TaskStore, record: TaskRecord) -> str:
    """What a re-add that changes nothing says of its job's layers an older version serves
    (it said "still serves", and the status's advice to add it again led here: an outside probe)."""
    not_served = sum(1 for version in store.served_versions(record).values() if version < record.version)
    if not not_served:
        return ""
    layers = "layer" if not_served == 1 else "layers"
    return (f", but for {not_served} changed {layers} not served at its version (a failed swap, or a file found "
            f"damaged at a restart: an older version or the checkpoint's layer serves them); {REDO_NOT_SERVED}")


def cancelled_job_note(record: TaskRecord, swapped: int) -> str:
    """What a removal says of its task's cancelled job, `swapped` of whose layers serve ("layers
    already swapped in stay" was said of a job that had not started, and "those stay served"
    of layers the job had all kept as they were: outside probes)."""
    if not record.layers_done:  # a job resumed after a restart is queued with layers done
        return ("; its queued re-quantization is cancelled (it had not started)" if record.phase == QUEUED
                else "; its re-quantization is cancelled (no layer of it was finished)")
    done = f"; its re-quantization is cancelled after {record.layers_done} of {record.layers_total} layers"
    if not swapped:
        return done + " (none of them had been swapped in: the base is as it was)"
    return done + f" ({swapped} of them re-quantized, and those stay served: each is a valid quantization)"


def drops_since_previous_job(record: TaskRecord, last_job_drops: list[str] | None) -> list[str]:
    """The tasks whose Hessians left the aggregate between the last job that ended ready
    (`TaskStore.last_job_drops`; a new state's first job: the checkpoint's aggregate, which
    dropped nothing) and `record`'s job: its move is theirs as much as its own task's. Empty
    when either is unknown (a registry written before they were kept)."""
    if record.aggregate_drops is None or last_job_drops is None:
        return []
    return [name for name in record.aggregate_drops if name not in last_job_drops]


def ready_message(record: TaskRecord, swapped: int, num_layers: int, change_threshold: float,
                  new_drops: list[str] | None = None) -> str:
    """What a finished job says it did (`swapped` layers of the record's version serve).
    `new_drops`: drops_since_previous_job, named so that a move they caused is not read as
    the new task's alone (an outside probe: 9 % and every layer, after a replace and removals)."""
    kept = sum(1 for d in record.decisions if d["action"] != "requantized")
    message = f"{swapped} of {num_layers} layers swapped in; {kept} linears kept as served"
    if new_drops:
        shown = ", ".join(new_drops[:8]) + (f" and {len(new_drops) - 8} more" if len(new_drops) > 8 else "")
        message += (f"; the aggregate also lost the Hessians of tasks removed, replaced or failed since the previous "
                    f"job ({shown}): part of its change is theirs")
    if swapped or not record.decisions:
        return message
    # One task among many rarely moves the aggregate past the threshold: said so, as "ready"
    # alone reads as if the base had been re-quantized for the task (an outside probe).
    unmoved = sum(1 for d in record.decisions if d["action"] == "kept-unchanged")
    gated = ", the rest were kept by the quality gate" if unmoved < kept else ""
    return (f"{message}: the base is unchanged ({unmoved} of them moved by at most change_threshold, "
            f"{100 * change_threshold:.2f} %{gated}); the task is served on the base as it was")


def ready_report(record: TaskRecord, store: TaskStore, num_layers: int, change_threshold: float) -> str:
    """The message of `record`'s job, ended ready; the store then keeps the drops its aggregate had."""
    message = ready_message(record, store.layers_of(record.version), num_layers, change_threshold,
                            drops_since_previous_job(record, store.last_job_drops))
    if record.aggregate_drops is not None:
        store.last_job_drops = list(record.aggregate_drops)
    return message


def record_effect(record: TaskRecord) -> JobEffect | None:
    """What the record's job did so far, from its decisions' errors: a re-quantized linear
    counts as served after the job only once its layer is committed."""
    return job_effect(LinearEffect(d["change"], d.get("errors_served", {}), d.get("errors_new", {}),
                                   d["action"] == "requantized" and d["layer"] < record.layers_done)
                      for d in record.decisions)


def compact_effect(record: TaskRecord, change_threshold: float) -> None:
    """At its job's end: keep what the job did as per-task totals, with the threshold it ran
    under, and drop the per-linear errors (every task's errors on every linear, in every
    record, grew registry.json with the square of the task count: 21 MB at 50 tasks,
    rewritten at every layer commit)."""
    effect = record_effect(record)
    record.effect = None if effect is None else StoredEffect(
        change_median=effect.change_median, change_max=effect.change_max, change_threshold=change_threshold,
        tasks={task.task: (task.error_before, task.error_after) for task in effect.tasks})
    for decision in record.decisions:
        decision.pop("errors_served", None)
        decision.pop("errors_new", None)


def stored_effect(stored: StoredEffect) -> tuple[JobEffect, float]:
    tasks = [TaskEffect(task, before, after) for task, (before, after) in stored["tasks"].items()]
    return JobEffect(stored["change_median"], stored["change_max"], tasks), stored["change_threshold"]
