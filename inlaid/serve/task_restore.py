"""What a (re)started server does with the tasks its state directory stores: each is served
again where its adapter copy still loads (else shown as failed, keeping what it was), and an
unfinished re-quantization job resumes where it stopped, or is held with the reason when this
server cannot run it. Torch-free: the coordinator's side (`dynamic_tasks.py`)."""

from __future__ import annotations

import logging

from inlaid.serve.config import ServerConfig
from inlaid.serve.task_records import FAILED, QUEUED, REQUANTIZING, RESTARTED, RESUMING_AT, SERVING, TaskRecord
from inlaid.serve.task_registry import TaskError, TaskRegistry
from inlaid.serve.task_store import TaskStore

log = logging.getLogger("inlaid.dynamic_tasks")


def restore_tasks(store: TaskStore, config: ServerConfig, registry: TaskRegistry, blocker: str) -> list[str]:
    """Serve the stored tasks again, oldest addition first; returns the tasks whose jobs
    resume, in that order. `blocker`: why this server cannot re-quantize ("" when it can)."""
    resuming: list[str] = []
    for name, record in sorted(store.tasks.items(), key=lambda item: item[1].added_at):
        try:
            registry.add(name, record.adapter_dir, registry.check_adapter(name, record.adapter_dir))
        except TaskError as error:
            log.error("a stored task cannot be served", extra={"task": name, "reason": error.message})
            if not record.suspended_phase:  # else an earlier restart already keeps what it was
                record.suspended_phase, record.suspended_message = record.phase, record.message
            record.phase = FAILED
            record.message = (f"not served after a restart: {error.message} (put its adapter back and restart: "
                              f"it then serves again as it was, {record.suspended_phase}; or remove it)")
            continue
        if name in config.tasks:
            log.warning("a task of the config's [tasks] serves the state directory's adapter (it was added "
                        "live under that name); remove_task brings the config's back at the next restart",
                        extra={"task": name, "config_adapter_dir": config.tasks[name],
                               "adapter_dir": record.adapter_dir})
        if record.suspended_phase:  # served again: the state it had resumes
            log.info("a stored task serves again", extra={"task": name, "phase": record.suspended_phase})
            record.phase, record.message = record.suspended_phase, record.suspended_message
            record.suspended_phase = record.suspended_message = ""
        if record.phase in (QUEUED, REQUANTIZING):
            # (on a full-precision base no addition is ever queued: the state directory records
            # the base it belongs to, so there a stored job is no state a server left behind)
            if blocker and config.engine.quantized_dir:
                hold_job(record, blocker)
            else:
                record.phase = QUEUED
                if record.layers_done or RESUMING_AT.search(record.message):  # what it said is history now
                    record.message = f"{RESTARTED}; resuming at layer {record.layers_done}"
                resuming.append(name)
    return resuming


def hold_job(record: TaskRecord, blocker: str) -> None:
    """An unfinished job this server cannot run (`[requantizer] enabled = false`, ...): the
    task serves on the base as it is, with the reason, as a new addition is told (a `queued`
    phase no job would ever move made every wait run to its timeout). What the job had done
    is kept: it resumes at the first restart that can run it."""
    record.suspended_phase, record.suspended_message = QUEUED, record.message
    record.phase = SERVING
    record.message = (f"not re-quantized: {blocker} (its job stopped at layer {record.layers_done} of "
                      f"{record.layers_total}; it resumes there at a restart that can re-quantize)")
    log.warning("an unfinished re-quantization is not resumed", extra={"task": record.name, "reason": blocker,
                                                                       "layers_done": record.layers_done})
