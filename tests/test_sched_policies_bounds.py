"""The scheduling policies' bounds on simulated traces: aging against SRTF's starvation (an overdue request is
never overtaken), MLFQ's starvation lift, fairness between tasks."""

from __future__ import annotations

import random

import pytest

from inlaid.engine.scheduler import Scheduler
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.simulator import EngineShape, simulate
from inlaid.scheduling.traces import Trace, TraceSpec, generate_trace
from test_sched_policies import COST, FAMILIES, _check_outputs, _known_lengths, _records, _trace


def _srtf_starvation_trace() -> Trace:
    # Two seats; for 12 s short requests arrive faster than the seats clear them, so
    # shortest-first alone admits the two long requests only when the short stream ends.
    requests = [(0.2, "long", 30, 40), (0.21, "long", 30, 40)]
    requests += [(0.03 * i, "short", 30, 3) for i in range(400)]
    return _trace(sorted(requests))


def _idle(record) -> float:
    """The longest time a request made no progress: before it was first scheduled, or
    between two of its tokens (paused)."""
    return max(record.wait_s, record.max_stall_s)


def test_aging_bounds_the_wait_that_srtf_alone_would_starve():
    trace = _srtf_starvation_trace()
    shape = EngineShape(max_num_seqs=2)
    model = _known_lengths({"long": 40, "short": 3})
    max_wait = 2.0
    aged = simulate(trace, make_policy("inlaid", {"max_wait_s": max_wait}, length_model=model), COST, shape)
    unaged = simulate(trace, make_policy("inlaid", {"max_wait_s": 1e6}, length_model=model), COST, shape)
    _check_outputs(trace, aged)
    _check_outputs(trace, unaged)
    # Once overdue, a long request waits at most for the running work ahead of it to finish.
    drain = max(s.seconds for s in aged.steps) * (40 + 2)
    longs = [i for i, r in enumerate(trace.requests) if r.task == "long"]
    assert max(_idle(aged.requests[i]) for i in longs) <= max_wait + drain
    assert min(_idle(unaged.requests[i]) for i in longs) > 2 * (max_wait + drain), "SRTF alone must starve here"


@pytest.mark.parametrize("seed", [4, 5])
def test_aging_keeps_the_longest_wait_within_fifos_plus_the_bound(seed):
    """Bursty traffic below capacity: no request waits longer under `inlaid` than the
    longest FIFO wait plus max_wait_s plus one drain of the running batch."""
    shape = EngineShape(max_num_seqs=6, max_lora_slots=4)
    trace = generate_trace(TraceSpec(rate=4.0, num_requests=300, cv=4.0, num_tasks=8, seed=seed), _records(seed))
    max_wait = 3.0
    inlaid = simulate(trace, make_policy("inlaid", {"max_wait_s": max_wait, "max_adapters_per_step": 2,
                                                    "predictor": "task-mean"}), COST, shape)
    fifo = simulate(trace, make_policy("fifo"), COST, shape)
    drain = max(s.seconds for s in inlaid.steps) * (max(FAMILIES[f][2] for f in FAMILIES) + 2)
    fifo_idle = max(_idle(r) for r in fifo.requests)
    assert fifo_idle > 1.0, "the trace must queue"
    assert max(_idle(r) for r in inlaid.requests) <= fifo_idle + max_wait + drain


@pytest.mark.parametrize("seed", [4, 5, 6, 7])
def test_an_overdue_request_is_never_overtaken(seed):
    """At every step: while an overdue request still waits, every request admitted in that
    step is an overdue one that arrived before it (overdue requests go first, oldest first, and
    nothing ranked after one that does not fit is admitted: KV, seats, β or slots). Checked on
    randomized traces where requests do go overdue and stay waiting."""
    rng = random.Random(seed)
    shape = EngineShape(max_num_seqs=rng.choice([4, 6]), max_num_batched_tokens=rng.choice([128, 256]), block_size=8,
                        num_kv_blocks=rng.choice([110, 200]), max_lora_slots=rng.choice([2, 4]))
    spec = TraceSpec(rate=rng.choice([5.0, 8.0]), num_requests=200, cv=rng.choice([1.0, 4.0]), num_tasks=8,
                     popularity=rng.choice(["uniform", "zipf"]), alpha=1.2, base_fraction=0.2, seed=seed)
    trace = generate_trace(spec, _records(seed))
    policy = make_policy("inlaid", {"max_wait_s": 1.0, "max_adapters_per_step": 2, "first_token_after_s": 0.3,
                                    "predictor": "task-mean"})
    running_before: set[int] = set()
    held_steps = [0]

    def check(plan, scheduler: Scheduler) -> None:
        now = scheduler.clock()
        admitted = [s for s in scheduler.running if s.seq_id not in running_before]
        # (one preempted in this step counts from its arrival again only from the next step on)
        still_waiting = [s for s in scheduler.waiting
                         if s.seq_id not in running_before and scheduler.policy.is_overdue(s, now)]
        if still_waiting:
            held_steps[0] += 1
            oldest = min((s.arrival_time, s.seq_id) for s in still_waiting)
            for seq in admitted:
                assert scheduler.policy.is_overdue(seq, now) and (seq.arrival_time, seq.seq_id) < oldest, \
                    f"request {seq.seq_id} overtook overdue request {oldest}"
        running_before.clear()
        running_before.update(s.seq_id for s in scheduler.running)

    result = simulate(trace, policy, COST, shape, on_plan=check)
    _check_outputs(trace, result)
    assert held_steps[0] > 0, "the trace must leave overdue requests waiting"


