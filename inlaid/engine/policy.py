"""The scheduling policy's interface (`SchedulingPolicy`: the order of work, and hooks to
learn from what ran) and the default policy, FIFO. Torch-free. The scheduler
(scheduler.py) enforces the limits; a policy only ranks. Other policies live in
`inlaid.scheduling`; a plug-in subclasses `SchedulingPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from inlaid.engine.config import check_range
from inlaid.engine.sequence import Sequence
from inlaid.protocol import BatchPlan, StepResult

if TYPE_CHECKING:
    from inlaid.engine.scheduler import Scheduler


class PolicyError(RuntimeError):
    """The scheduling policy failed on a request (a bug or a bad policy state, not the request)."""


class SchedulingPolicy:
    """The order of work, and hooks to learn from what ran. This base class ranks as FIFO
    does but never calls a request overdue (`FifoPolicy` below adds FIFO's bound).

    Every hook receives the scheduler's clock time `now` (seconds; the simulator's clock in
    simulations). Policies live in `inlaid.scheduling`.
    """

    name = "fifo"
    # β: the most distinct adapters one step may compute (base-model rows do not count).
    max_adapters_per_step: int | None = None
    # Prompt tokens (prefill chunks) one step may compute, below the engine's token budget:
    # shorter steps for the decoding sequences (stall-free chunked prefill).
    max_prefill_tokens_per_step: int | None = None
    # Only the first `plannable` entries of the last `order` may compute this step; the rest
    # are ranked only to choose preemption victims (a fairness bound holds them back, set in
    # `order`). None: all of them.
    plannable: int | None = None

    def attach(self, scheduler: "Scheduler") -> None:
        """Called once by the scheduler that uses this policy."""

    def on_arrival(self, seq: Sequence, now: float) -> None:
        """A sequence was queued (predict its length here)."""

    def order(self, running: list[Sequence], waiting: list[Sequence], now: float) -> list[Sequence]:
        """Every running and waiting sequence, best first."""
        return running + waiting

    def is_overdue(self, seq: Sequence, now: float) -> bool:
        """A waiting sequence that nothing ranked below it may overtake."""
        return False

    def preemption_victim(self, candidates: list[Sequence], now: float) -> Sequence:
        """Which of `candidates` (running, ranked in `order`'s order) loses its KV blocks."""
        return candidates[-1]

    def on_admit(self, seq: Sequence, now: float) -> None:
        """A waiting sequence became running (again, after a preemption)."""

    def on_preempt(self, seq: Sequence, now: float) -> None:
        """A running sequence lost its KV blocks and waits again."""

    def on_plan(self, plan: BatchPlan, planned: list[tuple[Sequence, int]], now: float) -> None:
        """The step about to run: each planned sequence with its number of tokens."""

    def on_token(self, seq: Sequence, now: float) -> None:
        """`seq` generated a token (already appended)."""

    def on_result(self, result: StepResult, now: float) -> None:
        """The executor's result of a step (its compute time)."""

    def on_undone(self, step_id: int, now: float) -> None:
        """A planned step never ran (its execution raised): it gets no result. Its sequences
        were requeued (`Engine.undo_step`, `on_preempt`) or, where a server's executor failed
        the step, failed (`on_finish`)."""

    def on_finish(self, seq: Sequence, now: float) -> None:
        """`seq` finished (any reason, cancellations included)."""

    def on_task_removed(self, task: str) -> None:
        """`task` was removed from the server and its last request ended: forget what is
        kept per task (a server adding and removing tasks for months must not keep every
        name it ever served)."""

    def close(self) -> None:
        """The server stops: save what should outlive it."""


def seconds_without_progress(seq: Sequence, now: float) -> float:
    """Since the sequence's last step, or since its arrival when it never computed: how long
    a waiting request has waited (a preempted one since its last step, not since it arrived)
    and how long a running one has been paused."""
    return now - (seq.arrival_time if seq.last_scheduled_at is None else seq.last_scheduled_at)


# How long a waiting request may be overtaken (fifo, vtc). With more busy adapters than
# device slots, a request whose adapter has no slot is refused while later requests of the
# resident adapters are admitted, and it was overtaken forever (vLLM #16876); past this bound
# it closes admission (for a slot: the scheduler's slot hold drains one adapter for it).
DEFAULT_MAX_WAIT_S = 10.0
MAX_WAIT_LIMIT_S = 1e6  # as every duration option (inlaid.cli_args.MAX_SECONDS): 11.6 days, in effect off


@dataclass
class FifoOptions:
    max_wait_s: float = DEFAULT_MAX_WAIT_S  # a request that waited this long is not overtaken

    def validate(self) -> None:
        check_range("max_wait_s", self.max_wait_s, 0, MAX_WAIT_LIMIT_S, low_open=True, what="seconds")


class FifoPolicy(SchedulingPolicy):
    """S-LoRA's order: running sequences in admission order, then waiting ones in arrival
    order. A waiting request refused for a limit (its adapter's slot, mostly) is overtaken by
    the requests behind it for at most `max_wait_s`."""

    # (a class default too: a plug-in subclassing FifoPolicy, which was SchedulingPolicy itself,
    # with an __init__ of its own that does not call this one, keeps the default bound)
    options = FifoOptions()

    def __init__(self, options: FifoOptions | None = None) -> None:
        self.options = options or FifoOptions()
        self.options.validate()

    def is_overdue(self, seq: Sequence, now: float) -> bool:
        return seconds_without_progress(seq, now) >= self.options.max_wait_s
