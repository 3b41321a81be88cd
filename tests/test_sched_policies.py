"""Scheduling policies on randomized traces, through the real Scheduler (simulated executor).

Invariants checked on every planned step, for every policy: the step's limits (sequences,
tokens, β distinct adapters, slots), KV blocks never shared or exceeded, every request
finishes with exactly its output; then the scenarios peers got wrong (one adapter per
batch starving B in A,B,A,A..., N adapters + a base row past the cap), MLFQ's pausing,
and shortest-first order against a hand-computed schedule. The aging and fairness bounds
are in test_sched_policies_bounds.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
import unittest.mock

import pytest

from inlaid.engine.scheduler import Scheduler
from inlaid.engine.sequence import Sequence, SequenceStatus
from inlaid.predictor import TaskMeanPredictor
from inlaid.protocol import BatchPlan, SamplingParams
from inlaid.scheduling.cost_model import StepCostModel
from inlaid.scheduling.estimates import remaining_tokens
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.simulator import EngineShape, simulate
from inlaid.scheduling.suite import SuiteRecord
from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest, TraceSpec, generate_trace

# A simple linear step cost: the invariants do not depend on it.
COST = StepCostModel({"constant": 0.02, "tokens": 0.001, "sampled": 0.0005, "adapters": 0.004, "loads": 0.01})
FAMILIES = {"short": (40, 2, 8), "mid": (120, 12, 32), "long": (60, 48, 64), "prefill": (600, 6, 16)}


def _records(seed: int = 0) -> list[SuiteRecord]:
    rng = random.Random(seed)
    records = []
    for family, (prompt, output, budget) in FAMILIES.items():
        for index in range(40):
            out = max(1, min(budget, output + rng.randint(-output // 2, output // 2)))
            records.append(SuiteRecord(f"{family}/eval/{index}", family, "eval", prompt + rng.randint(-20, 20), out,
                                       out, budget, "stop"))
    return records


POLICIES = {
    "fifo": ("fifo", {}),
    "inlaid": ("inlaid", {"max_adapters_per_step": 2, "max_wait_s": 3.0, "first_token_after_s": 0.5,
                          "max_prefill_tokens_per_step": 64, "predictor": "task-mean"}),
    "inlaid-nonpreemptive": ("inlaid", {"max_adapters_per_step": 2, "max_wait_s": 3.0, "preemptive": False,
                                        "first_token_first": False, "group_by_adapter": False, "predictor": "task-mean"}),
    "inlaid-fair": ("inlaid", {"max_adapters_per_step": 2, "max_wait_s": 3.0, "fairness_bound": 400.0,
                               "predictor": "task-mean"}),
    "inlaid-seats": ("inlaid", {"max_adapters_per_step": 2, "max_wait_s": 3.0, "first_token_after_s": 0.5,
                                "first_token_within_seats": True, "predictor": "task-mean"}),
    "mlfq": ("mlfq", {"starvation_s": 3.0}),
    "vtc": ("vtc", {}),
}


class InvariantChecker:
    """Called with every plan: the limits hold and the KV/slot bookkeeping is consistent."""

    def __init__(self, shape: EngineShape, beta: int | None) -> None:
        self.shape = shape
        self.beta = beta
        self.steps = 0
        self.max_adapters = 0
        self.paused_steps = 0
        self.base_rows_checked = 0  # steps at β with room and a base row running
        self.capped_steps = 0  # steps with a decode under a cap on prompt tokens beside decodes

    def __call__(self, plan: BatchPlan, scheduler: Scheduler) -> None:
        self.steps += 1
        by_id = {s.seq_id: s for s in scheduler.running}
        assert len(plan.chunks) <= self.shape.max_num_seqs
        assert sum(len(c.token_ids) for c in plan.chunks) <= self.shape.max_num_batched_tokens
        assert len({c.seq_id for c in plan.chunks}) == len(plan.chunks)
        adapters = set()
        for chunk in plan.chunks:
            seq = by_id[chunk.seq_id]  # only running sequences compute
            assert seq.status is SequenceStatus.RUNNING
            if seq.adapter is None:
                assert chunk.adapter_slot == -1
            else:
                adapters.add(seq.adapter)
                assert scheduler.adapters.slot_of(seq.adapter) == chunk.adapter_slot
        if self.beta is not None:
            assert len(adapters) <= self.beta
        assert len(adapters) <= self.shape.max_lora_slots
        cap = self.shape.max_prefill_tokens_beside_decodes
        if cap is not None and any(len(c.token_ids) == 1 and c.sample and by_id[c.seq_id].num_generated
                                   for c in plan.chunks):
            self.capped_steps += 1  # a decode in the step: its prompt tokens within the cap (one-token
            # chunks that sample, a prompt's last token among them, count as decodes, as for every budget)
            assert sum(len(c.token_ids) for c in plan.chunks if not (len(c.token_ids) == 1 and c.sample)) <= cap
        if scheduler.policy.max_prefill_tokens_per_step:  # the policy's own cap on prompt tokens
            assert sum(len(c.token_ids) for c in plan.chunks if not (len(c.token_ids) == 1 and c.sample)) <= \
                scheduler.policy.max_prefill_tokens_per_step
        self.max_adapters = max(self.max_adapters, len(adapters))
        self.paused_steps += len(scheduler.running) > len(plan.chunks)
        blocks = [b for s in scheduler.running for b in s.block_table]
        assert len(blocks) == len(set(blocks)), "a KV block is held by two sequences"
        assert len(blocks) + scheduler.blocks.num_free_blocks == self.shape.num_kv_blocks
        for seq in scheduler.running:
            assert len(seq.block_table) * self.shape.block_size >= seq.num_computed_tokens
        for seq in scheduler.waiting:
            assert not seq.block_table and seq.num_computed_tokens == 0
        # Base-model rows never count toward β: with a seat and token budget left, no running
        # base decode sits out a step (only the fairness bound's cut may hold it back).
        planned = {c.seq_id for c in plan.chunks}
        room = (len(plan.chunks) < self.shape.max_num_seqs
                and sum(len(c.token_ids) for c in plan.chunks) < self.shape.max_num_batched_tokens)
        if room and getattr(scheduler.policy, "plannable", None) is None:
            left_out = [s.seq_id for s in scheduler.running
                        if s.adapter is None and s.num_pending_tokens == 1 and s.seq_id not in planned]
            assert not left_out, f"base decodes {left_out} sat out a step with room"
            self.base_rows_checked += any(s.adapter is None for s in scheduler.running) and len(adapters) == self.beta


def _check_outputs(trace: Trace, result) -> None:
    for request, record in zip(trace.requests, result.requests):
        assert record.finished
        assert len(record.token_times) == request.output_tokens
        assert record.token_times == sorted(record.token_times)
        assert record.admitted_s is not None and record.admitted_s >= request.arrival_s


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("label", list(POLICIES))
def test_every_policy_finishes_every_request_within_the_limits(label, seed):
    rng = random.Random(seed)
    # Small cache, few slots and seats: preemption, pausing, evictions and β all happen.
    shape = EngineShape(max_num_seqs=rng.choice([4, 6]), max_num_batched_tokens=rng.choice([96, 256]),
                        block_size=8, num_kv_blocks=rng.choice([110, 160]), max_lora_slots=3)
    spec = TraceSpec(rate=rng.choice([3.0, 6.0]), num_requests=120, cv=rng.choice([1.0, 4.0]), num_tasks=12,
                     popularity=rng.choice(["uniform", "zipf", "power"]), alpha=0.7, base_fraction=0.25, seed=seed)
    trace = generate_trace(spec, _records(seed))
    if seed % 2:  # the cap on prompt tokens beside decodes (the CPU's default) bounds the others
        shape = dataclasses.replace(shape, max_prefill_tokens_beside_decodes=rng.choice([8, 40]))
    name, options = POLICIES[label]
    checker = InvariantChecker(shape, options.get("max_adapters_per_step"))
    result = simulate(trace, make_policy(name, options), COST, shape, on_plan=checker)
    _check_outputs(trace, result)
    assert checker.steps == len(result.steps)
    # The traces exercise what the checker guards (else it would pass vacuously): pausing
    # where a policy pauses, and steps at β with a base row running.
    if name in ("inlaid", "mlfq"):
        assert checker.paused_steps > 0
    if checker.beta is not None and "fairness_bound" not in options:
        assert checker.base_rows_checked > 0
    assert (checker.capped_steps > 0) == (shape.max_prefill_tokens_beside_decodes is not None)


def test_first_tokens_within_seats_keep_a_burst_from_thrashing_the_kv_cache():
    """A burst far beyond the seats, every request waiting past first_token_after_s: the
    first-token rule promotes every prompt above the running decodes, so ever more requests
    hold KV while few of them decode, until the cache runs out and started requests are
    preempted and computed again. Promoting only into free seats keeps fewer requests
    started at once: far fewer recomputations, the burst done sooner, a lower mean latency."""
    rng = random.Random(5)
    shape = EngineShape(max_num_seqs=8, max_num_batched_tokens=512, block_size=8, num_kv_blocks=400, max_lora_slots=4)
    requests = [(0.0, f"t{rng.randrange(6)}", rng.randint(60, 200), rng.randint(8, 48)) for _ in range(120)]
    trace = _trace(requests)
    base = {"first_token_after_s": 1.0, "predictor": "task-mean"}

    def run(options: dict):  # type: ignore[no-untyped-def]
        most_started = [0]

        def watch(plan: BatchPlan, scheduler: Scheduler) -> None:
            most_started[0] = max(most_started[0], sum(s.num_computed_tokens > 0 for s in scheduler.running))

        result = simulate(trace, make_policy("inlaid", {**base, **options}), COST, shape, on_plan=watch)
        _check_outputs(trace, result)
        span = max(r.finish_s for r in result.requests)
        mean = sum(r.latency_s for r in result.requests) / len(result.requests)
        return sum(r.preemptions for r in result.requests), most_started[0], span, mean

    promoted = run({})
    within = run({"first_token_within_seats": True})
    assert within[0] < 0.5 * promoted[0], (within, promoted)  # recomputed prompts
    assert within[1] < promoted[1], (within, promoted)  # requests holding computed KV at once
    assert within[2] < promoted[2] and within[3] < 0.8 * promoted[3], (within, promoted)


def _trace(requests: list[tuple[float, str | None, int, int]], ranks: int = 8) -> Trace:
    tasks = {t: TaskProfile(t, t, ranks) for _, t, _, _ in requests if t is not None}
    return Trace([TraceRequest(at, task, prompt, out, max(out, 64), f"{task}/{i}")
                  for i, (at, task, prompt, out) in enumerate(requests)], tasks)


def test_one_adapter_per_step_still_runs_b_in_an_a_b_a_a_stream():
    """sglang PR #15129: with one adapter per batch a queue A,B,A,A,... never ran B. With
    β = 1 and A requests arriving faster than they finish, B must still run in bounded time
    once it is overdue, and its wait must be bounded by max_wait_s + one drain of A."""
    stream = [(0.05 * i, "A", 30, 20) for i in range(400)]
    stream.insert(3, (0.12, "B", 30, 5))
    trace = _trace(stream)
    shape = EngineShape(max_num_seqs=8, max_lora_slots=4)
    max_wait = 2.0
    checker = InvariantChecker(shape, 1)
    result = simulate(trace, make_policy("inlaid", {"max_adapters_per_step": 1, "max_wait_s": max_wait,
                                                    "predictor": "task-mean"}), COST, shape, on_plan=checker)
    _check_outputs(trace, result)
    assert checker.max_adapters == 1
    b_record = result.requests[3]
    assert b_record.task == "B"
    drain = max(s.seconds for s in result.steps) * (20 + 2)  # the running A requests finish
    assert b_record.wait_s <= max_wait + drain
    assert b_record.finish_s < result.requests[-1].arrival_s, "B ran while A kept arriving"


def test_beta_adapters_plus_base_rows_never_deadlock():
    """sglang #23141: N adapters plus one base request past the per-batch adapter cap
    crashed the scheduler. Base rows do not count towards β: they join the batch."""
    requests = [(0.0, f"t{i}", 20, 10) for i in range(3)] + [(0.0, None, 20, 10)] + [(0.0, f"t{i}", 20, 10) for i in range(3, 6)]
    trace = _trace(requests)
    shape = EngineShape(max_num_seqs=8, max_lora_slots=3)
    for beta in (1, 3):
        checker = InvariantChecker(shape, beta)
        result = simulate(trace, make_policy("inlaid", {"max_adapters_per_step": beta, "predictor": "task-mean"}),
                          COST, shape, on_plan=checker)
        _check_outputs(trace, result)
        first_step = result.steps[0]
        assert first_step.adapters == beta and first_step.num_seqs == beta + 1  # the base row rides along


def _known_lengths(lengths: dict[str, int]) -> TaskMeanPredictor:
    model = TaskMeanPredictor()
    for task, n in lengths.items():
        model.observe(task, [], n)
    return model


def test_shortest_first_matches_a_hand_computed_schedule():
    """One seat, all requests queued at t=0, lengths known: SJF order and its mean JCT."""
    lengths = {"a": 9, "b": 2, "c": 5, "d": 1}
    trace = _trace([(0.0, task, 10, n) for task, n in lengths.items()])
    model = _known_lengths(lengths)
    cost = StepCostModel({"constant": 1.0})  # every step takes one second
    shape = EngineShape(max_num_seqs=1)
    result = simulate(trace, make_policy("inlaid", {"prefill_weight": 0.0, "batch_bonus_tokens": 0.0,
                                                    "resident_bonus_tokens": 0.0, "first_token_first": False},
                                         length_model=model), cost, shape)
    finish = {r.task: r.finish_s for r in result.requests}
    # A request of n tokens takes n steps (prefill samples the first token).
    expected, clock = {}, 0.0
    for task in sorted(lengths, key=lengths.get):
        clock += lengths[task]
        expected[task] = clock
    assert finish == expected
    fifo = simulate(trace, make_policy("fifo"), cost, shape)
    assert sum(finish.values()) < sum(r.finish_s for r in fifo.requests)


def test_overrun_prediction_is_reranked_not_starved():
    seq = Sequence(seq_id=0, prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=100))
    seq.predicted_output_tokens = 4.0
    estimates = []
    for _ in range(40):
        estimates.append(remaining_tokens(seq))
        seq.token_ids.append(7)
    assert all(e >= 1 for e in estimates)
    assert estimates[:4] == [4, 3, 2, 1]
    assert estimates[4] == 4 and estimates[8] == 8  # exceeded: the predicted total doubles
    seq.token_ids.extend([7] * 55)  # 95 generated: the budget caps the estimate
    assert remaining_tokens(seq) == 5


@pytest.mark.parametrize("target, beta, expected", [(10, 8, 1), (12, 8, 2), (16, 8, 3), (16, 2, 2), (0, 8, 8)])
def test_a_step_takes_only_the_adapters_it_needs_to_fill_its_rows(target, beta, expected):
    """Adapter A has 10 short requests, B 3 and C 5 (longer), plus base rows that never
    count as adapters: A's group ranks first, so 10 rows need A alone, 12 need a second
    adapter, 16 all three unless β stops it; a target of 0 keeps β."""
    lengths = {"A": 2, "B": 20, "C": 20}
    policy = make_policy("inlaid", {"batch_rows_target": target, "max_adapters_per_step": beta, "first_token_first": False},
                         length_model=_known_lengths({**lengths, None: 40}))
    waiting = []
    for adapter, count in (("A", 10), ("B", 3), ("C", 5), (None, 2)):
        for _ in range(count):
            seq = Sequence(seq_id=len(waiting), prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=64),
                           adapter=adapter, arrival_time=0.0)
            policy.on_arrival(seq, 0.0)
            waiting.append(seq)
    ranked = policy.order([], waiting, 1.0)
    assert [s.adapter for s in ranked[:10]] == ["A"] * 10
    assert policy.max_adapters_per_step == expected


def test_mlfq_pauses_demoted_work_and_keeps_its_kv():
    trace = _trace([(0.0, "long", 30, 60)] + [(0.5 + 0.05 * i, "short", 30, 3) for i in range(6)])
    shape = EngineShape(max_num_seqs=1)
    paused_with_blocks = []

    def watch(plan: BatchPlan, scheduler: Scheduler) -> None:
        running = {s.seq_id: s for s in scheduler.running}
        if 0 in running and all(c.seq_id != 0 for c in plan.chunks):
            paused_with_blocks.append(len(running[0].block_table))

    result = simulate(trace, make_policy("mlfq", {"base_quantum_tokens": 2}), COST, shape, on_plan=watch)
    _check_outputs(trace, result)
    assert paused_with_blocks and min(paused_with_blocks) > 0  # paused, KV kept
    assert result.requests[0].preemptions == 0
    assert max(r.finish_s for r in result.requests[1:]) < result.requests[0].finish_s


@pytest.mark.parametrize("label", ["inlaid", "inlaid-fair", "inlaid-row-target", "mlfq", "vtc"])
def test_a_step_log_changes_no_step(label, tmp_path):
    """`step_log` wraps the policy: every step it plans must be the one the bare policy plans,
    including the limits the inlaid policy changes per step (row target, fairness bound,
    prefill cap), and the log holds every step."""
    from inlaid.scheduling.step_log import read_step_log

    name, options = POLICIES.get(label) or ("inlaid", {"max_adapters_per_step": 4, "batch_rows_target": 3,
                                                       "max_prefill_tokens_per_step": 96, "predictor": "task-mean"})
    spec = TraceSpec(rate=6.0, num_requests=120, cv=4.0, num_tasks=6, popularity="zipf", seed=5)
    trace = generate_trace(spec, _records(5))
    shape = EngineShape(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=96, max_lora_slots=4)
    bare = simulate(trace, make_policy(name, options), COST, shape)
    log = tmp_path / "steps.jsonl"
    logged = simulate(trace, make_policy(name, {**options, "step_log": str(log)}), COST, shape)
    assert [(s.num_seqs, s.num_tokens, s.adapters, s.loads) for s in logged.steps] == \
        [(s.num_seqs, s.num_tokens, s.adapters, s.loads) for s in bare.steps]
    assert [r.finish_s for r in logged.requests] == [r.finish_s for r in bare.requests]
    assert len(read_step_log(log)) == len(bare.steps)


def test_every_step_is_on_disk_when_its_result_arrives(tmp_path):
    """The log flushed only inside a later step's result, a second after the last flush: a
    line waited out the whole next step (3.7 s, an outside probe), a live server gone idle
    kept its last steps buffered, and a step still in flight when a cancel ended the last
    request was written after the idle flush and stayed in memory until the next step or
    the shutdown. Now each step's line is on disk at its result, before any close."""
    from inlaid.scheduling import step_log

    log = tmp_path / "steps.jsonl"
    lines_after_each_result: list[tuple[int, int]] = []
    real_on_result = step_log.StepLogPolicy.on_result

    def on_result(self, result, now):  # type: ignore[no-untyped-def]
        real_on_result(self, result, now)
        lines_after_each_result.append((result.step_id, len(log.read_text().splitlines())))

    trace = _trace([(0.0, "t0", 30, 4), (0.01, "t1", 20, 3), (50.0, "t0", 10, 2), (100.0, "t2", 12, 5)])
    with unittest.mock.patch.object(step_log.StepLogPolicy, "on_result", on_result):
        result = simulate(trace, make_policy("fifo", {"step_log": str(log)}), COST, EngineShape(max_num_seqs=4))
    assert len(lines_after_each_result) == len(result.steps) > 5
    assert [lines for _, lines in lines_after_each_result] == list(range(1, len(result.steps) + 1))


