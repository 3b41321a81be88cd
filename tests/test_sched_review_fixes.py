"""Defects a review of the scheduling code found, each driven on the real Scheduler,
BlockManager, AdapterSlots, policies, simulator and predictor:

1. A paused running request whose adapter had lost its slot preempted another request for
   KV room, then found no slot and did not run: the victim's KV was lost for nothing.
2. Under `fairness_bound`, the row target counted the plannable requests' adapters, but the
   order the scheduler walks still led with the adapters counted before the bound: another
   adapter took the counted place and the shortest plannable request's was left out.
3. The simulator called a 10,000-token prompt at one prefill token a step a livelock.
4. A predictor state with unsigned reservoir lengths raised a raw TypeError at load; one with
   complex feature values loaded, then failed every refit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_sched_policies import COST
from test_sched_tune_predictor_fixes import _saved_state

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import Scheduler, SchedulerLimits
from inlaid.engine.sequence import Sequence, SequenceStatus
from inlaid.predictor import TaskMeanPredictor
from inlaid.protocol import SamplingParams
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.simulator import EngineShape, simulate
from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest


def _lengths(by_task: dict[str | None, int]) -> TaskMeanPredictor:
    model = TaskMeanPredictor()
    for task, tokens in by_task.items():
        model.observe(task, [], tokens)
    return model


def test_a_paused_request_with_no_slot_preempts_nobody():
    """One slot, held by A; B (paused, its adapter evicted meanwhile) ranks above the base
    request C, and the cache is full: B preempted C for a block, then found no slot; C, whose
    next token fit its blocks, lost its KV for nothing."""
    policy = make_policy("inlaid", {"max_adapters_per_step": 0, "batch_rows_target": 0, "first_token_first": False,
                                    "prefill_weight": 0.0}, length_model=_lengths({"A": 2, "B": 10, None: 60}))
    slots = AdapterSlots(1)
    slots.register("A", "sim://A")
    slots.register("B", "sim://B")
    scheduler = Scheduler(SchedulerLimits(8, 256, 4096), BlockManager(6, 4), slots, (0,), policy, clock=lambda: 0.5)

    def running(seq_id: int, adapter: str | None, prompt_tokens: int) -> Sequence:
        seq = Sequence(seq_id=seq_id, prompt_token_ids=[7] * prompt_tokens, sampling=SamplingParams(max_tokens=64),
                       adapter=adapter, arrival_time=0.0)
        scheduler.add(seq)
        scheduler.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        scheduler.running.append(seq)
        scheduler.blocks.allocate(seq, prompt_tokens)
        seq.num_computed_tokens = prompt_tokens
        seq.token_ids.append(1)
        seq.first_scheduled_at = seq.last_scheduled_at = 0.0
        return seq

    running(0, "A", 3)
    running(1, "B", 8)
    base = running(2, None, 11)  # its next token fits its blocks; B's needs a block more
    slots.acquire("A", set())  # A holds the only slot
    assert scheduler.blocks.num_free_blocks == 0
    plan = scheduler.schedule()
    assert plan is not None and [chunk.seq_id for chunk in plan.chunks] == [0, 2]
    # (computed: its 11 prompt tokens and the token this step computes)
    assert (base.status, base.num_preemptions, base.num_computed_tokens) == (SequenceStatus.RUNNING, 0, 12)


def _fair_scheduler(counters: dict[str, float]) -> tuple[Scheduler, object]:
    policy = make_policy("inlaid", {"fairness_bound": 100.0, "batch_rows_target": 1, "max_adapters_per_step": 8,
                                    "first_token_first": False}, length_model=_lengths({"Y": 1, "X": 3, "F": 4}))
    slots = AdapterSlots(8)
    for adapter in "XYF":
        slots.register(adapter, f"sim://{adapter}")
    scheduler = Scheduler(SchedulerLimits(16, 4096, 4096), BlockManager(1000, 16), slots, (0,), policy,
                          clock=lambda: 1.0)
    seq_id = 0
    for task, count in (("Y", 2), ("X", 1), ("F", 6)):
        for _ in range(count):
            scheduler.add(Sequence(seq_id=seq_id, prompt_token_ids=[5] * 10, sampling=SamplingParams(max_tokens=64),
                                   adapter=task, arrival_time=0.0))
            seq_id += 1
    policy.service.counters.update(counters)  # type: ignore[attr-defined]
    return scheduler, policy


def test_under_a_fairness_bound_the_counted_adapters_lead_the_step():
    """Y, served 500 units more, is held back; X's request is then the shortest plannable one
    and its adapter the one counted (β 1), yet F's took the place."""
    scheduler, policy = _fair_scheduler({"Y": 500.0})
    plan = scheduler.schedule()
    assert policy.max_adapters_per_step == 1 and policy.plannable == 7  # type: ignore[attr-defined]
    by_id = {seq.seq_id: seq for seq in scheduler.running}
    assert plan is not None and {by_id[chunk.seq_id].adapter for chunk in plan.chunks} == {"X"}
    # Nothing held back: the order is the one without the bound (Y's shortest request leads).
    scheduler, policy = _fair_scheduler({})
    plan = scheduler.schedule()
    by_id = {seq.seq_id: seq for seq in scheduler.running}
    assert plan is not None and {by_id[chunk.seq_id].adapter for chunk in plan.chunks} == {"Y"}


def test_a_long_prompt_at_one_prefill_token_a_step_is_no_livelock():
    shape = EngineShape(max_num_seqs=8, max_num_batched_tokens=2048, block_size=16, num_kv_blocks=2048,
                        max_model_len=16384)
    trace = Trace([TraceRequest(0.0, "t", 10_500, 4, 16, "t/0")], {"t": TaskProfile("t", "t", 8)})
    result = simulate(trace, make_policy("inlaid", {"max_prefill_tokens_per_step": 1, "predictor": "task-mean"}),
                      COST, shape)
    assert result.requests[0].finished and len(result.steps) == 10_500 + 3  # a prompt token a step, then decodes


def test_a_predictor_state_with_unsigned_lengths_loads_and_complex_values_are_refused(tmp_path: Path):
    from inlaid.predictor import OnlineLengthPredictor, PredictorStateError

    state = _saved_state(tmp_path)
    good = OnlineLengthPredictor.load(tmp_path / "good.npz")
    np.savez(tmp_path / "unsigned.npz", **{**state, "reservoir_lengths": state["reservoir_lengths"].astype(np.uint8)})
    unsigned = OnlineLengthPredictor.load(tmp_path / "unsigned.npz")
    assert unsigned.size == good.size == 40
    assert [unsigned.predict("qa", list(range(n))) for n in range(2, 9)] == [
        good.predict("qa", list(range(n))) for n in range(2, 9)]
    complex_values = state["reservoir_values"].astype(np.complex64)
    np.savez(tmp_path / "complex.npz", **{**state, "reservoir_values": complex_values})
    with pytest.raises(PredictorStateError, match="complex.npz .*reservoir feature values are complex64"):
        OnlineLengthPredictor.load(tmp_path / "complex.npz")
