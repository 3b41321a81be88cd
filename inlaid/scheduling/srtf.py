"""The `inlaid` policy: first tokens first, then shortest predicted remaining work, with
task grouping, aging and an optional fairness bound.

Ranking, best first (the scheduler enforces seats, token budget, KV blocks, device slots
and β on it; a running request it does not reach keeps its KV blocks, paused):

1. overdue requests, oldest first: no progress for `max_wait_s` (never scheduled, paused
   or preempted that long). Once overdue, a request stays first until it finishes, and nothing
   ranked below an overdue request is admitted before it: no request starves;
2. new requests, in arrival order (`first_token_first`): a prefill is cheap next to the
   decode steps it is waiting behind, and a first token early is what a user sees;
3. the rest (decodes, and preempted requests) by key: predicted remaining output tokens
   + `prefill_weight` x prompt tokens still to compute - `aging_tokens_per_s` x seconds
   without progress - a bonus for an adapter computed in the last step or resident in a
   slot. With `group_by_adapter`, adapters are ranked by the summed urgency (1 / key) of
   their requests and each adapter's requests go together (grouping: more rows per
   adapter, fewer adapters per step). With `preemptive`, decodes are ranked with the
   waiting work, so a shorter request pauses a longer one; otherwise running requests
   keep their seats.

At most β = `max_adapters_per_step` distinct adapters per step (base-model rows never
count): a LoRA segment costs the CPU executor ~18 ms per step whatever its size
(`bench/results/sched_cost.md`). With `batch_rows_target` = R, each step takes only as
many adapters (at most β) as the R most urgent requests (shortest first, not the grouped
order: a flood of one adapter's requests must not leave out the adapter of a shorter one)
need, and those R requests rank first, the rest grouped behind them: two adapters with
deep queues make a step of two fuller segments, while with 1,000 tasks, one request each,
the step still takes β. An adapter past the β-th is never refused forever: its
request becomes overdue, ranks first, and its adapter enters the next step.

With `fairness_bound` = B > 0 fairness comes before all of that: a request that would take
its task more than B beyond the least-served backlogged task (VTC counters: input + 2 x
output tokens) does not compute this step (`_within_fairness_bound`), overdue or not. The
gap between backlogged tasks stays within B + one request's charge; the aging bound then
holds only for the tasks within B (a task ahead waits until the others catch up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from inlaid.cli_args import MAX_SECONDS
from inlaid.engine.config import MAX_LORA_SLOTS, check_range
from inlaid.engine.policy import SchedulingPolicy, seconds_without_progress
from inlaid.engine.sequence import Sequence, SequenceStatus
from inlaid.protocol import BatchPlan
from inlaid.scheduling.estimates import LengthModel, learn_on_finish, predict_on_arrival, remaining_tokens
from inlaid.scheduling.service import ServiceCounters, task_key

if TYPE_CHECKING:
    from inlaid.engine.scheduler import Scheduler


class OptionRange(NamedTuple):
    """A numeric option's allowed values, as its refusal states them."""

    low: float
    high: float
    integer: bool
    unit: str  # said after "an integer" / "a finite number", e.g. " of seconds; 0 = at once"
    low_open: bool = False  # the low end itself refused


# The ceilings sit far past any useful value but below where a value stops meaning anything:
# no engine has more adapter slots than MAX_LORA_SLOTS (a larger beta bounds nothing), no step
# holds 65,536 rows, a prompt token costs at most a few decode steps (100 is already absurd),
# and a bonus of millions of tokens is longer than any context.
MAX_TOKEN_BONUS = 1e6
MAX_PREFILL_WEIGHT = 100.0
OPTION_RANGES: dict[str, OptionRange] = {
    "max_adapters_per_step": OptionRange(0, MAX_LORA_SLOTS, True, "; 0 = no bound beyond the device slots"),
    # 0 refused: every request would be overdue at once.
    "max_wait_s": OptionRange(0, MAX_SECONDS, False, " of seconds", low_open=True),
    "aging_tokens_per_s": OptionRange(0, MAX_TOKEN_BONUS, False, " of tokens a second; 0 = no soft aging"),
    "prefill_weight": OptionRange(0, MAX_PREFILL_WEIGHT, False, " of decode steps per prompt token"),
    "batch_bonus_tokens": OptionRange(0, MAX_TOKEN_BONUS, False, " of tokens"),
    "resident_bonus_tokens": OptionRange(0, MAX_TOKEN_BONUS, False, " of tokens"),
    # 1e12 is how a test says "as good as unbounded"; past 2**53 (~9e15) a counter's gap no longer adds up.
    "fairness_bound": OptionRange(0, 1e15, False, " of VTC units; 0 = no fairness bound"),
    "first_token_after_s": OptionRange(0, MAX_SECONDS, False, " of seconds; 0 = at once"),
    "max_prefill_tokens_per_step": OptionRange(0, 1 << 24, True, "; 0 = the engine's token budget"),
    "predictor_refit_every": OptionRange(0, 1_000_000, True, "; 0 = never refit"),
    "batch_rows_target": OptionRange(0, 1 << 16, True, "; 0 = always beta adapters"),
}


