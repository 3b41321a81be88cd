"""What the scheduling policies keep per task and per step stays bounded on a long-running
server (an outside review):

- the length predictor's reservoir kept an empty deque for every task it ever saw and
  scanned them all on every request once full (2 ms an observe after 40,000 tasks);
- a removed task's VTC counter, task mean and level stayed for the life of the process;
- a saved state bigger than the loading predictor's bounds loaded whole, and a restart
  forgot how close the next refit was;
- a step that never ran (the executor failed it) stayed pending in the step log, and the
  `inlaid` policy took its adapters as the batch's;
- a failed request vanished from the SLO attainment figures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import Scheduler, SchedulerLimits
from inlaid.engine.sequence import Sequence
from inlaid.predictor import LengthPredictor, OnlineLengthPredictor, TaskMeanPredictor
from inlaid.protocol import SamplingParams
from inlaid.scheduling.metrics import RequestRecord, summarize
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.service import ServiceCounters
from inlaid.scheduling.step_log import StepLogPolicy
from inlaid.serve.executor_errors import ExecutorStepError
from inlaid.serve.step_loop import StepLoop


def _seq(seq_id: int, task: str | None, prompt: int = 4) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(range(1, prompt + 1)), sampling=SamplingParams(max_tokens=8),
                    adapter=task)


def test_the_reservoir_holds_rows_of_at_most_capacity_tasks_and_forgets_a_removed_one():
    predictor = OnlineLengthPredictor(capacity=50, per_task_capacity=10, refit_every=0, background=False)
    for index in range(2_000):  # one request each: every task but the last 50 is pushed out
        predictor.observe(f"t{index}", [1, 2, 3], 5 + index % 7)
    assert predictor.size == 50
    assert len(predictor._rows) == 50 and all(predictor._rows.values())  # before: 2,000 deques, 1,950 empty
    assert sum(len(rows) for rows in predictor._rows.values()) == predictor.size
    for _ in range(30):  # the longest deque gives a row up: a popular task pushes no rare one out
        predictor.observe("popular", [4, 5], 9)
    assert len(predictor._rows["popular"]) == 1 and predictor.size == 50 and len(predictor._rows) == 50
    assert predictor.model.fallback.means["popular"] == 9.0

    predictor.forget("popular")
    assert "popular" not in predictor._rows and predictor.size == 49
    assert "popular" not in predictor.model.fallback.means and "popular" not in predictor.model.fallback.counts
    predictor.forget("never-seen")  # nothing to forget: no error
    assert predictor.size == 49


def test_a_fitted_predictor_forgets_a_removed_tasks_level_and_fit():
    model = LengthPredictor(bits=12)
    predictor = OnlineLengthPredictor(model, refit_every=0, background=False)
    for index in range(40):
        predictor.observe("short", [1, 2, index], 3)
        predictor.observe("long", [7, 8, index], 90)
    predictor.refit()
    predictor.observe("short", [1, 2, 3], 6)  # a residual: the task's level moves
    assert "short" in model.fitted_tasks and "short" in model.residuals
    predictor.forget("short")
    assert "short" not in model.fitted_tasks and "short" not in model.residuals
    assert "short" not in model.fallback.means and "short" not in predictor._rows
    assert "long" in model.fitted_tasks and predictor.predict("long", [7, 8, 1]) > 30


def test_a_removed_tasks_counter_goes_and_the_idle_floor_stays():
    counters = ServiceCounters()
    a, b = _seq(1, "a", prompt=100), _seq(2, "b", prompt=10)
    for seq in (a, b):
        counters.arrive(seq)
        counters.charge_admission(seq)
    counters.finish(b)
    counters.finish(a)  # the last to leave the backlog: its counter (100) is the floor
    counters.forget("a")
    counters.forget("b")
    assert counters.counters == {}
    returning = _seq(3, "c")
    counters.arrive(returning)
    assert counters.counter("c") == 100.0  # lifted to the floor a forgotten task left
    counters.forget("c")  # backlogged: kept
    assert counters.counter("c") == 100.0


def test_the_policies_forget_a_removed_task():
    vtc = make_policy("vtc")
    fair = make_policy("inlaid", {"predictor": "task-mean", "fairness_bound": 100.0})
    for policy in (vtc, fair):
        seq = _seq(1, "gone")
        policy.on_arrival(seq, 0.0)
        policy.on_admit(seq, 0.0)
        policy.on_token(seq, 0.1)
        policy.on_finish(seq, 0.2)
        assert "gone" in policy.service.counters
        StepLogPolicy(policy, "/dev/null").on_task_removed("gone")  # through a step log too
        assert "gone" not in policy.service.counters
    lengths = TaskMeanPredictor()
    lengths.observe("gone", [], 12)
    inlaid = make_policy("inlaid", {"predictor": "task-mean"}, length_model=lengths)
    inlaid.on_task_removed("gone")
    assert "gone" not in lengths.means


def test_a_saved_state_loads_within_the_loading_predictors_bounds_with_its_refit_countdown(tmp_path: Path):
    big = OnlineLengthPredictor(capacity=100, per_task_capacity=40, refit_every=64, background=False)
    for index in range(80):
        big.observe("a", [1, index], 5)
        big.observe(f"b{index % 4}", [2, index], 9)
    assert big.size == 100 and big._since_fit == 160 - 2 * 64
    path = tmp_path / "state.npz"
    big.save(path)
    small = OnlineLengthPredictor.load(path, capacity=30, per_task_capacity=10, refit_every=64, background=False)
    assert small.size == 30 and max(len(rows) for rows in small._rows.values()) <= 10
    assert sum(len(rows) for rows in small._rows.values()) == small.size
    assert small._since_fit == 32  # before: 0, the first refit after a restart came up to 64 requests late
    same = OnlineLengthPredictor.load(path, capacity=100, per_task_capacity=40, refit_every=64, background=False)
    assert same.size == 100 and same._since_fit == 32
    # a state written before it was saved (no array) loads with 0
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files if key != "reservoir_since_fit"}
    older = tmp_path / "older.npz"
    np.savez_compressed(older, **arrays)
    assert OnlineLengthPredictor.load(older, refit_every=64)._since_fit == 0


class _OneStepEngine:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.unfinished = True

    def has_unfinished(self) -> bool:
        return self.unfinished

    def begin_step(self):  # type: ignore[no-untyped-def]
        return self.scheduler.schedule()


class _FailingSupervisor:
    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()

    async def execute(self, plan):  # type: ignore[no-untyped-def]
        raise ExecutorStepError("the forward pass raised")


def test_a_step_the_executor_failed_is_undone_for_the_policy(tmp_path: Path):
    inlaid = make_policy("inlaid", {"predictor": "task-mean"})
    policy = StepLogPolicy(inlaid, tmp_path / "steps.jsonl")
    scheduler = Scheduler(SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          BlockManager(32, 4), AdapterSlots(2), eos_token_ids=(0,), policy=policy)
    scheduler.adapters.register("a", "sim://a")
    scheduler.add(_seq(1, "a"))
    engine = _OneStepEngine(scheduler)
    failed: list[str] = []

    def fail_running(message: str, code: str) -> None:
        failed.append(message)
        engine.unfinished = False

    async def scenario() -> None:
        loop = StepLoop(engine, _FailingSupervisor(), on_plan=lambda plan: None,  # type: ignore[arg-type]
                        deliver=lambda *args: None, counters={}, fail_running=fail_running)
        task = asyncio.ensure_future(loop.run())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if failed:
                break
        task.cancel()

    asyncio.run(scenario())
    assert failed and "the forward pass raised" in failed[0]
    assert policy._pending == {}  # before: the failed step's plan, kept for ever
    assert inlaid._last_step_adapters == set()  # before: {"a"}, a batch that never ran


def test_failed_requests_count_as_misses_in_the_slo_attainments():
    answered = [RequestRecord(request_id=str(i), task="t", prompt_tokens=4, arrival_s=float(i), admitted_s=float(i),
                              token_times=[i + 0.5, i + 1.0], finish_s=i + 1.0, isolated_s=0.5)
                for i in range(9)]
    timed_out = RequestRecord(request_id="9", task="t", prompt_tokens=4, arrival_s=9.0, error="RequestTimeoutError")
    summary = summarize([*answered, timed_out], ttft_slo_s=5.0)
    assert summary["failed"] == 1 and summary["finished"] == 9
    assert summary["ttft_slo_attainment"] == 0.9  # before: 1.0
    assert summary["slo_attainment"]["10x"] == 0.9
    assert summarize(answered, ttft_slo_s=5.0)["ttft_slo_attainment"] == 1.0
    # a replay knows no isolated latency: the 10x figure stays unmeasured, failures or not
    unknown = [RequestRecord(**{**r.__dict__, "isolated_s": None}) for r in answered]
    assert np.isnan(summarize([*unknown, timed_out])["slo_attainment"]["10x"])


def test_a_refit_running_while_a_task_is_forgotten_does_not_fit_it_again():
    """The background refit snapshots the reservoir, then swaps its weights in: a task
    forgotten between the two came back as fitted (its old task column answered for a task
    added again under the name)."""
    predictor = OnlineLengthPredictor(LengthPredictor(bits=12), refit_every=0, background=False)
    for index in range(20):
        predictor.observe("gone", [1, index], 3)
        predictor.observe("stay", [2, index], 40)
    snapshot: dict = {}
    fit = predictor._fit
    predictor._fit = lambda rows, tasks: snapshot.update(rows=rows, tasks=tasks)  # type: ignore[method-assign]
    predictor.refit()  # the snapshot; its fit still runs ...
    predictor.forget("gone")
    fit(snapshot["rows"], snapshot["tasks"])  # ... and ends after the forget
    assert predictor.model.fitted_tasks == frozenset({"stay"})
    predictor.forget("stay")  # no refit running: nothing kept for one
    assert predictor._forgotten == set()
