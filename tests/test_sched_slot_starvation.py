"""Requests the scheduler's admission walk could pass over forever, or undo at once, through
the real Scheduler on a simulated executor (an outside review found each).

- More busy adapters than device slots: a request whose adapter has no free slot is refused,
  and the requests behind it (of the resident adapters) were admitted, keeping every slot
  busy. Under `fifo` (the default) and `vtc` it waited as long as the resident adapters'
  traffic lasted (vLLM #16876); now it is overtaken for at most `max_wait_s`.
- A preempted request older than `max_wait_s` was overdue at once (its wait counted from
  its arrival) and preempted the request it had made room for.
- The step that preempted a request could admit it again into the blocks left over: it
  recomputed its context, could not grow next step and preempted itself.
"""

from __future__ import annotations

import pytest

from inlaid.predictor import TaskMeanPredictor
from inlaid.scheduling.cost_model import StepCostModel
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.simulator import EngineShape, simulate
from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest

COST = StepCostModel({"constant": 0.02, "tokens": 0.001, "sampled": 0.0005, "adapters": 0.004, "loads": 0.01})
RESIDENT = [f"t{i}" for i in range(8)]


def _busy_slots_trace(seconds: int) -> Trace:
    """Eight adapters (as many as the slots), each with a 60-token request every second for
    `seconds` s, and one 4-token request of a ninth adapter at t = 1 s."""
    requests = [(float(second), task, 40, 60) for second in range(seconds) for task in RESIDENT]
    requests.append((1.0, "z", 40, 4))
    requests.sort()
    return Trace([TraceRequest(at, task, prompt, out, 64, f"{task}/{i}")
                  for i, (at, task, prompt, out) in enumerate(requests)],
                 {task: TaskProfile(task, task, 8) for task in (*RESIDENT, "z")})


def _policy(name: str, options: dict | None = None):  # type: ignore[no-untyped-def]
    if name != "inlaid":
        return make_policy(name, options)
    lengths = TaskMeanPredictor()
    for task in RESIDENT:
        lengths.observe(task, [], 60)
    lengths.observe("z", [], 4)
    return make_policy("inlaid", {"predictor": "task-mean", **(options or {})}, length_model=lengths)


@pytest.mark.parametrize("name", ["fifo", "vtc", "mlfq", "inlaid"])
def test_a_request_whose_adapter_has_no_free_slot_is_not_overtaken_forever(name):
    trace = _busy_slots_trace(seconds=90)
    result = simulate(trace, _policy(name), COST, EngineShape(max_num_seqs=64, max_lora_slots=8))
    assert all(r.finished for r in result.requests)
    rare = next(r for r in result.requests if r.task == "z")
    last_arrival = max(r.arrival_s for r in result.requests)
    # Before: 89 s under fifo and vtc (until the resident adapters' traffic ended). Now fifo's
    # and vtc's bound (10 s) and the drain of the running requests (19.3 s in all, on this
    # overloaded trace); mlfq (1.1 s) and inlaid (0.7 s) seat the short request sooner.
    assert rare.latency_s < 25.0 < last_arrival - rare.arrival_s, (name, rare.latency_s)


def test_fifos_bound_is_an_option_and_a_shorter_one_answers_sooner():
    trace = _busy_slots_trace(seconds=60)
    shape = EngineShape(max_num_seqs=64, max_lora_slots=8)
    latency = {bound: next(r for r in simulate(trace, make_policy("fifo", {"max_wait_s": bound}), COST, shape).requests
                           if r.task == "z").latency_s for bound in (2.0, 20.0)}
    assert 2.0 <= latency[2.0] < 2.0 + 10.0 < 20.0 <= latency[20.0] < 30.0, latency
    with pytest.raises(ValueError, match="max_wait_s"):
        make_policy("fifo", {"max_wait_s": 0.0})
    with pytest.raises(ValueError, match="max_wait_s"):
        make_policy("vtc", {"max_wait_s": -1.0})


@pytest.mark.parametrize("token_budget", [2048, 128])
def test_a_preempted_request_neither_preempts_back_at_once_nor_is_readmitted_in_the_same_step(token_budget):
    """A long request running for 15 s (past max_wait_s = 10) is preempted for KV room by a
    short one. Before: it was overdue at once (it had waited 15 s since its arrival) and
    preempted the short one in turn (2.7 s instead of 0.3); and with a token budget small
    enough for its first chunk to fit the blocks left, the step that preempted it admitted it
    again (recomputing its context)."""
    slow_steps = StepCostModel({**COST.coefficients, "constant": 0.05})
    shape = EngineShape(max_num_seqs=8, max_num_batched_tokens=token_budget, num_kv_blocks=130, block_size=4,
                        max_model_len=2048, max_lora_slots=2)
    trace = Trace([TraceRequest(0.0, "long", 200, 300, 400, "long/0"), TraceRequest(15.0, "short", 100, 3, 8, "short/1")],
                  {task: TaskProfile(task, task, 8) for task in ("long", "short")})
    lengths = TaskMeanPredictor()
    lengths.observe("long", [], 300)
    lengths.observe("short", [], 3)
    readmitted: list[int] = []
    preemptions: dict[int, int] = {}  # by sequence, at the last plan

    def no_victim_readmitted(plan, scheduler):  # type: ignore[no-untyped-def]
        planned = {chunk.seq_id for chunk in plan.chunks}
        for seq in (*scheduler.running, *scheduler.waiting):
            if seq.seq_id in planned and seq.num_preemptions > preemptions.get(seq.seq_id, 0):
                readmitted.append(seq.seq_id)  # preempted while this step was planned, and planned in it
            preemptions[seq.seq_id] = seq.num_preemptions

    policy = make_policy("inlaid", {"predictor": "task-mean", "max_wait_s": 10.0}, length_model=lengths)
    result = simulate(trace, policy, slow_steps, shape, on_plan=no_victim_readmitted)
    long_request, short_request = result.requests
    assert long_request.finished and short_request.finished
    assert long_request.preemptions == 1  # it made room for the short one
    assert short_request.preemptions == 0 and short_request.latency_s < 1.0, short_request
    assert not readmitted