@dataclass
class InlaidOptions:
    # Defaults: tuned on the simulator sweep for the CPU executor (docs/scheduling.md);
    # a CUDA server starts from CUDA_DEFAULTS below.
    max_adapters_per_step: int = 8  # β; 0 = no bound beyond the device slots
    max_wait_s: float = 120.0  # aging bound: overdue after this many seconds without progress
    aging_tokens_per_s: float = 0.0  # soft aging: each second waited counts as this many tokens less
    prefill_weight: float = 0.006  # decode steps one prompt token costs (the CPU cost model's ratio)
    batch_bonus_tokens: float = 2.0  # key bonus when the adapter computed in the last step
    resident_bonus_tokens: float = 1.0  # key bonus when the adapter sits in a device slot
    fairness_bound: float = 0.0  # VTC units (tokens of service); 0 = no fairness bound
    first_token_first: bool = True  # new requests' prefills first (arrival order), then decodes shortest first
    first_token_after_s: float = 10.0  # ... once they waited this long (0: at once): SRTF decides before
    # ... only as many as there are free seats (max_num_seqs - requests holding KV): a burst's
    # prompts then never crowd out the decodes already running (they start as seats free)
    first_token_within_seats: bool = False
    preemptive: bool = True  # decodes ranked with waiting work: a shorter one pauses a longer one (KV kept)
    group_by_adapter: bool = True  # adapters ranked by their requests' urgency, each adapter's requests together
    max_prefill_tokens_per_step: int = 0  # prompt tokens per step; 0 = the engine's token budget
    predictor: str = "model"  # model (hashed ridge, learns online) | task-mean (the ablation)
    predictor_state: str = ""  # .npz the predictor loads at start and saves on close ("" = none)
    predictor_refit_every: int = 64  # finished requests between full refits (0: never; the task levels alone follow)
    batch_rows_target: int = 16  # > 0: per step, only as many adapters (<= β) as the ranking needs to fill this many rows

    def validate(self) -> None:
        # Every number has a ceiling as well as a floor: a value far past any real one (beta
        # = 10**9, batch_rows_target = 10**12, prefill_weight = 1e300) passed, and either
        # switched its mechanism off without a word or overflowed the ranking's keys.
        for name, allowed in OPTION_RANGES.items():
            check_range(name, getattr(self, name), allowed.low, allowed.high, integer=allowed.integer,
                        low_open=allowed.low_open,
                        what=f"{'an integer' if allowed.integer else 'a finite number'}{allowed.unit}")
        if self.predictor not in ("model", "task-mean", "exact"):
            raise ValueError(f"predictor must be 'model' or 'task-mean' ('exact': the simulator's oracle), got {self.predictor!r}")
        if self.predictor == "task-mean" and self.predictor_state:
            # The per-task mean keeps no state: a path here was saved to and read from never.
            raise ValueError("predictor_state saves the 'model' predictor; predictor 'task-mean' keeps no state: "
                             "remove predictor_state or use predictor = 'model'")


