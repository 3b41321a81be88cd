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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.engine.sequence import Sequence
from inlaid.protocol import BatchPlan, StepResult

if TYPE_CHECKING:
    from inlaid.engine.scheduler import Scheduler

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
        self._file: IO[str] | None = None
        self._scheduler: "Scheduler | None" = None
        self._pending: dict[int, dict[str, Any]] = {}

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
        self._file = open(self.path, "a", buffering=1)  # line-buffered: each line reaches the file whole
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

    def on_result(self, result: StepResult, now: float) -> None:
        record = self._pending.pop(result.step_id, None)
        if record is not None and self._file is not None:
            record.update(result_at=now, compute_s=result.compute_seconds)
            if self._scheduler is not None and self._scheduler.executor_index is not None:
                record["executor"] = self._scheduler.executor_index
            self._file.write(json.dumps(record) + "\n")
        self.inner.on_result(result, now)

    def on_finish(self, seq: Sequence, now: float) -> None:
        self.inner.on_finish(seq, now)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.inner.close()


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
