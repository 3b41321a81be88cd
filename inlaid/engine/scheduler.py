"""Continuous batching: which sequences compute how many tokens in the next step. Torch-free.

Every step builds ONE ragged batch under a token budget: running sequences first (one
decode token each, or the rest of a chunked prefill), then waiting sequences in the
policy's order. When KV blocks run out the most recently admitted sequence is preempted
and later recomputed from its tokens. The coordinator process runs this same class.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.sequence import FinishReason, Sequence, SequenceStatus
from inlaid.protocol import AdapterLoad, BatchPlan, ChunkPlan, StepResult


class SchedulingPolicy(Protocol):
    """Orders the waiting queue; the multi-task policies plug in here."""

    def order_waiting(self, waiting: list[Sequence]) -> list[Sequence]: ...


class FifoPolicy:
    def order_waiting(self, waiting: list[Sequence]) -> list[Sequence]:
        return waiting


@dataclass
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass
class StepUpdate:
    """What one step changed: new tokens per sequence, and the sequences that finished."""

    new_tokens: list[tuple[Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        blocks: BlockManager,
        adapters: AdapterSlots,
        eos_token_ids: tuple[int, ...],
        policy: SchedulingPolicy | None = None,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.adapters = adapters
        self.eos_token_ids = frozenset(eos_token_ids)
        self.policy: SchedulingPolicy = policy or FifoPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_step_id = 0

    # ------------------------------------------------------------------ queue management
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
        budget = self.limits.max_num_batched_tokens
        chunks: list[ChunkPlan] = []
        loads: list[AdapterLoad] = []
        preempted_now = False

        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_tokens = min(seq.num_pending_tokens, budget)
            while not self.blocks.can_allocate(seq, num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                preempted_now = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            chunks.append(self._plan_chunk(seq, num_tokens))
            budget -= num_tokens

        # Admitting new work right after a preemption would only thrash the cache.
        if not preempted_now:
            pinned = {s.adapter for s in self.running if s.adapter is not None}
            for seq in list(self.policy.order_waiting(list(self.waiting))):
                if len(self.running) >= self.limits.max_num_seqs or budget == 0:
                    break
                num_tokens = min(seq.num_pending_tokens, budget)
                if not self.blocks.can_allocate(seq, num_tokens):
                    break
                if seq.adapter is not None:
                    assignment = self.adapters.acquire(seq.adapter, pinned)
                    if assignment is None:
                        continue  # every slot is pinned by running work; try a later request
                    if assignment.loaded_now:
                        loads.append(
                            AdapterLoad(slot=assignment.slot, name=seq.adapter, path=self.adapters.paths[seq.adapter])
                        )
                    pinned.add(seq.adapter)
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                chunks.append(self._plan_chunk(seq, num_tokens))
                budget -= num_tokens

        if not chunks:
            return None
        plan = BatchPlan(step_id=self._next_step_id, chunks=chunks, adapter_loads=loads)
        self._next_step_id += 1
        return plan

    def _plan_chunk(self, seq: Sequence, num_tokens: int) -> ChunkPlan:
        self.blocks.allocate(seq, num_tokens)
        start = seq.num_computed_tokens
        seq.num_computed_tokens += num_tokens
        slot = self.adapters.slot_of(seq.adapter) if seq.adapter is not None else None
        return ChunkPlan(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids[start : start + num_tokens],
            start_pos=start,
            block_table=list(seq.block_table),
            adapter_slot=-1 if slot is None else slot,
            sample=seq.num_computed_tokens == len(seq.token_ids),
            sampling=seq.sampling,
            num_generated=seq.num_generated,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ results
    def process_result(self, result: StepResult, seqs_by_id: dict[int, Sequence]) -> StepUpdate:
        update = StepUpdate()
        for sampled in result.sampled:
            seq = seqs_by_id.get(sampled.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue  # cancelled while the step ran
            seq.token_ids.append(sampled.token_id)
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
