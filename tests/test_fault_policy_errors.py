"""A scheduling policy that fails on a request (a bug, or a predictor state gone bad) costs
that request alone: an `internal` error, counted as failed, and nothing of it left queued.

An outside probe loaded a predictor state whose intercept was 1e6: its prediction raised in
the policy's `on_arrival`, after the scheduler had queued the sequence. The request was
answered "internal server error" (or "invalid request", for a ValueError), the server's
`failed` counter stayed 0, and the queued sequence ran with nobody to answer.
"""

from __future__ import annotations

import asyncio

import msgspec

from inlaid.engine.block_manager import BlockManager
from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.scheduler import PolicyError, Scheduler, SchedulerLimits, SchedulingPolicy
from inlaid.engine.sequence import Sequence
from inlaid.protocol import ErrorCode, Generate, SamplingParams

FAILING_BUDGET = 5  # the failing policy fails on requests with this max_tokens


class FailsOnOneBudget(SchedulingPolicy):
    name = "fails-on-one-budget"

    def on_arrival(self, seq: Sequence, now: float) -> None:
        if seq.sampling.max_tokens == FAILING_BUDGET:
            raise OverflowError("cannot convert float infinity to integer")


def test_a_policy_failure_leaves_nothing_queued_and_is_not_called_an_invalid_request():
    scheduler = Scheduler(SchedulerLimits(8, 256, 128), BlockManager(16, 16), AdapterSlots(2), eos_token_ids=(0,),
                          policy=FailsOnOneBudget())
    bad = Sequence(seq_id=1, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=FAILING_BUDGET))
    try:
        scheduler.add(bad)
    except PolicyError as error:
        assert not isinstance(error, ValueError)  # callers report ValueError as the request's fault
        assert "fails-on-one-budget" in str(error) and "OverflowError" in str(error)
    else:
        raise AssertionError("the policy's failure was swallowed")
    assert not scheduler.waiting and not scheduler.has_work()
    good = Sequence(seq_id=2, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4))
    scheduler.add(good)
    plan = scheduler.schedule()
    assert plan is not None and [chunk.seq_id for chunk in plan.chunks] == [2]


def test_the_coordinator_answers_internal_counts_it_failed_and_serves_the_next(model_dir, tmp_path):
    """On the coordinator's real engine (no executor process), through its message handler."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    replies: list = []
    coordinator.in_flight._send = lambda identity, message: replies.append(message)
    coordinator._send = lambda identity, message: replies.append(message)  # type: ignore[method-assign]
    asyncio.run(coordinator.startup.release(coordinator._answer))  # as run() does once it serves (nothing held)
    engine = coordinator.pool.shards[0].engine
    engine.scheduler.replace_policy(FailsOnOneBudget())
    encode = msgspec.msgpack.Encoder().encode

    def send(request_id: str, max_tokens: int) -> None:
        message = Generate(request_id=request_id, prompt="Say hi", sampling=SamplingParams(max_tokens=max_tokens))
        coordinator._handle(b"client", [encode(message)])

    send("bad", FAILING_BUDGET)
    assert [(r.request_id, r.code) for r in replies] == [("bad", ErrorCode.INTERNAL)]
    assert not engine.scheduler.has_work() and not coordinator.in_flight.requests
    send("good", 4)
    assert len(replies) == 1 and (b"client", "good") in coordinator.in_flight.requests
    plan = engine.begin_step()
    assert plan is not None and len(plan.chunks) == 1
    counters = coordinator.counters
    assert counters["received"] == 2 and counters["failed"] == 1
    assert counters["received"] == (counters["finished"] + counters["failed"] + counters["overloaded"]
                                    + counters["rejected"] + counters["abandoned"] + len(coordinator.in_flight))
