"""Virtual Token Counters (VTC, Sheng et al. 2024): how much service each task received.

A task's counter grows by `input_weight` per prompt token when one of its requests is
first admitted and by `output_weight` per generated token (cost = input + 2 x output by
default). A task is backlogged while it has unfinished requests (queued, or admitted but
paused: with pausing policies an admitted request can wait as well). When a task becomes
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
        self.unfinished: dict[str, int] = {}  # backlogged tasks -> their unfinished requests
        self._charged_ids: set[int] = set()  # requests whose prompt was charged (once, not on recompute)
        # The counter of the last task that left the backlog (the floor a returning task is lifted to
        # when none is backlogged): its value, so that forgetting that task keeps it.
        self._last_left_counter: float | None = None

    def backlogged(self) -> list[str]:
        return list(self.unfinished)

    def counter(self, task: str) -> float:
        return self.counters.get(task, 0.0)

    def arrive(self, seq: Sequence) -> None:
        task = task_key(seq)
        if task not in self.unfinished:
            self._lift(task)
        self.unfinished[task] = self.unfinished.get(task, 0) + 1

    def finish(self, seq: Sequence) -> None:
        task = task_key(seq)
        self._charged_ids.discard(seq.seq_id)
        if task not in self.unfinished:
            return
        self.unfinished[task] -= 1
        if not self.unfinished[task]:
            del self.unfinished[task]
            self._last_left_counter = self.counter(task)

    def charge_admission(self, seq: Sequence) -> None:
        if seq.seq_id not in self._charged_ids:
            self._charged_ids.add(seq.seq_id)
            task = task_key(seq)
            self.counters[task] = self.counter(task) + self.input_weight * seq.num_prompt_tokens

    def step_charge(self, seq: Sequence) -> float:
        """At most what one step computing `seq` adds to its task's counter: its prompt if
        not charged yet, and one output token."""
        prompt = 0.0 if seq.seq_id in self._charged_ids else self.input_weight * seq.num_prompt_tokens
        return prompt + self.output_weight

    def charge_token(self, seq: Sequence) -> None:
        task = task_key(seq)
        self.counters[task] = self.counter(task) + self.output_weight

    def forget(self, task: str) -> None:
        """A removed task whose requests all ended: its counter goes."""
        if task not in self.unfinished:
            self.counters.pop(task, None)

    def _lift(self, task: str) -> None:
        if self.unfinished:
            floor = min(self.counter(t) for t in self.unfinished)
        elif self._last_left_counter is not None:
            floor = self._last_left_counter
        else:
            return
        self.counters[task] = max(self.counter(task), floor)
