"""Bad inputs to the scheduling tools get one line naming what is wrong, never a traceback
or a silently different run (each case was found by an outside probe, 2026-12-05)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.scheduling.registry import parse_options
from inlaid.scheduling.traces import Trace, TraceSpec

ROOT = Path(__file__).resolve().parents[1]
COST_MODEL = ROOT / "bench" / "results" / "sched_cost_model.json"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300)


def _refused(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and words in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("option, value", [("max_wait_s", math.nan), ("fairness_bound", math.inf),
                                           ("first_token_after_s", math.nan), ("prefill_weight", math.inf)])
def test_non_finite_policy_options_are_refused(option, value):
    """NaN fails every comparison: `max_wait_s = nan` switched the aging bound off."""
    with pytest.raises(ValueError, match=f"{option}.*finite"):
        parse_options("inlaid", {option: value})
    with pytest.raises(ValueError, match="finite"):
        parse_options("vtc", {"input_weight": math.nan})
    with pytest.raises(ValueError, match="finite"):
        parse_options("mlfq", {"quantum_growth": math.inf})


def test_mlfq_levels_are_bounded():
    with pytest.raises(ValueError, match="levels must be <= 64"):
        parse_options("mlfq", {"levels": 1_000_000_000})  # quantum_growth ** levels overflowed


def test_trace_specs_and_files_are_checked(tmp_path):
    for spec, words in [(TraceSpec(rate=math.nan, num_requests=10), "rate"), (TraceSpec(rate=1, num_requests=10,
                        cv=math.inf), "cv"), (TraceSpec(rate=1, num_requests=10, popularity="power", alpha=math.nan),
                        "alpha"), (TraceSpec(rate=1, num_requests=0), "num_requests")]:
        with pytest.raises(ValueError, match=words):
            spec.validate()
    header = json.dumps({"meta": {}, "tasks": [{"name": "a", "family": "qa", "rank": 8}]})
    good = {"arrival_s": 0.0, "task": "a", "prompt_tokens": 5, "output_tokens": 3, "max_tokens": 8, "source": ""}
    cases = {
        "not json": [header, "{"],
        "arrival_s": [header, json.dumps({**good, "arrival_s": "x"})],
        "output_tokens must be": [header, json.dumps({**good, "output_tokens": -1})],
        "arrives before": [header, json.dumps({**good, "arrival_s": 5.0}), json.dumps(good)],
        "no requests": [header],
        "line 1 is not a trace header": [json.dumps({"meta": {}}), json.dumps(good)],
        "unknown task": [header, json.dumps({**good, "task": "b"})],
    }
    for words, lines in cases.items():
        path = tmp_path / "trace.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=words if words != "not json" else "line 2 is not a trace request"):
            Trace.load(path)
    path.write_text("\n".join([header, json.dumps(good)]) + "\n")
    trace = Trace.load(path)
    for factor in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="finite factor"):
            trace.scaled(factor)


def test_bench_traces_never_rewrites_the_committed_set_for_a_single_trace(tmp_path):
    readme = ROOT / "bench" / "results" / "sched_traces" / "README.md"
    before = readme.stat().st_mtime_ns
    _refused(_run(str(ROOT / "bench" / "traces.py"), "--out", "mine.jsonl", "--rate", "2", cwd=tmp_path),
             "give --tasks too")
    _refused(_run(str(ROOT / "bench" / "traces.py"), "--tasks", "0", "--out", "mine.jsonl", cwd=tmp_path),
             "num_tasks must be >= 1")
    _refused(_run(str(ROOT / "bench" / "traces.py"), "--tasks", "3", "--cv", "nan", cwd=tmp_path), "cv must be")
    assert readme.stat().st_mtime_ns == before and not list(tmp_path.iterdir())


def test_predictor_cli_refuses_bad_rows_and_outputs_in_one_line(tmp_path):
    rows = {
        "negative_id": ({"task": "a", "prompt_token_ids": [1, -1], "output_tokens": 3}, "token ids"),
        "huge_output": ({"task": "a", "prompt_token_ids": [1], "output_tokens": 10**20}, "output_tokens must be"),
        "bool_output": ({"task": "a", "prompt_token_ids": [1], "output_tokens": True}, "output_tokens must be"),
        "empty_task": ({"task": "", "prompt_token_ids": [1], "output_tokens": 3}, "task must be"),
        # pooled with the requests of no task (2026-12-07)
        "base_key": ({"task": "<base>", "prompt_token_ids": [1], "output_tokens": 3}, "key of the requests of no task"),
    }
    for name, (row, words) in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
        _refused(_run("-m", "inlaid.predictor", "train", "--data", str(tmp_path / f"{name}.jsonl"),
                      "--out", str(tmp_path / "p.npz")), words)
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\n")
    _refused(_run("-m", "inlaid.predictor", "train", "--data", str(tmp_path / "binary.jsonl"),
                  "--out", str(tmp_path / "p.npz")), "not UTF-8")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"task": "a", "prompt_token_ids": [1, 2], "output_tokens": 3}) + "\n")
    _refused(_run("-m", "inlaid.predictor", "train", "--data", str(good), "--out", str(tmp_path)), "is a directory")
    _refused(_run("-m", "inlaid.predictor", "train", "--data", str(tmp_path), "--out", "p.npz"), "is a directory")
    written = _run("-m", "inlaid.predictor", "train", "--data", str(good), "--out", str(tmp_path / "new" / "p.npz"))
    assert written.returncode == 0 and (tmp_path / "new" / "p.npz").is_file(), written.stderr[-2000:]
    # --out the --data file itself: the requests were replaced by the state (2026-12-07)
    before = good.read_bytes()
    _refused(_run("-m", "inlaid.predictor", "train", "--data", str(good), "--out", str(good)), "is the --data file")
    assert good.read_bytes() == before


def test_a_replay_never_writes_over_its_trace(tmp_path):
    """--out naming the --trace file replaced the trace by the timings (2026-12-07)."""
    from inlaid.scheduling.traces import TraceRequest

    trace = tmp_path / "t.jsonl"
    Trace([TraceRequest(0.0, None, 4, 2, 2)], {}).save(trace)
    before = trace.read_bytes()
    _refused(_run("-m", "inlaid.scheduling.replay", "--trace", str(trace), "--out", str(trace),
                  "--address", "tcp://127.0.0.1:1", "--synthetic-prompts"), "is the --trace file")
    assert trace.read_bytes() == before


def test_cost_models_that_break_the_simulation_are_refused(tmp_path):
    from inlaid.scheduling.autotune import load_cost_model

    fitted = json.loads(COST_MODEL.read_text())
    for name, constant, words in [("inf", math.inf, "not finite"), ("tiny", 1e-300, "under")]:
        path = tmp_path / f"{name}.json"
        coefficients = {key: 0.0 for key in fitted["coefficients"]}
        path.write_text(json.dumps({**fitted, "coefficients": {**coefficients, "constant": constant}}))
        with pytest.raises(ValueError, match=words):
            load_cost_model(str(path))


def test_tune_scheduler_refuses_before_simulating(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('[server]\npolicy = "mlfq"\n[scheduler]\nlevels = 3\n')
    tune = ["-m", "inlaid.cli", "tune-scheduler", "--cost-model", str(COST_MODEL)]
    _refused(_run(*tune, "--config", str(config)), "server.policy = 'mlfq'")
    _refused(_run(*tune, "--slots", "0"), "must be a positive integer")
    _refused(_run(*tune, "--load", "1.5"), "(0, 1]")
    (tmp_path / "file").write_text("")
    result = _run(*tune, "--json", str(tmp_path / "file" / "x.json"))
    _refused(result, "--json")
    assert "simulate" not in result.stderr  # refused before any simulation ran


def test_the_step_log_reaches_its_file_while_serving(tmp_path):
    """Buffered 64 KiB, the file stayed empty until shutdown (and a killed server lost it)."""
    from inlaid.engine.scheduler import SchedulingPolicy
    from inlaid.protocol import BatchPlan, StepResult
    from inlaid.scheduling import step_log

    path = tmp_path / "steps.jsonl"
    policy = step_log.StepLogPolicy(SchedulingPolicy(), path)
    policy.attach(None)  # type: ignore[arg-type]
    policy.on_plan(BatchPlan(step_id=0, chunks=[], adapter_loads=[]), [], 1.0)
    policy.on_result(StepResult(step_id=0, sampled=[], num_tokens=0, compute_seconds=0.01), 1.5)
    lines = path.read_text().splitlines()  # before close
    assert len(lines) == 1 and json.loads(lines[0])["compute_s"] == 0.01
    policy.close()


def test_an_empty_step_log_or_predictor_state_path_is_refused_not_taken_for_none(tmp_path):
    from inlaid.serve.config import ConfigError, config_from_dict

    for key in ("step_log", "predictor_state"):
        with pytest.raises(ConfigError, match=f"scheduler.{key} must be a non-empty path"):
            config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {key: ""}}, base_dir=tmp_path)


def test_predictor_data_line_errors_name_the_field_not_a_python_repr(tmp_path):
    """A missing field read "expected task, prompt_token_ids, output_tokens ('task')": KeyError's
    repr (an outside probe)."""
    from inlaid.predictor.cli import DataError, read_samples

    cases = [('{"prompt_token_ids": [1], "output_tokens": 3}', "line.jsonl:1: no 'task' field; each line needs"),
             ('{"task": "a", "prompt_token_ids": [1]}', "no 'output_tokens' field"),
             ("[1, 2]", ":1: expected a JSON object with task, prompt_token_ids and output_tokens"),
             ("{oops", ":1: not JSON (")]
    for text, words in cases:
        (tmp_path / "line.jsonl").write_text(text + "\n")
        with pytest.raises(DataError) as refused:
            read_samples(tmp_path / "line.jsonl")
        assert words in str(refused.value) and "KeyError" not in str(refused.value), refused.value
