"""Continuous batching: which sequences compute how many tokens in the next step. Torch-free.

Every step builds ONE ragged batch under a token budget. The policy ranks all work,
running and waiting sequences together, best first; the scheduler walks that ranking and
plans each sequence while the step's limits allow:

- `max_num_seqs` sequences and `max_num_batched_tokens` tokens per step (a long prefill is
  chunked over several steps), of them at most `max_prefill_tokens_beside_decodes` prompt
  tokens while a running sequence decodes, in this step or paused (so that a long prompt
  stalls streams briefly);
- at most `policy.max_adapters_per_step` distinct adapters per step (base-model rows never
  count), and a device slot for each adapter (`AdapterSlots`);
- KV blocks: a running sequence that cannot grow preempts the lowest-ranked running
  sequence below it (its blocks are freed, it is recomputed later); a waiting sequence is
  admitted if its first chunk fits, after preempting running sequences ranked below it.

A policy may let only a prefix of its ranking compute (`plannable`: a fairness bound
holding tasks back); the rest is ranked for preemption only. A running sequence the walk
does not reach keeps its KV blocks and waits (paused). A waiting sequence refused for
memory, or an overdue one (`policy.is_overdue`) refused for any limit, closes admission for
this step, so nothing ranked below overtakes it: every request eventually runs. Refused only
because every device slot holds an adapter this step computes, an overdue sequence gets a
slot hold instead (slot_hold.py): one of those adapters drains for it while the others go on
being admitted. (A request refused for its slot is overtaken until its policy calls it
overdue; the built-in policies all do, a plug-in whose `is_overdue` never does can starve
it.) A sequence preempted in a step is not admitted again in that step, nor is anything
ranked below it. The default policy (FIFO, policy.py: running sequences in admission order,
then waiting ones in arrival order) never pauses or preempts for admission. The
coordinator process and the simulator run this same class.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.policy import FifoPolicy, PolicyError, SchedulingPolicy  # noqa: F401 (plug-ins import them here)
from inlaid.engine.sequence import FinishReason, Sequence, SequenceStatus
from inlaid.engine.slot_hold import SlotHold
from inlaid.protocol import AdapterLoad, BatchPlan, ChunkPlan, StepResult


@dataclass
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # Prompt tokens a step computes while sequences are decoding (None: no cap): a long
    # prompt's chunks then hold every streaming answer up for that much compute each, not a
    # whole token budget's (EngineConfig.prefill_tokens_beside_decodes).
    max_prefill_tokens_beside_decodes: int | None = None


@dataclass
class StepUpdate:
    """What one step changed: new tokens per sequence, and the sequences that finished."""

    new_tokens: list[tuple[Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


@dataclass
class _StepBuilder:
    budget: int
    prefill_budget: int
    chunks: list[ChunkPlan] = field(default_factory=list)
    loads: list[AdapterLoad] = field(default_factory=list)
    planned: list[tuple[Sequence, int]] = field(default_factory=list)
    adapters: set[str] = field(default_factory=set)  # adapters this step computes (their slots are pinned)
    preempted: set[int] = field(default_factory=set)  # seq ids this step preempted: not admitted again in it
    admitting: bool = True


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        blocks: BlockManager,
        adapters: AdapterSlots,
        eos_token_ids: tuple[int, ...],
        policy: SchedulingPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.adapters = adapters
        self.eos_token_ids = frozenset(eos_token_ids)
        self.policy: SchedulingPolicy = policy or FifoPolicy()
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_step_id = 0
        self.hold = SlotHold(adapters)  # slot_hold.py: an overdue request refused a slot
        # Which of a server's executors plans here (its pool sets it): step ids count per
        # executor, so a step log shared by several tells them apart by this.
        self.executor_index: int | None = None
        self.policy.attach(self)

    def replace_policy(self, policy: SchedulingPolicy) -> SchedulingPolicy:
        """Schedule with `policy` from now on; only before any request arrived (a policy's
        state is about the requests it has seen). Returns the policy it replaces."""
        if self.waiting or self.running:
            raise RuntimeError("a scheduling policy can only be replaced before any request arrives")
        replaced, self.policy = self.policy, policy
        policy.attach(self)
        return replaced

    # ------------------------------------------------------------------ queue management
    def sequences_using(self, adapter: str) -> int:
        """Sequences running or queued with this adapter."""
        return sum(1 for seq in (*self.waiting, *self.running) if seq.adapter == adapter)

    def add(self, seq: Sequence) -> None:
        if not seq.prompt_token_ids:
            raise ValueError("the prompt is empty")
        if seq.num_prompt_tokens >= self.limits.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_prompt_tokens} tokens; the context length is "
                f"{self.limits.max_model_len} and at least one new token must fit"
            )
        if -(-(seq.num_prompt_tokens + 1) // self.blocks.block_size) > self.blocks.num_blocks:
            raise ValueError(f"prompt needs more KV blocks than the cache has ({self.blocks.num_blocks})")
        if seq.adapter is not None and seq.adapter not in self.adapters.paths:
            raise ValueError(f"unknown adapter {seq.adapter!r}")
        seq.status = SequenceStatus.WAITING
        try:
            self.policy.on_arrival(seq, self.clock())
        except Exception as error:
            # Not the request's fault (so not a ValueError, which callers report as an invalid
            # request), and it must leave nothing queued: an orphan would run with no owner.
            raise PolicyError(f"the scheduling policy {self.policy.name!r} failed on this request: "
                              f"{type(error).__name__}: {error}") from error
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.CANCELLED) -> None:
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ planning
    def schedule(self) -> BatchPlan | None:
        now = self.clock()
        budget = self.limits.max_num_batched_tokens
        prefill_budget = min(budget, self.policy.max_prefill_tokens_per_step or budget)
        beside_decodes = self.limits.max_prefill_tokens_beside_decodes
        # Also for a decoding sequence this step pauses (β, slots, the ranking): it waits for
        # the whole step all the same, so the cap bounds its pause too.
        if beside_decodes is not None and beside_decodes < prefill_budget and any(
                seq.num_pending_tokens == 1 and seq.num_generated for seq in self.running):
            prefill_budget = beside_decodes
        step = _StepBuilder(budget=budget, prefill_budget=prefill_budget)
        order = self.policy.order(list(self.running), list(self.waiting), now)
        rank = {id(seq): position for position, seq in enumerate(order)}
        if len(rank) != len(order) or len(order) != len(self.running) + len(self.waiting) or any(
                id(seq) not in rank for seq in (*self.running, *self.waiting)):
            # a (plug-in) policy that left a sequence out would leave it unplanned, unanswered, forever
            raise PolicyError(f"policy {self.policy.name!r}: order() must return every running and waiting "
                              f"sequence once ({len(self.running) + len(self.waiting)}), returned {len(order)} "
                              f"({len(rank)} distinct)")
        plannable = order if self.policy.plannable is None else order[: self.policy.plannable]
        self._walk(plannable, order, rank, step, now)
        if not step.chunks and self.hold.seq is not None:
            # A hold must never leave the server idle (a fairness bound pausing the held
            # adapter's requests, its own refused for memory): dropped, the walk again.
            self.hold.release()
            step = _StepBuilder(budget=budget, prefill_budget=prefill_budget, preempted=step.preempted)
            self._walk(plannable, order, rank, step, now)
        if not step.chunks:
            return None
        plan = BatchPlan(step_id=self._next_step_id, chunks=step.chunks, adapter_loads=step.loads)
        self._next_step_id += 1
        self.policy.on_plan(plan, step.planned, now)
        return plan

    def _walk(self, plannable: list[Sequence], order: list[Sequence], rank: dict[int, int], step: _StepBuilder,
              now: float) -> None:
        """Plan `plannable` in its order into `step`, while the step's limits allow."""
        planned_ids: set[int] = set()
        self.hold.start_step(self.waiting, plannable)
        for seq in plannable:
            if len(step.chunks) >= self.limits.max_num_seqs or step.budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:
                self._plan_running(seq, step, order, rank, planned_ids, now)
            elif seq.status is SequenceStatus.WAITING and step.admitting and seq.seq_id in step.preempted:
                # Not admitted again in the step that preempted it (into the blocks left over it
                # recomputed its whole context, could not grow next step and preempted itself),
                # and as a memory refusal: nothing ranked below takes those blocks instead.
                step.admitting = False
            elif seq.status is SequenceStatus.WAITING and step.admitting and not self.hold.keeps_out(seq):
                self._plan_waiting(seq, step, order, rank, planned_ids, now)

    def _plan_running(self, seq: Sequence, step: _StepBuilder, order: list[Sequence], rank: dict[int, int],
                      planned_ids: set[int], now: float) -> None:
        num_tokens = self._tokens_for(seq, step)
        if not num_tokens or not self._adapter_fits(seq, step):
            return  # paused this step: it keeps its KV blocks
        if seq.adapter is not None and not self.adapters.can_acquire(seq.adapter, self.hold.pinned(seq, step.adapters)):
            return  # no slot this step (its adapter lost it while paused): nobody is preempted for it
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self._victim(seq, order, rank, planned_ids, now, include_self=True)
            assert victim is not None  # the sequence itself is a candidate
            self._preempt(victim, now)
            step.preempted.add(victim.seq_id)
            step.admitting = False  # admitting new work right after a preemption would only thrash
            if victim is seq:
                return
        if self._take_slot(seq, step):
            self._plan_chunk(seq, num_tokens, step, planned_ids, now)

    def _plan_waiting(self, seq: Sequence, step: _StepBuilder, order: list[Sequence], rank: dict[int, int],
                      planned_ids: set[int], now: float) -> None:
        overdue = self.policy.is_overdue(seq, now)
        num_tokens = self._tokens_for(seq, step)
        fits = num_tokens > 0 and self._adapter_fits(seq, step)
        slot_free = seq.adapter is None or self.adapters.can_acquire(seq.adapter, self.hold.pinned(seq, step.adapters))
        admissible = fits and slot_free
        if admissible:
            while not self.blocks.can_allocate(seq, num_tokens):
                victim = self._victim(seq, order, rank, planned_ids, now, include_self=False)
                if victim is None:
                    admissible = False
                    step.admitting = False  # no overtaking on memory
                    break
                self._preempt(victim, now)
                step.preempted.add(victim.seq_id)
        if admissible and self._take_slot(seq, step):
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.first_scheduled_at is None:
                seq.first_scheduled_at = now
            self.hold.admitted(seq)
            self.policy.on_admit(seq, now)
            self._plan_chunk(seq, num_tokens, step, planned_ids, now)
        elif overdue:
            # An overdue request is never overtaken; refused only for a slot, it gets a slot hold
            # instead (slot_hold.py), unless there is no slot to hold.
            if not (fits and not slot_free and self.hold.place(seq, step.adapters, self.running)):
                step.admitting = False

    @staticmethod
    def _tokens_for(seq: Sequence, step: _StepBuilder) -> int:
        """Tokens the sequence may compute this step: 1 for a decode, else a prefill chunk."""
        pending = seq.num_pending_tokens
        return min(pending, step.budget) if pending == 1 else min(pending, step.budget, step.prefill_budget)

    def _adapter_fits(self, seq: Sequence, step: _StepBuilder) -> bool:
        beta = self.policy.max_adapters_per_step
        return seq.adapter is None or seq.adapter in step.adapters or beta is None or len(step.adapters) < beta

    def _take_slot(self, seq: Sequence, step: _StepBuilder) -> bool:
        """A device slot for the sequence's adapter; False when every slot is in use."""
        if seq.adapter is None:
            return True
        # Only this step's adapters are pinned: a paused sequence's adapter may be evicted
        # for better-ranked work and is loaded again when it resumes.
        assignment = self.adapters.acquire(seq.adapter, self.hold.pinned(seq, step.adapters))
        if assignment is None:
            return False
        if assignment.loaded_now:
            step.loads.append(AdapterLoad(slot=assignment.slot, name=seq.adapter, path=self.adapters.paths[seq.adapter],
                                          signature=self.adapters.signatures.get(seq.adapter, "")))
        step.adapters.add(seq.adapter)
        return True

    def _victim(self, seq: Sequence, order: list[Sequence], rank: dict[int, int], planned_ids: set[int],
                now: float, include_self: bool) -> Sequence | None:
        """The running sequence, ranked below `seq` and not planned in this step, to preempt."""
        position = rank[id(seq)]
        candidates = [s for s in order[position + (0 if include_self else 1):]
                      if s.status is SequenceStatus.RUNNING and id(s) not in planned_ids]
        if not candidates:
            return None
        return self.policy.preemption_victim(candidates, now)

    def _plan_chunk(self, seq: Sequence, num_tokens: int, step: _StepBuilder, planned_ids: set[int],
                    now: float) -> None:
        self.blocks.allocate(seq, num_tokens)
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_tokens
        slot = self.adapters.slot_of(seq.adapter) if seq.adapter is not None else None
        seq.last_scheduled_at = now
        step.chunks.append(ChunkPlan(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids[start : start + num_tokens],
            start_pos=start,
            block_table=list(seq.block_table),
            adapter_slot=-1 if slot is None else slot,
            sample=seq.num_computed_tokens == len(seq.token_ids),
            sampling=seq.sampling,
            num_generated=seq.num_generated,
        ))  # fmt: skip
        step.planned.append((seq, num_tokens))
        step.budget -= num_tokens
        if num_tokens > 1 or seq.num_computed_tokens < len(seq.token_ids):
            step.prefill_budget -= num_tokens
        planned_ids.add(id(seq))

    def restart(self, seq: Sequence) -> None:
        """Put a running sequence back at the head of the queue with no KV (its executor is
        gone): its prompt is computed again when it is next planned."""
        if seq not in self.running:
            raise ValueError(f"sequence {seq.seq_id} is not running")
        self._preempt(seq, self.clock())

    def _preempt(self, seq: Sequence, now: float) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.policy.on_preempt(seq, now)

    # ------------------------------------------------------------------ results
    def process_result(self, result: StepResult, seqs_by_id: dict[int, Sequence]) -> StepUpdate:
        now = self.clock()
        self.policy.on_result(result, now)
        update = StepUpdate()
        for sampled in result.sampled:
            seq = seqs_by_id.get(sampled.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue  # cancelled while the step ran
            seq.token_ids.append(sampled.token_id)
            self.policy.on_token(seq, now)
            update.new_tokens.append((seq, sampled.token_id))
            reason = self._stop_reason(seq, sampled.token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                update.finished.append(seq)
        return update

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.sampling
        if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
            return FinishReason.STOP
        if seq.num_generated >= params.max_tokens:
            return FinishReason.LENGTH
        if len(seq.token_ids) >= self.limits.max_model_len:
            return FinishReason.CONTEXT
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a running sequence from outside (a stop string matched)."""
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.policy.on_finish(seq, self.clock())
