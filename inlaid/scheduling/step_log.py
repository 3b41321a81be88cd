"""A JSON-lines record of every step a scheduler planned and how long the executor took.

Wraps any policy (`[scheduler] step_log = "steps.jsonl"`): each line holds the step's
chunks (tokens, start position, adapter, whether it samples), the adapter loads, the
clock time of the plan and of the result, and the executor's compute seconds. The
real-server benchmark reads it to measure the cost model's error on real steps. Each line
reaches the file when its step's result arrives: it was buffered for up to a second, so a
line waited out the whole next step (3.7 s measured) and, after a cancel ended the last
request, an idle spell: a killed server lost it. A write and flush of one line costs
microseconds against a step's milliseconds. A server with several
executors has a policy, so a writer, per executor on one file: each line then names its
`executor`, as step ids count per executor.

The log serves the requests, never the reverse: a line that cannot be written (the disk
full, the file's directory gone) is dropped with one WARNING for the spell and a count when
lines reach the file again. A failed write raised from the step's result, and every request
of every step failed with an internal error while the disk was full (an outside probe). A
line cut short by a filling disk is ended by its writer's next line; another executor's line
written in between joins it, and reading skips both.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.engine.sequence import Sequence
from inlaid.protocol import BatchPlan, StepResult

if TYPE_CHECKING:
    from inlaid.engine.scheduler import Scheduler

log = logging.getLogger("inlaid.scheduling")


class StepLogPolicy(SchedulingPolicy):
    """Logs the steps of `inner` and changes nothing about them: the limits the scheduler
    reads off its policy every step (β, the prefill cap, the plannable prefix) are the
    inner policy's current values, which it may change in every `order` call (the inlaid
    policy's row target and fairness bound do); any other attribute (the length model, the
    options) is the inner policy's too."""

    def __init__(self, inner: SchedulingPolicy, path: str | Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.path = Path(path)
        self._fd: int | None = None
        self._scheduler: "Scheduler | None" = None
        self._pending: dict[int, dict[str, Any]] = {}
        self.lines_lost = 0  # since lines last reached the file
        self._torn = False  # a short write left the file's last line unfinished

    @property  # type: ignore[override]
    def max_adapters_per_step(self) -> int | None:
        return self.inner.max_adapters_per_step

    @property  # type: ignore[override]
    def max_prefill_tokens_per_step(self) -> int | None:
        return self.inner.max_prefill_tokens_per_step

    @property  # type: ignore[override]
    def plannable(self) -> int | None:
        return self.inner.plannable

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def attach(self, scheduler: "Scheduler") -> None:
        # One write() per line on an O_APPEND descriptor: each line reaches the file whole,
        # also between the writers of several executors sharing it.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._scheduler = scheduler
        self.inner.attach(scheduler)

    def on_arrival(self, seq: Sequence, now: float) -> None:
        self.inner.on_arrival(seq, now)

    def order(self, running: list[Sequence], waiting: list[Sequence], now: float) -> list[Sequence]:
        return self.inner.order(running, waiting, now)

    def is_overdue(self, seq: Sequence, now: float) -> bool:
        return self.inner.is_overdue(seq, now)

    def preemption_victim(self, candidates: list[Sequence], now: float) -> Sequence:
        return self.inner.preemption_victim(candidates, now)

    def on_admit(self, seq: Sequence, now: float) -> None:
        self.inner.on_admit(seq, now)

    def on_preempt(self, seq: Sequence, now: float) -> None:
        self.inner.on_preempt(seq, now)

    def on_plan(self, plan: BatchPlan, planned: list[tuple[Sequence, int]], now: float) -> None:
        self._pending[plan.step_id] = {
            "step": plan.step_id,
            "planned_at": now,
            "chunks": [[n, seq.num_computed_tokens - n, seq.adapter, seq.num_computed_tokens == len(seq.token_ids)]
                       for seq, n in planned],
            "loads": [load.name for load in plan.adapter_loads],
        }
        self.inner.on_plan(plan, planned, now)

    def on_token(self, seq: Sequence, now: float) -> None:
        self.inner.on_token(seq, now)

    def on_undone(self, step_id: int, now: float) -> None:
        self._pending.pop(step_id, None)  # no line: the step computed nothing
        self.inner.on_undone(step_id, now)

    def on_result(self, result: StepResult, now: float) -> None:
        record = self._pending.pop(result.step_id, None)
        if record is not None and self._fd is not None:
            record.update(result_at=now, compute_s=result.compute_seconds)
            if self._scheduler is not None and self._scheduler.executor_index is not None:
                record["executor"] = self._scheduler.executor_index
            self._append(json.dumps(record))
        self.inner.on_result(result, now)

    def _append(self, line: str) -> None:
        assert self._fd is not None
        data = ("\n" if self._torn else "") + line + "\n"  # after a torn line: on a line of its own
        encoded = data.encode()
        try:
            written = os.write(self._fd, encoded)
        except OSError as error:
            return self._lost(error.strerror or str(error))
        if written < len(encoded):
            self._torn = True
            return self._lost("a short write (the disk is full?)")
        self._torn = False
        if self.lines_lost:
            log.warning("the step log is written again", extra={"path": str(self.path),
                                                                "lines_lost": self.lines_lost})
            self.lines_lost = 0

    def _lost(self, why: str) -> None:
        if not self.lines_lost:
            log.warning("a step log line cannot be written: lines are dropped until one can; serving goes on",
                        extra={"path": str(self.path), "error": why})
        self.lines_lost += 1

    def on_finish(self, seq: Sequence, now: float) -> None:
        self.inner.on_finish(seq, now)

    def on_task_removed(self, task: str) -> None:
        self.inner.on_task_removed(task)

    def close(self) -> None:
        descriptor, self._fd = self._fd, None
        try:
            if descriptor is not None:
                os.close(descriptor)
        except OSError as error:  # (the descriptor is released all the same)
            log.warning("the step log could not be closed", extra={"path": str(self.path), "error": error.strerror})
        finally:
            self.inner.close()


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    """The log's records; a line that is not a whole JSON object (one a full disk cut short)
    is skipped, with a WARNING counting them."""
    records, torn = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    if torn:
        log.warning("step log lines skipped: not whole JSON objects (cut short by a full disk?)",
                    extra={"path": str(path), "lines": torn})
    return records