def test_a_step_in_flight_when_the_last_request_is_cancelled_reaches_the_file(tmp_path):
    """The cancel finishes the last sequence first (the scheduler is idle), the step's
    result comes after: its line was written to the buffer and left there."""
    from inlaid.engine.scheduler import SchedulingPolicy
    from inlaid.protocol import BatchPlan, StepResult
    from inlaid.scheduling.step_log import StepLogPolicy

    class IdleScheduler:
        executor_index = None

        def has_work(self) -> bool:
            return False

    path = tmp_path / "steps.jsonl"
    policy = StepLogPolicy(SchedulingPolicy(), path)
    policy.attach(IdleScheduler())  # type: ignore[arg-type]
    policy.on_plan(BatchPlan(step_id=7, chunks=[], adapter_loads=[]), [], 1.0)
    policy.on_finish(None, 1.1)  # type: ignore[arg-type]  # the cancel: nothing left
    policy.on_result(StepResult(step_id=7, sampled=[], num_tokens=0, compute_seconds=0.02), 1.2)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [7]
    policy.close()


def test_a_live_retuning_changes_the_next_steps_and_keeps_the_queue(tmp_path):
    """retune_policy mid-trace (what the server's live re-tuning does to every executor's
    policy): from the next step on the new β holds; every queued request still finishes
    with its output; the length model, the fairness counters and the stateful options stay
    as they were built; refused options change nothing; FIFO is not tuned."""
    from inlaid.scheduling.registry import retune_policy

    trace = _trace([(0.01 * i, f"t{i % 6}", 30, 12) for i in range(120)])
    shape = EngineShape(max_num_seqs=8, max_lora_slots=6)
    policy = make_policy("inlaid", {"max_adapters_per_step": 4, "batch_rows_target": 0, "fairness_bound": 5000.0,
                                    "predictor": "task-mean", "step_log": str(tmp_path / "steps.jsonl")})
    inner = policy.inner
    length_model, service = inner.length_model, inner.service
    adapters_per_step: list[int] = []

    def on_plan(plan: BatchPlan, scheduler: Scheduler) -> None:
        adapters_per_step.append(len({c.adapter_slot for c in plan.chunks if c.adapter_slot >= 0}))
        if len(adapters_per_step) == 10:
            with pytest.raises(ValueError, match="max_adapters_per_step"):
                retune_policy(policy, {"max_adapters_per_step": -1})
            with pytest.raises(ValueError, match="no option"):
                retune_policy(policy, {"beta": 1})
            assert inner.options.max_adapters_per_step == 4  # refused: nothing changed
            options = retune_policy(policy, {"max_adapters_per_step": 1, "batch_rows_target": 0,
                                             "fairness_bound": 0.0, "predictor": "model", "max_wait_s": 30.0})
            assert options is inner.options and options.max_adapters_per_step == 1 and options.max_wait_s == 30.0
            assert options.fairness_bound == 5000.0 and options.predictor == "task-mean"  # they own state

    result = simulate(trace, policy, COST, shape, on_plan=on_plan)
    _check_outputs(trace, result)
    assert max(adapters_per_step[:10]) == 4 and max(adapters_per_step[10:]) == 1
    assert inner.length_model is length_model and inner.service is service
    assert retune_policy(make_policy("fifo", {}), {"max_adapters_per_step": 1}) is None