def test_mlfq_lifts_a_request_starved_by_a_flood_of_short_ones():
    """FastServe's starvation rule: a long request demoted below a stream of short ones that
    fills every seat goes back to the top level after `starvation_s` without service, where it
    queues behind the short requests already there. Without the rule it waits for the stream
    to end."""
    requests = [(0.0, "long", 30, 60)] + [(0.01 + 0.05 * i, "short", 30, 3) for i in range(600)]
    trace = _trace(requests)
    shape = EngineShape(max_num_seqs=2)
    starvation = 1.0
    lifted = simulate(trace, make_policy("mlfq", {"starvation_s": starvation}), COST, shape)
    unlifted = simulate(trace, make_policy("mlfq", {"starvation_s": 1e6}), COST, shape)
    _check_outputs(trace, lifted)
    _check_outputs(trace, unlifted)
    queue_ahead = max(r.wait_s for r in lifted.requests[1:])  # the level-0 queue it joins when lifted
    bound = starvation + queue_ahead + max(s.seconds for s in lifted.steps)
    assert _idle(lifted.requests[0]) <= bound
    assert _idle(unlifted.requests[0]) > 2 * bound, "the flood must starve it without the rule"
    assert unlifted.requests[0].finish_s > requests[-1][0], "unlifted, it runs once the stream has ended"


def test_fairness_bounds_hold_where_fifo_and_srtf_let_a_task_fall_behind():
    # Task "heavy" floods the queue with cheap requests; "light" sends few long ones.
    requests = [(0.02 * i, "heavy", 40, 4) for i in range(500)]
    requests += [(0.5 * i, "light", 40, 40) for i in range(20)]
    trace = _trace(sorted(requests))
    shape = EngineShape(max_num_seqs=4)
    model = _known_lengths({"heavy": 4, "light": 40})
    bound = 600.0
    gaps = {}
    for label, name, options in [("fifo", "fifo", {}), ("vtc", "vtc", {}),
                                 ("srtf", "inlaid", {"max_wait_s": 1e6}),
                                 ("fair", "inlaid", {"max_wait_s": 1e6, "fairness_bound": bound})]:
        result = simulate(trace, make_policy(name, options, length_model=model if name == "inlaid" else None), COST, shape)
        _check_outputs(trace, result)
        gaps[label] = result.service_gap
    largest_request = 40 + 2 * 40
    assert gaps["vtc"] <= 2 * largest_request * shape.max_num_seqs
    assert gaps["fair"] <= bound + 2 * largest_request * shape.max_num_seqs
    assert gaps["srtf"] > 2 * gaps["fair"]


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_fairness_bound_holds_at_every_step_on_randomized_traces(seed):
    """With fairness_bound = B the VTC counters of any two backlogged tasks never differ by
    more than B + one request's charge (its prompt + one output token), at every step,
    whatever the arrivals, popularity, β, overdue requests and first-token rule do; and
    every request still finishes."""
    rng = random.Random(seed)
    shape = EngineShape(max_num_seqs=rng.choice([4, 8]), max_num_batched_tokens=rng.choice([128, 512]), block_size=8,
                        num_kv_blocks=rng.choice([160, 400]), max_lora_slots=rng.choice([2, 4]))
    spec = TraceSpec(rate=rng.choice([4.0, 8.0]), num_requests=160, cv=rng.choice([1.0, 4.0]), num_tasks=rng.choice([3, 8]),
                     popularity=rng.choice(["uniform", "zipf"]), alpha=1.2, base_fraction=0.2, seed=seed)
    trace = generate_trace(spec, _records(seed))
    bound = rng.choice([100.0, 400.0])
    slack = max(r.prompt_tokens for r in trace.requests) + 2.0
    policy = make_policy("inlaid", {"fairness_bound": bound, "max_adapters_per_step": 2, "max_wait_s": 2.0,
                                    "first_token_after_s": 0.2, "predictor": "task-mean"})
    gaps: list[float] = []
    result = simulate(trace, policy, COST, shape, on_plan=lambda plan, scheduler: gaps.append(_counter_gap(scheduler)))
    _check_outputs(trace, result)
    assert gaps and max(gaps) <= bound + slack
    # The bound binds: with an unreachable bound (counters kept, nothing held back) the
    # same trace lets a task run further ahead.
    unbounded = make_policy("inlaid", {"fairness_bound": 1e12, "max_adapters_per_step": 2, "max_wait_s": 2.0,
                                       "first_token_after_s": 0.2, "predictor": "task-mean"})
    free_gaps: list[float] = []
    simulate(trace, unbounded, COST, shape, on_plan=lambda plan, scheduler: free_gaps.append(_counter_gap(scheduler)))
    assert max(free_gaps) > bound + slack


def _counter_gap(scheduler: Scheduler) -> float:
    """The largest difference between the policy's VTC counters of two backlogged tasks."""
    service = scheduler.policy.service
    counters = [service.counter(t) for t in service.backlogged()]
    return max(counters) - min(counters) if len(counters) > 1 else 0.0
