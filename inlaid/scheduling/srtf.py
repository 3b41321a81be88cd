"""The `inlaid` policy: shortest predicted remaining work first, with aging, task grouping
and an optional fairness bound.

Ranking, best first (the scheduler enforces KV blocks, slots, budgets and β on it):

1. running sequences, fewest predicted remaining tokens first (so a KV preemption takes
   the one with the most work left); running work is not paused for new arrivals;
2. overdue waiting requests (waited `max_wait_s` or more), oldest first: nothing ranked
   below an overdue request may be admitted before it, so no request waits much longer
   than `max_wait_s` plus the time running work needs to make room for it;
3. with `fairness_bound` > 0: waiting requests of tasks whose service counter (VTC: input
   + 2 x output tokens) lags the most-served active task by more than the bound, most
   lagging task first;
4. every other waiting request by its key: predicted remaining output tokens
   + `prefill_weight` x prompt tokens still to compute - `aging_tokens_per_s` x seconds
   waited - a bonus when its adapter is already in the running batch or resident in a
   device slot (grouping: fewer adapters per step, fewer loads).

At most β = `max_adapters_per_step` distinct adapters per step; base-model rows never
count, and an adapter past the β-th is never refused forever: once its request is overdue
it closes admission for everything below it, the running adapters drain, and it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.engine.sequence import Sequence, SequenceStatus
from inlaid.protocol import BatchPlan
from inlaid.scheduling.estimates import LengthModel, learn_on_finish, predict_on_arrival, remaining_tokens
from inlaid.scheduling.service import ServiceCounters, task_key

if TYPE_CHECKING:
    from inlaid.engine.scheduler import Scheduler


@dataclass
class InlaidOptions:
    max_adapters_per_step: int = 0  # β; 0 = no bound beyond the device slots
    max_wait_s: float = 60.0  # aging bound: overdue after this many seconds of waiting
    aging_tokens_per_s: float = 0.0  # soft aging: each second waited counts as this many tokens less
    prefill_weight: float = 0.05  # decode-step equivalents of one prompt token (the cost model's ratio)
    batch_bonus_tokens: float = 2.0  # key bonus when the adapter is already in the running batch
    resident_bonus_tokens: float = 1.0  # key bonus when the adapter sits in a device slot
    fairness_bound: float = 0.0  # VTC units (tokens of service); 0 = no fairness bound
    preemptive: bool = False  # rank running work with waiting work: a shorter request pauses a longer one
    max_prefill_tokens_per_step: int = 0  # prompt tokens per step; 0 = the engine's token budget
    predictor: str = "model"  # model (hashed ridge, learns online) | task-mean (the ablation)
    predictor_state: str = ""  # .npz the predictor loads at start and saves on close ("" = none)
    predictor_refit_every: int = 64  # finished requests between refits

    def validate(self) -> None:
        if self.max_adapters_per_step < 0:
            raise ValueError("max_adapters_per_step must be >= 0 (0 = no bound)")
        for name in ("max_wait_s", "aging_tokens_per_s", "prefill_weight", "fairness_bound"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_wait_s == 0:
            raise ValueError("max_wait_s must be > 0")
        if self.predictor not in ("model", "task-mean"):
            raise ValueError(f"predictor must be 'model' or 'task-mean', got {self.predictor!r}")
        if self.predictor_refit_every < 0:
            raise ValueError("predictor_refit_every must be >= 0 (0 = online steps only)")
        if self.max_prefill_tokens_per_step < 0:
            raise ValueError("max_prefill_tokens_per_step must be >= 0 (0 = the engine's budget)")


class InlaidPolicy(SchedulingPolicy):
    name = "inlaid"

    def __init__(self, options: InlaidOptions, length_model: LengthModel) -> None:
        options.validate()
        self.options = options
        self.max_adapters_per_step = options.max_adapters_per_step or None
        self.max_prefill_tokens_per_step = options.max_prefill_tokens_per_step or None
        self.length_model = length_model
        self.service = ServiceCounters() if options.fairness_bound > 0 else None
        self._scheduler: Scheduler | None = None
        self._last_step_adapters: set[str] = set()

    def attach(self, scheduler: "Scheduler") -> None:
        self._scheduler = scheduler

    # ------------------------------------------------------------------ ranking
    def order(self, running: list[Sequence], waiting: list[Sequence], now: float) -> list[Sequence]:
        in_batch = self._last_step_adapters
        lagging_tasks = self._lagging_tasks(running) if self.service is not None else {}
        candidates = running + waiting if self.options.preemptive else waiting
        overdue, lagging, rest = [], [], []
        for seq in candidates:
            if self._waited(seq, now) >= self.options.max_wait_s:
                overdue.append(seq)
            elif lagging_tasks and task_key(seq) in lagging_tasks:
                lagging.append(seq)
            else:
                rest.append(seq)
        overdue.sort(key=lambda s: (s.arrival_time, s.seq_id))
        keys = {id(s): self._key(s, now, in_batch) for s in lagging + rest}
        lagging.sort(key=lambda s: (lagging_tasks[task_key(s)], keys[id(s)]))
        rest.sort(key=lambda s: keys[id(s)])
        if self.options.preemptive:
            return overdue + lagging + rest
        return sorted(running, key=remaining_tokens) + overdue + lagging + rest

    def _waited(self, seq: Sequence, now: float) -> float:
        """Seconds without progress: since arrival for a request never scheduled, since its
        last step for a paused one (running sequences are ranked only when preemptive)."""
        if seq.last_scheduled_at is None or seq.status is not SequenceStatus.RUNNING:
            return now - seq.arrival_time
        return now - seq.last_scheduled_at

    def _key(self, seq: Sequence, now: float, in_batch: set[str]) -> float:
        options = self.options
        key = remaining_tokens(seq) + options.prefill_weight * seq.num_pending_tokens
        key -= options.aging_tokens_per_s * self._waited(seq, now)
        if seq.adapter is not None and self._scheduler is not None:
            if seq.adapter in in_batch:
                key -= options.batch_bonus_tokens
            elif self._scheduler.adapters.slot_of(seq.adapter) is not None:
                key -= options.resident_bonus_tokens
        return key

    def _lagging_tasks(self, running: list[Sequence]) -> dict[str, float]:
        """Backlogged tasks more than `fairness_bound` behind the most-served active task,
        with their counters."""
        assert self.service is not None
        backlogged = self.service.backlogged()
        if not backlogged:
            return {}
        active = set(backlogged) | {task_key(s) for s in running}
        top = max(self.service.counter(t) for t in active)
        bound = self.options.fairness_bound
        return {t: self.service.counter(t) for t in backlogged if top - self.service.counter(t) > bound}

    def is_overdue(self, seq: Sequence, now: float) -> bool:
        return self._waited(seq, now) >= self.options.max_wait_s

    # ------------------------------------------------------------------ learning
    def on_arrival(self, seq: Sequence, now: float) -> None:
        predict_on_arrival(self.length_model, seq)
        if self.service is not None:
            self.service.start_waiting(seq)

    def on_admit(self, seq: Sequence, now: float) -> None:
        if self.service is not None:
            self.service.stop_waiting(seq)
            self.service.charge_admission(seq)

    def on_preempt(self, seq: Sequence, now: float) -> None:
        if self.service is not None:
            self.service.start_waiting(seq)

    def on_plan(self, plan: BatchPlan, planned: list[tuple[Sequence, int]], now: float) -> None:
        self._last_step_adapters = {seq.adapter for seq, _ in planned if seq.adapter is not None}

    def on_token(self, seq: Sequence, now: float) -> None:
        if self.service is not None:
            self.service.charge_token(seq)

    def on_finish(self, seq: Sequence, now: float) -> None:
        learn_on_finish(self.length_model, seq)
        if self.service is not None:
            self.service.forget(seq)

    def close(self) -> None:
        close = getattr(self.length_model, "close", None)
        if close is not None:
            close()
