"""Bad inputs to the scheduling tools, second outside probe (2026-12-05): cost models no
executor could have, absurd trace lengths, prompts past the context, unfaithful CVs, and the
replay client's output, setup and exit status. Each case failed on the code before."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.scheduling.cost_model import ChunkShape, StepCostModel, StepFeatures
from inlaid.scheduling.metrics import RequestRecord, json_safe, summarize
from inlaid.scheduling.registry import make_policy, parse_options
from inlaid.scheduling.simulator import EngineShape, isolated_latency, simulate
from inlaid.scheduling.traces import MAX_CV, TaskProfile, Trace, TraceRequest, TraceSpec, generate_trace
from inlaid.scheduling.suite import load_suite_lengths

ROOT = Path(__file__).resolve().parents[1]
COST_MODEL = ROOT / "bench" / "results" / "sched_cost_model.json"
COST = StepCostModel.load(COST_MODEL)
HEADER = {"meta": {}, "tasks": [{"name": "a", "family": "qa", "rank": 8}]}
GOOD = {"arrival_s": 0.0, "task": "a", "prompt_tokens": 5, "output_tokens": 3, "max_tokens": 8, "source": ""}


def _run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout)


def _refused(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and words in result.stderr, result.stderr[-2000:]


def _write_trace(path: Path, header: dict, *requests: dict) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in (header, *requests)) + "\n")
    return path


@pytest.mark.parametrize("coefficient, value, words", [
    ("constant", math.nan, "not finite numbers >= 0"), ("tokens", -0.001, "not finite numbers >= 0"),
    ("constant", 1e300, "over 3600 s"), ("overhead_s", math.inf, "not finite numbers >= 0")])
def test_every_loader_of_a_cost_model_refuses_coefficients_no_executor_has(tmp_path, coefficient, value, words):
    """NaN hung the simulator (its clock stood still), a negative coefficient ran it
    backwards; only `tune-scheduler` checked. Now StepCostModel itself refuses, naming the
    file, so the simulator and every benchmark get the check."""
    fitted = json.loads(COST_MODEL.read_text())
    if coefficient == "overhead_s":
        fitted["overhead_s"] = value
    else:
        fitted["coefficients"][coefficient] = value
    path = tmp_path / "model.json"
    path.write_text(json.dumps(fitted))
    with pytest.raises(ValueError, match=words) as raised:
        StepCostModel.load(path)
    assert str(path) in str(raised.value)
    with pytest.raises(ValueError, match=words):
        StepCostModel({**fitted["coefficients"], "constant": value} if coefficient != "overhead_s" else {},
                      overhead_s=value if coefficient == "overhead_s" else 0.0)
    # tune-scheduler's message is the same one, with the file
    _refused(_run("-m", "inlaid.cli", "tune-scheduler", "--cost-model", str(path)), words)


def test_the_simulation_benchmarks_refuse_an_unusable_cost_model_before_running():
    for script in ("sched_sim.py", "sched_tune.py", "sched_real.py"):
        _refused(_run(str(ROOT / "bench" / script), "--tag", "no-such-machine", timeout=120),
                 "cost model file not found: '" + str(ROOT / "bench" / "results" / "sched_cost_model_no-such-machine.json"))


def _isolated_by_steps(request: TraceRequest, rank: int, shape: EngineShape) -> float:
    """The request alone, step by step: the reference the closed form must equal."""
    adapter = None if request.task is None else 0
    prompt, seconds, done = request.prompt_tokens, 0.0, 0
    while done < prompt:
        size = min(shape.max_num_batched_tokens, prompt - done)
        chunk = ChunkShape(size, done, adapter, rank, done + size == prompt)
        seconds += COST.step_seconds(StepFeatures.of_chunks([chunk], 0, shape.block_size))
        done += size
    for position in range(prompt, prompt + min(request.output_tokens, shape.context_length - prompt) - 1):
        seconds += COST.step_seconds(StepFeatures.of_chunks([ChunkShape(1, position, adapter, rank, True)], 0,
                                                            shape.block_size))
    return seconds


def test_isolated_latency_is_closed_form_and_capped_at_the_context_like_the_simulation():
    """prompt 200 + 600 tokens on a 512-token context generates 312 tokens, but the isolated
    latency counted 600 (33.6 s against a JCT of 17.2 s, a normalized latency of 0.51)."""
    rng = random.Random(3)
    for _ in range(300):
        shape = EngineShape(max_num_batched_tokens=rng.choice([1, 2, 7, 64, 2048]), block_size=rng.choice([1, 3, 16]),
                            num_kv_blocks=rng.choice([8, 64, 2048]))
        prompt = rng.randint(1, shape.context_length - 1)
        output = rng.randint(1, 400)
        request = TraceRequest(0.0, rng.choice([None, "a"]), prompt, output, output)
        assert isolated_latency(request, 16, COST, shape) == pytest.approx(_isolated_by_steps(request, 16, shape),
                                                                            rel=1e-9)
    shape = EngineShape(num_kv_blocks=32)  # context 512
    for task in (None, "a"):
        trace = Trace([TraceRequest(0.0, task, 200, 600, 600)], {"a": TaskProfile("a", "qa", 16)})
        record = simulate(trace, make_policy("fifo"), COST, shape).requests[0]
        assert len(record.token_times) == 312
        assert record.latency_s >= record.isolated_s * (1 - 1e-9)  # JCT >= isolated; equal without an adapter load
        if task is None:
            assert record.latency_s == pytest.approx(record.isolated_s, rel=1e-9)


def test_absurd_lengths_and_bad_headers_are_refused_at_load_naming_the_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    _write_trace(path, HEADER, GOOD, {**GOOD, "output_tokens": 10**9, "max_tokens": 10**9})
    with pytest.raises(ValueError, match=rf"{path}: line 3: output_tokens must be >= 1 and <= 16777216"):
        Trace.load(path)
    task = HEADER["tasks"][0]
    for tasks, meta, words in [([task, {**task, "rank": 16}], {}, "task 'a' is listed twice"),
                               ([{**task, "rank": -8}], {}, "task 'a': rank must be >= 1"),
                               ([{**task, "family": ""}], {}, "task 'a' has family ''"),
                               ([{**task, "family": None}], {}, "task 'a' has family None"),
                               ([task], [1, 2], "meta must be a JSON object")]:
        _write_trace(path, {"meta": meta, "tasks": tasks}, GOOD)
        with pytest.raises(ValueError, match=f"line 1: {words}"):
            Trace.load(path)
    _write_trace(path, HEADER, {**GOOD, "task": ["a"]})
    with pytest.raises(ValueError, match="line 2: request of unknown task"):
        Trace.load(path)


def test_a_prompt_past_the_context_fails_that_request_alone():
    """It aborted the whole simulation with "prompt has 109 tokens; the context length is
    64", naming no request; the server refuses that request and serves on."""
    tasks = {"a": TaskProfile("a", "qa", 8)}
    requests = [TraceRequest(0.0, "a", 20, 4, 8), TraceRequest(0.1, "a", 109, 4, 8), TraceRequest(0.2, None, 30, 3, 8)]
    shape = EngineShape(num_kv_blocks=4, block_size=16)  # context 64
    result = simulate(Trace(requests, tasks), make_policy("inlaid", {"predictor": "task-mean"}), COST, shape)
    assert [r.request_id for r in result.refused] == ["1"]
    assert "ContextLengthError: prompt has 109 tokens; the context length is 64" in result.refused[0].error
    assert [len(r.token_times) for r in result.requests] == [4, 0, 3]
    summary = summarize(result.requests, result.steps)
    assert (summary["finished"], summary["failed"]) == (2, 1)
    # The last arrival refused: the run still ends.
    last = simulate(Trace(requests[:2], tasks), make_policy("fifo"), COST, shape)
    assert [len(r.token_times) for r in last.requests] == [4, 0]