# A GPU step costs nearly the same whatever its rows and adapters (H200, a 7B-shaped 4-bit
# model, eager: 33 ms a step, 2.6 ms a distinct adapter, tokens free;
# bench/results/sched_cost_h200.md). Bounding adapters or rows per step then only loses
# throughput, and a first token need not wait: there the CPU defaults took 2.5x FIFO's mean
# JCT, these 0.94x with every p99 first token within FIFO's (bench/results/sched_tune_h200.md).
# A server on a CUDA device starts with them (ServerConfig.policy_options); [scheduler]
# options set explicitly stay.
# prefill_weight 0: that cost model prices a prompt token at nothing, and the figures were
# simulated with it.
CUDA_DEFAULTS: dict[str, Any] = {"max_adapters_per_step": 0, "batch_rows_target": 0, "first_token_after_s": 0.0,
                                 "prefill_weight": 0.0}


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
        # Once overdue, a request stays overdue until it finishes: the overdue are served in
        # arrival order, and that order never flips (two overdue requests could otherwise
        # preempt each other in turn, each taking the step the other just got).
        self._overdue: set[int] = set()

    def attach(self, scheduler: "Scheduler") -> None:
        self._scheduler = scheduler

    # The options that own state built with the policy: a re-tuning keeps them as they are.
    STATEFUL_OPTIONS = ("predictor", "predictor_state", "predictor_refit_every", "fairness_bound")

    def retune(self, options: InlaidOptions) -> InlaidOptions:
        """Rank with `options` from the next step on (a live re-tuning), keeping the queue's
        state (overdue requests stay overdue), the length model and the service counters:
        STATEFUL_OPTIONS keep their current values. Returns the options now in force;
        ValueError (nothing changed) when they are invalid."""
        options = dataclasses.replace(options, **{name: getattr(self.options, name) for name in self.STATEFUL_OPTIONS})
        options.validate()
        self.options = options
        self.max_adapters_per_step = options.max_adapters_per_step or None
        self.max_prefill_tokens_per_step = options.max_prefill_tokens_per_step or None
        return options

    # ------------------------------------------------------------------ ranking
    def order(self, running: list[Sequence], waiting: list[Sequence], now: float) -> list[Sequence]:
        overdue, fresh, ongoing, rest = [], [], [], []
        for seq in running + waiting:
            if seq.seq_id in self._overdue or self._waited(seq, now) >= self.options.max_wait_s:
                self._overdue.add(seq.seq_id)
                overdue.append(seq)  # a waiting request, or a running one paused that long
            elif (self.options.first_token_first and seq.first_scheduled_at is None
                  and now - seq.arrival_time >= self.options.first_token_after_s):
                fresh.append(seq)
            elif seq.status is SequenceStatus.RUNNING and not self.options.preemptive:
                ongoing.append(seq)
            else:
                rest.append(seq)
        overdue.sort(key=lambda s: (s.arrival_time, s.seq_id))
        fresh.sort(key=lambda s: (s.arrival_time, s.seq_id))
        if self.options.first_token_within_seats and self._scheduler is not None:
            seats = max(0, self._scheduler.limits.max_num_seqs - len(running))
            fresh, later = fresh[:seats], fresh[seats:]
            rest += later  # ranked by shortest work with the rest
        ongoing.sort(key=remaining_tokens)
        keys = {id(s): self._key(s, now) for s in rest}
        rest.sort(key=lambda s: keys[id(s)])  # shortest first
        head = overdue + fresh + ongoing
        # With the row target, a step takes the adapters of the R most urgent requests (an
        # adapter's flood of requests must not leave out the adapter of a shorter one). Those
        # R requests come first, shortest first, then the rest grouped with these adapters
        # leading: the scheduler takes the first adapters it meets, so they must be these, and
        # seats go to the most urgent requests before a flood's group (with four seats, a rare
        # task's 8-token request waited 6-7 s behind a flood's on a live server).
        urgent = self._urgent_adapters(head + rest) if self.options.batch_rows_target else set()
        if self.options.batch_rows_target and self.options.group_by_adapter:
            ranked = self._led_by(urgent, head, rest, keys)
        else:
            ranked = head + (self._grouped(rest, keys, set()) if self.options.group_by_adapter else rest)
        self.plannable = None
        if self.service is not None:
            ranked, self.plannable = self._within_fairness_bound(ranked)
        if self.options.batch_rows_target:
            if self.plannable is not None:  # the fairness bound holds some back: count what this step plans
                kept = {id(s) for s in ranked[: self.plannable]}
                urgent = self._urgent_adapters([s for s in head + rest if id(s) in kept])
                if self.options.group_by_adapter:  # ... and let those adapters lead again (else
                    # another adapter took the counted place: the shortest plannable request's
                    # was left out). Same requests kept, so each task's charge is unchanged.
                    ranked = self._led_by(urgent, [s for s in head if id(s) in kept],
                                          [s for s in rest if id(s) in kept], keys) + ranked[self.plannable:]
            self.max_adapters_per_step = len(urgent) or (self.options.max_adapters_per_step or None)
        return ranked

    def _led_by(self, urgent: set[str], head: list[Sequence], rest: list[Sequence],
                keys: dict[int, float]) -> list[Sequence]:
        """`head`, then the most urgent of `rest` up to the row target, then the rest grouped
        with `urgent`'s adapters leading."""
        top = max(0, self.options.batch_rows_target - len(head))
        return head + rest[:top] + self._grouped(rest[top:], keys, urgent)

    def _urgent_adapters(self, shortest_first: list[Sequence]) -> set[str]:
        """The adapters of the `batch_rows_target` most urgent requests (base rows count as
        rows, not adapters), at most β: fewer, fuller LoRA segments when a few adapters have
        the queue, β when every adapter brings a row."""
        beta = self.options.max_adapters_per_step or None
        adapters: set[str] = set()
        for seq in shortest_first[: self.options.batch_rows_target]:
            if seq.adapter is not None and seq.adapter not in adapters:
                if beta is not None and len(adapters) >= beta:
                    break
                adapters.add(seq.adapter)
        return adapters

    def _within_fairness_bound(self, ranked: list[Sequence]) -> tuple[list[Sequence], int]:
        """The ranking with every request that would take its task more than
        `fairness_bound` beyond the least-served backlogged task moved last, and the number
        of requests before them (the scheduler plans none of the rest this step).

        Walking the ranking, each request is charged tentatively what this step would add
        to its task's counter (its prompt when first admitted, one output token), so a task
        ends the step at most one request's charge past the bound: the gap between two
        backlogged tasks stays within `fairness_bound` + the largest prompt + one output
        token. The least-served task is never held back, so every step computes."""
        assert self.service is not None
        service = self.service
        backlogged = service.backlogged()
        if len(backlogged) < 2:
            return ranked, len(ranked)
        floor = min(service.counter(t) for t in backlogged)
        tentative: dict[str, float] = {}
        kept, held = [], []
        for seq in ranked:
            task = task_key(seq)
            counter = tentative.get(task, service.counter(task))
            if counter - floor > self.options.fairness_bound:
                held.append(seq)
                continue
            kept.append(seq)
            tentative[task] = counter + service.step_charge(seq)
        return kept + held, len(kept)

    @staticmethod
    def _grouped(ranked: list[Sequence], keys: dict[int, float], leading: set[str]) -> list[Sequence]:
        """Adapters by the sum of their requests' urgencies (1 / key: an adapter with many
        short requests first), those in `leading` before the others, each adapter's requests
        together, shortest first.

        Without `leading`, the step's adapters were the first ones of this order while their
        number was counted on the R most urgent requests: with a flood's adapter first and a
        third adapter next, the adapter of a request shorter than any of the flood's was
        counted but not taken, every step, until the aging bound."""
        groups: dict[str | None, list[Sequence]] = {}
        for seq in ranked:
            groups.setdefault(seq.adapter, []).append(seq)
        score = {a: sum(1.0 / max(keys[id(s)], 1.0) for s in members) for a, members in groups.items()}
        order = sorted(groups, key=lambda a: (a not in leading, -score[a]))
        return [s for a in order for s in groups[a]]

    def _waited(self, seq: Sequence, now: float) -> float:
        """Seconds without progress: since arrival for a request never scheduled, since its
        last step for a running one (paused when it is long) or a preempted one (not from its
        arrival: a preempted request older than `max_wait_s` was overdue at once and preempted
        the request it had made room for, both recomputed in turn)."""
        return seconds_without_progress(seq, now)

    def _key(self, seq: Sequence, now: float) -> float:
        options = self.options
        in_batch = self._last_step_adapters
        key = remaining_tokens(seq) + options.prefill_weight * seq.num_pending_tokens
        key -= options.aging_tokens_per_s * self._waited(seq, now)
        if seq.adapter is not None and self._scheduler is not None:
            if seq.adapter in in_batch:
                key -= options.batch_bonus_tokens
            elif self._scheduler.adapters.slot_of(seq.adapter) is not None:
                key -= options.resident_bonus_tokens
        return key

    def is_overdue(self, seq: Sequence, now: float) -> bool:
        return seq.seq_id in self._overdue or self._waited(seq, now) >= self.options.max_wait_s

    # ------------------------------------------------------------------ learning
    def on_arrival(self, seq: Sequence, now: float) -> None:
        predict_on_arrival(self.length_model, seq)
        if self.service is not None:
            self.service.arrive(seq)

    def on_admit(self, seq: Sequence, now: float) -> None:
        if self.service is not None:
            self.service.charge_admission(seq)

    def on_plan(self, plan: BatchPlan, planned: list[tuple[Sequence, int]], now: float) -> None:
        self._last_step_adapters = {seq.adapter for seq, _ in planned if seq.adapter is not None}

    def on_undone(self, step_id: int, now: float) -> None:
        self._last_step_adapters = set()  # that step computed nothing: no adapter is in the batch

    def on_token(self, seq: Sequence, now: float) -> None:
        if self.service is not None:
            self.service.charge_token(seq)

    def on_finish(self, seq: Sequence, now: float) -> None:
        self._overdue.discard(seq.seq_id)
        learn_on_finish(self.length_model, seq)
        if self.service is not None:
            self.service.finish(seq)

    def on_task_removed(self, task: str) -> None:
        if self.service is not None:
            self.service.forget(task)
        forget = getattr(self.length_model, "forget", None)  # (a plug-in's length model may keep nothing)
        if forget is not None:
            forget(task)

    def close(self) -> None:
        close = getattr(self.length_model, "close", None)
        if close is not None:
            close()
