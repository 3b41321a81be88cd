"""Virtual Token Counters (VTC, Sheng et al. 2024): how much service each task received.

A task's counter grows by `input_weight` per prompt token when one of its requests is
first admitted and by `output_weight` per generated token (cost = input + 2 x output by
default). A task is backlogged while it has waiting requests. When a task becomes
backlogged again its counter is lifted to the least counter of the backlogged tasks (or,
when none is, to the counter of the last task that left the backlog), so a task cannot
bank service while it is idle and later starve the others with it.
"""

from __future__ import annotations

from inlaid.engine.sequence import Sequence


def task_key(seq: Sequence) -> str:
    return "<base>" if seq.adapter is None else seq.adapter


class ServiceCounters:
    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        self.waiting: dict[str, int] = {}  # backlogged tasks -> their number of waiting requests
        self._waiting_ids: set[int] = set()
        self._charged_ids: set[int] = set()  # requests whose prompt was charged (once, not on recompute)
        self._last_left: str | None = None

    def backlogged(self) -> list[str]:
        return list(self.waiting)

    def counter(self, task: str) -> float:
        return self.counters.get(task, 0.0)

    def start_waiting(self, seq: Sequence) -> None:
        """A request arrived or was preempted."""
        if seq.seq_id in self._waiting_ids:
            return
        task = task_key(seq)
        if task not in self.waiting:
            self._lift(task)
        self._waiting_ids.add(seq.seq_id)
        self.waiting[task] = self.waiting.get(task, 0) + 1

    def stop_waiting(self, seq: Sequence) -> None:
        """A request was admitted, or finished (cancelled) while waiting."""
        if seq.seq_id not in self._waiting_ids:
            return
        self._waiting_ids.discard(seq.seq_id)
        task = task_key(seq)
        self.waiting[task] -= 1
        if not self.waiting[task]:
            del self.waiting[task]
            self._last_left = task

    def charge_admission(self, seq: Sequence) -> None:
        if seq.seq_id not in self._charged_ids:
            self._charged_ids.add(seq.seq_id)
            task = task_key(seq)
            self.counters[task] = self.counter(task) + self.input_weight * seq.num_prompt_tokens

    def charge_token(self, seq: Sequence) -> None:
        task = task_key(seq)
        self.counters[task] = self.counter(task) + self.output_weight

    def forget(self, seq: Sequence) -> None:
        self.stop_waiting(seq)
        self._charged_ids.discard(seq.seq_id)

    def _lift(self, task: str) -> None:
        if self.waiting:
            floor = min(self.counter(t) for t in self.waiting)
        elif self._last_left is not None:
            floor = self.counter(self._last_left)
        else:
            return
        self.counters[task] = max(self.counter(task), floor)