def test_cvs_beyond_faithful_float64_gamma_sampling_are_refused(tmp_path):
    """CV 1000 put every arrival at 0.0; CV 100 gave a measured rate of 1e12/s."""
    records = [r for r in load_suite_lengths() if r.split == "eval"]
    with pytest.raises(ValueError, match=f"cv must be <= {MAX_CV:g}"):
        TraceSpec(rate=1.0, num_requests=1000, cv=1000.0).validate()
    with pytest.raises(ValueError, match="seed must be >= 0"):
        TraceSpec(rate=1.0, num_requests=10, seed=-1).validate()
    # At the bound the draws are faithful: the measured rate within 20 % of the asked (20,000
    # requests: the span's own spread, CV / sqrt(n), is 7 %) and no arrivals piled up.
    trace = generate_trace(TraceSpec(rate=1.0, num_requests=20_000, cv=MAX_CV, seed=0), records)
    assert 0.8 <= trace.summary()["rate"] <= 1.2
    # bench/traces.py asks for a rate: a CV its count of requests would miss it by is refused
    traces = str(ROOT / "bench" / "traces.py")
    _refused(_run(traces, "--tasks", "3", "--cv", "4", "--requests", "20", "--out", "t.jsonl", cwd=tmp_path),
             "use --cv <= 2.58, or --requests >= 48")
    _refused(_run(traces, "--tasks", "3", "--cv", "100", "--out", "t.jsonl", cwd=tmp_path), "cv must be <= 10")
    assert not list(tmp_path.iterdir())


