"""Requests a queue could leave behind. A rare adapter's short request beside another adapter's flood, under the `inlaid` policy's
defaults (β 8, a row target of 16 rows, grouping by adapter), through the real Scheduler on
a simulated executor.

The grouped ranking puts the flood's adapter first (its many requests sum to the larger
urgency), and the flood alone fills the row target. Counting the target's rows in that
grouped order left the rare adapter out of every step: its 2-token request, shorter than
any flood request, waited 55 s (the aging bound's doing) where FIFO answered it in 0.35 s
(an outside probe found it on a live server: 60-130 s). The rows are now counted in
shortest-first order, so an adapter holding one of the R most urgent requests is never left
out because another adapter's group fills R rows.
"""

from __future__ import annotations

from inlaid.predictor import TaskMeanPredictor
from inlaid.scheduling.cost_model import StepCostModel
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.simulator import EngineShape, simulate
from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest

# A distinct adapter costs a step 4 ms: the reason the row target keeps adapters few.
COST = StepCostModel({"constant": 0.02, "tokens": 0.001, "sampled": 0.0005, "adapters": 0.004, "loads": 0.01})


def _flood_and_rare(rate: float, flood_tokens: int, rare_tokens: int, rare_at: float = 5.0) -> Trace:
    requests = [(i / rate, "flood", 40, flood_tokens) for i in range(int(60 * rate))]
    requests.append((rare_at, "rare", 40, rare_tokens))
    requests.sort()
    return Trace([TraceRequest(at, task, prompt, out, 64, f"{task}/{i}") for i, (at, task, prompt, out) in enumerate(requests)],
                 {task: TaskProfile(task, task, 8) for task in ("flood", "rare")})


def _lengths(flood_tokens: int, rare_tokens: int) -> TaskMeanPredictor:
    model = TaskMeanPredictor()
    model.observe("flood", [], flood_tokens)
    model.observe("rare", [], rare_tokens)
    return model


def test_a_rare_adapters_short_request_is_not_left_out_by_a_flood_filling_the_row_target():
    trace = _flood_and_rare(rate=12.0, flood_tokens=16, rare_tokens=2)
    shape = EngineShape(max_num_seqs=64, max_lora_slots=8)
    fifo = simulate(trace, make_policy("fifo"), COST, shape)
    inlaid = simulate(trace, make_policy("inlaid", {"predictor": "task-mean"}, length_model=_lengths(16, 2)), COST, shape)
    rare_fifo, rare_inlaid = (next(r for r in result.requests if r.task == "rare") for result in (fifo, inlaid))
    assert all(r.finished for r in inlaid.requests)
    assert max(s.num_seqs for s in inlaid.steps) > 16  # the flood alone fills the row target
    # Shortest first: the 2-token request finishes no later than under FIFO (plus a step or two).
    assert rare_inlaid.latency_s <= rare_fifo.latency_s + 0.5, (rare_inlaid.latency_s, rare_fifo.latency_s)
    flood_mean = [sum(r.latency_s for r in result.requests if r.task == "flood") for result in (fifo, inlaid)]
    assert flood_mean[1] <= 1.05 * flood_mean[0]  # ... and the flood loses nothing to it


def test_the_counted_adapters_are_the_ones_taken_with_a_third_adapter_between():
    """The row target counted the adapters of the R most urgent requests (the flood's and
    the rare one's: 2), but the scheduler took the first two of the grouped order, where a
    third adapter's backlog (long requests, a large summed urgency) ranked between them: the
    rare 2-token request was left out of every step until the first-token rule, then paused
    again: 91 s, where FIFO took 1.8 s. The counted adapters now lead the order: 0.4 s."""
    requests = [(i / 12.0, "flood", 40, 16) for i in range(int(60 * 12.0))]
    requests += [(i / 6.0, "backlog", 40, 48) for i in range(int(60 * 6.0))]
    requests.append((5.0, "rare", 40, 2))
    requests.sort()
    tasks = ("flood", "backlog", "rare")
    trace = Trace([TraceRequest(at, task, prompt, out, 64, f"{task}/{i}") for i, (at, task, prompt, out) in enumerate(requests)],
                  {task: TaskProfile(task, task, 8) for task in tasks})
    lengths = TaskMeanPredictor()
    for task, tokens in zip(tasks, (16, 48, 2)):
        lengths.observe(task, [], tokens)
    shape = EngineShape(max_num_seqs=64, max_lora_slots=8)
    fifo = simulate(trace, make_policy("fifo"), COST, shape)
    inlaid = simulate(trace, make_policy("inlaid", {"predictor": "task-mean"}, length_model=lengths), COST, shape)
    assert all(r.finished for r in inlaid.requests)
    rare_fifo, rare_inlaid = (next(r for r in result.requests if r.task == "rare") for result in (fifo, inlaid))
    assert rare_inlaid.latency_s <= rare_fifo.latency_s + 0.5, (rare_inlaid.latency_s, rare_fifo.latency_s)


def test_with_few_seats_the_most_urgent_requests_take_them_before_a_floods_group():
    """Four seats, a flood of 24 32-token requests, an 8-token request of another task each
    second (an outside probe on a live server: 6-7 s each under `inlaid`, 0.8 s without
    grouping). Its adapter was in the step, but the grouped ranking seated the flood's
    waiting requests first; now the R most urgent requests come first, shortest first, and
    only the rest is grouped."""
    requests = [(i * 0.01, "flood", 40, 32) for i in range(24)] + [(1.0 + i, "rare", 40, 8) for i in range(6)]
    trace = Trace([TraceRequest(at, task, prompt, out, 64, f"{task}/{i}")
                   for i, (at, task, prompt, out) in enumerate(sorted(requests))],
                  {task: TaskProfile(task, task, 8) for task in ("flood", "rare")})
    shape = EngineShape(max_num_seqs=4, max_lora_slots=8)
    fifo = simulate(trace, make_policy("fifo"), COST, shape)
    inlaid = simulate(trace, make_policy("inlaid", {"predictor": "task-mean"}, length_model=_lengths(32, 8)), COST, shape)
    assert all(r.finished for r in inlaid.requests)
    rare = [r.latency_s for r in inlaid.requests if r.task == "rare"]
    assert max(rare) < 1.0, rare  # 3.9 s before (FIFO: 6.1 s)
    flood_mean = [sum(r.latency_s for r in result.requests if r.task == "flood") for result in (fifo, inlaid)]
    assert flood_mean[1] <= 1.2 * flood_mean[0]


def test_a_sequence_longer_than_the_kv_cache_ends_at_the_cache_and_the_queue_behind_it_runs():
    """The simulator caps the context at the KV cache as the engine does (8 blocks of 16 =
    128 tokens, below max_model_len 256): the long request ends there ("context") instead of
    preempting itself forever, and the request behind it is served."""
    shape = EngineShape(max_num_seqs=8, num_kv_blocks=8, block_size=16, max_model_len=256, max_lora_slots=2)
    assert shape.context_length == 128
    trace = Trace([TraceRequest(0.0, "long", 40, 200, 256, "long/0"), TraceRequest(0.5, "short", 40, 5, 256, "short/1")],
                  {task: TaskProfile(task, task, 8) for task in ("long", "short")})
    for policy in (make_policy("fifo"), make_policy("inlaid", {"predictor": "task-mean"}, length_model=_lengths(200, 5))):
        result = simulate(trace, policy, COST, shape)
        long_request, short_request = result.requests
        assert long_request.finished and short_request.finished
        assert len(long_request.token_times) == 128 - 40  # the prompt and its tokens fill the cache
        assert len(short_request.token_times) == 5