def test_policy_options_are_refused_one_option_at_a_time():
    for policy, options, words in [("mlfq", {"starvation_s": -1.0}, "starvation_s must be > 0"),
                                   ("mlfq", {"levels": 0}, "levels must be >= 1"),
                                   ("mlfq", {"quantum_growth": 0.5}, "quantum_growth must be >= 1"),
                                   ("mlfq", {"prefill_weight": -1.0}, "prefill_weight must be >= 0"),
                                   ("vtc", {"input_weight": 0.0, "output_weight": 0.0},
                                    "input_weight and output_weight cannot both be 0"),
                                   # finite but huge: quanta overflowed at start-up (a traceback)
                                   ("mlfq", {"quantum_growth": 1e70}, "base_quantum_tokens x quantum_growth"),
                                   ("mlfq", {"quantum_growth": 1e5, "levels": 64}, "base_quantum_tokens x"),
                                   # as huge as off: the aging bound and the first-token rule
                                   ("inlaid", {"max_wait_s": 1e300}, "scheduler option 'max_wait_s' is a duration"),
                                   ("inlaid", {"first_token_after_s": 1e7}, "scheduler option 'first_token_after_s'"),
                                   ("mlfq", {"starvation_s": 1e9}, "scheduler option 'starvation_s' is a duration")]:
        with pytest.raises(ValueError) as raised:
            parse_options(policy, options)
        assert str(raised.value).startswith(words), raised.value
    parse_options("vtc", {"input_weight": 0.0})  # one weight alone still counts service
    parse_options("inlaid", {"max_wait_s": 1e6})  # the bound itself: the simulator's "no aging"
    parse_options("mlfq", {"quantum_growth": 10.0, "levels": 9})  # 4 x 10 ** 8 tokens at the last level: within


def test_replay_summaries_are_strict_json_and_the_slo_counts_known_isolated_latencies_only():
    """A replay knows no isolated latency: its SLO attainment read 0 % and NaN made the
    summary invalid JSON."""
    replayed = [RequestRecord(str(i), "a", 10, 0.0, 0.1, [0.2, 0.3], 0.3) for i in range(3)]
    text = json.dumps(json_safe(summarize(replayed)), allow_nan=False)
    summary = json.loads(text)
    assert summary["slo_attainment"]["2x"] is None and summary["normalized_latency"]["mean"] is None
    assert summary["fairness_max_service_gap"] is None and summary["latency_s"]["mean"] == pytest.approx(0.3)
    mixed = replayed + [RequestRecord("k", "a", 10, 0.0, 0.1, [0.2, 0.3], 0.3, isolated_s=0.2)]
    assert summarize(mixed)["slo_attainment"]["2x"] == 1.0
    # what a replay cannot see (steps, pauses) is there as null, as the docs say, not missing
    # (preemptions read 0: the records' default, summed, though the server may have paused some)
    assert all(summary[key] is None for key in ("tasks_per_step", "adapter_loads_per_s", "steps", "preemptions"))
    paused = [RequestRecord(str(i), "a", 10, 0.0, 0.1, [0.2, 0.3], 0.3, isolated_s=0.2, preemptions=i)
              for i in range(3)]
    assert summarize(paused)["preemptions"] == 3  # a simulation's records know theirs


def test_bench_traces_and_tune_scheduler_outputs_are_checked_or_created(tmp_path):
    traces = str(ROOT / "bench" / "traces.py")
    (tmp_path / "file").write_text("")
    _refused(_run(traces, "--tasks", "2", "--out", str(tmp_path)), "is a directory")
    _refused(_run(traces, "--tasks", "2", "--out", str(tmp_path / "file" / "t.jsonl")), "which is a file")
    _refused(_run(traces, "--tasks", "2", "--seed", "-1", "--out", str(tmp_path / "t.jsonl")), "seed must be >= 0")
    _refused(_run(traces, "--tasks", "12", "--suite-task-names", "--out", str(tmp_path / "t.jsonl")), "num_tasks <= 9")
    made = _run(traces, "--tasks", "3", "--requests", "20", "--suite-task-names", "--out", str(tmp_path / "new" / "t.jsonl"))
    assert made.returncode == 0, made.stderr[-2000:]
    trace = Trace.load(tmp_path / "new" / "t.jsonl")
    assert all(name == profile.family for name, profile in trace.tasks.items()) and len(trace.tasks) == 3
    tuned = _run("-m", "inlaid.cli", "tune-scheduler", "--cost-model", str(COST_MODEL), "--requests", "10",
                 "--tasks", "2", "--json", str(tmp_path / "deep" / "er" / "tuning.json"))
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert json.loads((tmp_path / "deep" / "er" / "tuning.json").read_text())["chosen"]


def _replay_trace(path: Path, task: str, sources: list[str]) -> Path:
    """Requests of `task` replaying suite records `sources`, 50 ms apart."""
    records = {r.record_id: r for r in load_suite_lengths()}
    requests = [TraceRequest(0.05 * i, task, records[s].prompt_tokens, records[s].output_tokens,
                             records[s].max_tokens, s) for i, s in enumerate(sources)]
    Trace(requests, {task: TaskProfile(task, "sentiment", 16)}).save(path)
    return path


def test_replay_refuses_a_bad_out_path_and_a_dead_server_in_one_line(tmp_path):
    """A missing --out folder lost the timings of a whole replay at its end; a dead address
    sat silent for the request timeout (an hour), or printed RequestTimeoutError's traceback."""
    trace = _replay_trace(tmp_path / "trace.jsonl", "sentiment", ["sentiment/eval/sentiment-10548"])
    replay = [str(ROOT / "bench" / "replay.py"), "--trace", str(trace), "--address", "tcp://127.0.0.1:18559"]
    (tmp_path / "file").write_text("")
    result = _run(*replay, "--out", str(tmp_path / "file" / "timings.jsonl"), "--ready-timeout-s", "1")
    _refused(result, "--out")
    assert "not ready" not in result.stderr  # refused before connecting
    _refused(_run(*replay, "--ready-timeout-s", "1", "--timeout-s", "5"), "not ready within 1 s")


def test_replay_checks_the_trace_tasks_prints_strict_json_and_fails_when_every_request_failed(tmp_path):
    """A bench/traces.py trace named its tasks task-NNNN: against a real server every request
    failed (UnknownTaskError), the replay exited 0 and printed NaN (invalid JSON) and 0 % SLO
    attainment for latencies it cannot know."""
    from inlaid.serve.launcher import ServerProcess

    short = ["sentiment/eval/sentiment-10548", "sentiment/eval/sentiment-10579", "sentiment/eval/sentiment-10435"]
    good = _replay_trace(tmp_path / "good.jsonl", "sentiment", short)
    unknown = _replay_trace(tmp_path / "unknown.jsonl", "task-0000", short[:1])
    # Prompts of 405 and 350 tokens on a 128-token context: the server refuses both.
    too_long = _replay_trace(tmp_path / "long.jsonl", "sentiment", ["qa/eval/qa-822", "qa/eval/qa-983"])
    config = {"executor": {"max_model_len": 128, "num_kv_blocks": 64},
              "server": {"address": "tcp://127.0.0.1:18531"},
              "tasks": {"sentiment": str(ROOT / "adapters" / "sentiment")}}
    replay = [str(ROOT / "bench" / "replay.py"), "--address", "tcp://127.0.0.1:18531", "--ready-timeout-s", "300",
              "--timeout-s", "120", "--trace"]
    with ServerProcess(config, tmp_path) as server:
        server.wait_ready()
        refused = _run(*replay, str(unknown))
        out = tmp_path / "new" / "folder" / "timings.jsonl"
        served = _run(*replay, str(good), "--out", str(out))
        failed = _run(*replay, str(too_long))
        server.terminate()
    _refused(refused, "does not serve 1 of the trace's 1 tasks: task-0000 (it serves: sentiment")
    assert refused.stdout == ""  # nothing replayed
    assert served.returncode == 0, served.stderr[-2000:]

    def no_nan(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    summary = json.loads(served.stdout, parse_constant=no_nan)
    assert summary["finished"] == 3 and summary["slo_attainment"]["2x"] is None
    assert summary["normalized_latency"]["mean"] is None and summary["fairness_max_service_gap"] is None
    assert len(out.read_text().splitlines()) == 3
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "all 2 requests failed" in failed.stderr and "ContextLengthError" in failed.stderr, failed.stderr[-2000:]
    assert json.loads(failed.stdout, parse_constant=no_nan)["failed"] == 2
