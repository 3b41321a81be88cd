"""A removed task leaves nothing per task behind once its last request has ended: no /metrics
series (an outside soak: ~80 a name, 524 -> 1,195 series in 28 min of add/remove churn) and no
`tasks_served` key in the executor stats, whose sum (requests ended on the executor) still
never goes back. On the coordinator's real engine and registry, stepped by hand (no
processes). And the requantizer process's stderr, which the server's JSON-lines log shares,
carries no progress bars and no bare warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from inlaid.protocol import ErrorCode, Generate, SampledToken, SamplingParams, StepResult
from inlaid.serve.executor_pool import REMOVED_TASKS_LABEL

ADAPTER = str(Path(__file__).resolve().parents[1] / "adapters" / "qa")
ANY_TOKEN = 42  # not an eos token of the model: requests end by max_tokens


def _coordinator(model_dir: Path, tmp_path: Path) -> Any:
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    made = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    made.replies = []
    made.in_flight._send = lambda identity, message: made.replies.append(message)
    return made


def _generate(coordinator: Any, request_id: str, task: str | None, **sampling: Any) -> None:
    coordinator.in_flight.generate(b"c", Generate(request_id=request_id, prompt="Hello", task=task,
                                                  sampling=SamplingParams(**{"max_tokens": 3, **sampling})))


def _run_to_end(coordinator: Any) -> None:
    """What the step loop does: plan, executor's answer (a fixed token), apply, deliver."""
    shard = coordinator.pool.shards[0]
    engine = shard.engine
    while engine.has_unfinished():
        plan = engine.begin_step()
        assert plan is not None
        coordinator._on_plan(shard, plan)
        sampled = [SampledToken(seq_id=c.seq_id, token_id=ANY_TOKEN) for c in plan.chunks if c.sample]
        result = StepResult(step_id=plan.step_id, num_tokens=sum(len(c.token_ids) for c in plan.chunks),
                            compute_seconds=0.01, sampled=sampled)
        coordinator._on_step_result(shard, plan, result, engine.finish_step(result))


def _samples(coordinator: Any) -> list[Any]:
    return [s for family in text_string_to_metric_families(coordinator.metrics.exposition()) for s in family.samples]


def _task_series(coordinator: Any, task: str) -> set[str]:
    return {s.name for s in _samples(coordinator) if s.labels.get("task") == task}


def _served(coordinator: Any) -> dict[str, int]:
    return coordinator.pool.shards[0].info().tasks_served


def test_removed_tasks_leave_no_series_and_no_stats_key(model_dir, tmp_path):
    """The probe's reproduction: 5 times add uN, one generate on it, remove it. Before the fix
    /metrics grew by ~78 series and tasks_served by one key per name."""
    coordinator = _coordinator(model_dir, tmp_path)
    _generate(coordinator, "base", None)
    _run_to_end(coordinator)
    baseline = len(_samples(coordinator))
    for index in range(5):
        name = f"u{index}"
        coordinator.registry.check_adapter(name, ADAPTER)
        coordinator.registry.add(name, ADAPTER)
        _generate(coordinator, f"g{index}", name)
        _generate(coordinator, f"bad{index}", name, temperature=-1.0)  # refused: a requests{task,outcome} series
        _run_to_end(coordinator)
        series = _task_series(coordinator, name)
        # every per-task family had a series for it (so none can be missed by forget_task)
        assert {"inlaid_requests_total", "inlaid_prompt_tokens_total", "inlaid_generation_tokens_total",
                "inlaid_request_duration_seconds_count", "inlaid_request_queue_seconds_count",
                "inlaid_time_to_first_token_seconds_count", "inlaid_time_per_output_token_seconds_count"} <= series
        assert _served(coordinator)[name] == 1  # the refused one never reached an executor
        coordinator.dynamic.remove(name)
        assert _task_series(coordinator, name) == set()
        assert name not in _served(coordinator)
    assert len(_samples(coordinator)) == baseline
    # The sum over the keys (requests ended on this executor) is kept: the removed tasks' share
    # is under one reserved key, whatever the number of names.
    assert _served(coordinator) == {"__base__": 1, REMOVED_TASKS_LABEL: 5}
    # A request naming a removed task is refused under __unknown__, as any unknown name.
    _generate(coordinator, "late", "u0")
    assert coordinator.replies[-1].code == ErrorCode.UNKNOWN_TASK
    assert _task_series(coordinator, "u0") == set()
    assert any(s.labels == {"task": "__unknown__", "outcome": ErrorCode.UNKNOWN_TASK} for s in _samples(coordinator))


def test_a_draining_task_keeps_its_series_until_its_last_request_ends(model_dir, tmp_path):
    """Removed with a request in flight: its figures count that request to its end, then go;
    the name added again starts from 0 (a counter reset, as Prometheus reads a new series)."""
    coordinator = _coordinator(model_dir, tmp_path)
    registry = coordinator.registry
    registry.check_adapter("qa", ADAPTER)
    registry.add("qa", ADAPTER)
    _generate(coordinator, "first", "qa")
    _run_to_end(coordinator)
    _generate(coordinator, "in-flight", "qa")
    coordinator.dynamic.remove("qa")
    assert "qa" in registry.draining
    assert "inlaid_prompt_tokens_total" in _task_series(coordinator, "qa")
    _run_to_end(coordinator)  # the draining request ends: now the task is gone
    assert "qa" not in registry.draining and _task_series(coordinator, "qa") == set()
    assert _served(coordinator) == {REMOVED_TASKS_LABEL: 2}

    registry.add("qa", ADAPTER)
    _generate(coordinator, "again", "qa")
    _run_to_end(coordinator)
    completed = [s for s in _samples(coordinator)
                 if s.name == "inlaid_requests_total" and s.labels.get("task") == "qa"]
    assert [(s.labels["outcome"], s.value) for s in completed] == [("length", 1.0)]
    assert _served(coordinator) == {"qa": 1, REMOVED_TASKS_LABEL: 2}


def test_refusals_of_a_draining_task_count_under_unknown_and_stay(model_dir, tmp_path):
    """Requests naming a task being removed are refused; they were counted under its name,
    and the drain's end dropped them with its series (an outside probe: Prometheus lost 5
    refusals that `stats` kept). They count under __unknown__, as after the drain."""
    coordinator = _coordinator(model_dir, tmp_path)
    coordinator.registry.add("qa", ADAPTER)
    _generate(coordinator, "in-flight", "qa")
    coordinator.dynamic.remove("qa")
    for index in range(3):  # while it drains
        _generate(coordinator, f"refused-{index}", "qa")
    _run_to_end(coordinator)
    _generate(coordinator, "refused-after", "qa")  # after the drain
    refused = [r for r in coordinator.replies if getattr(r, "code", None) == ErrorCode.UNKNOWN_TASK]
    assert len(refused) == 4
    unknown = {(s.labels["task"], s.labels["outcome"]): s.value for s in _samples(coordinator)
               if s.name == "inlaid_requests_total" and s.labels["outcome"] == "unknown_task"}
    assert unknown == {("__unknown__", "unknown_task"): 4.0}
    assert coordinator.counters["rejected"] == 4  # what `stats` says


def test_forget_task_leaves_base_and_unknown_series():
    """The reserved labels are never a registered task's: forgetting them is refused quietly."""
    from inlaid.serve.metrics import ServerMetrics

    metrics = ServerMetrics([], {}, {}, {"model": "m", "version": "v"})
    metrics.on_rejected(None, ErrorCode.INVALID_REQUEST)
    metrics.on_rejected("nope", ErrorCode.UNKNOWN_TASK)
    metrics.forget_task("__base__")
    metrics.forget_task("__unknown__")
    text = metrics.exposition()
    assert 'task="__base__"' in text and 'task="__unknown__"' in text


# The requantizer process's entry point (`main`), run in a fresh interpreter as the supervisor
# runs it (a progress bar's switch is read at import: only a new process shows the real
# order), with its job loop (`serve`) replaced by what a job writes: transformers' own tqdm
# (what "Loading weights" uses, core_model_loading.py), a FutureWarning as transformers
# raises it, and an error log record. "old": the logging setup alone, as before the fix,
# which shows that the probe does produce the bar and the bare warning.
_PROBE = """
import logging, sys, warnings
import inlaid.serve.requantizer as requantizer

def job_output(*args):
    from transformers.utils.logging import tqdm
    for _ in tqdm(range(3), desc="Loading weights"):
        pass
    warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    logging.getLogger("inlaid.requantizer").error("a real error")
    return 0

if sys.argv[1] == "main":
    requantizer.serve = job_output
    requantizer.main(["--address", "ipc:///nowhere", "--generation", "1"])
else:
    requantizer.setup_logging("INFO", "json")
    job_output()
"""


def _requantizer_stderr(mode: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_requantizer_process_writes_only_json_lines():
    before = _requantizer_stderr("old")  # the probe does show the bar and the bare warning
    assert "Loading weights" in before and "FutureWarning" in before
    lines = _requantizer_stderr("main").splitlines()
    records = [json.loads(line) for line in lines]  # every line a JSON record, nothing between them
    assert not any("Loading weights" in line for line in lines)
    warned = [r for r in records if r["logger"] == "py.warnings"]
    assert len(warned) == 1 and warned[0]["level"] == "warning" and "FutureWarning" in warned[0]["msg"]
    assert [r["msg"] for r in records if r["level"] == "error"] == ["a real error"]


def test_a_removed_task_leaves_nothing_in_the_scheduling_policy(model_dir, tmp_path):
    """The policy's per-task state (VTC's counters here) goes with the task's last request, as
    its series do: a server adding and removing tasks kept one counter per name ever served."""
    from inlaid.scheduling.registry import make_policy
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path),
                              policy_factory=lambda: make_policy("vtc"))
    coordinator.replies = []
    coordinator.in_flight._send = lambda identity, message: coordinator.replies.append(message)
    policy = coordinator.pool.shards[0].engine.scheduler.policy
    coordinator.registry.add("qa", ADAPTER)
    _generate(coordinator, "in-flight", "qa")
    _run_to_end(coordinator)
    _generate(coordinator, "draining", "qa")
    coordinator.dynamic.remove("qa")
    assert "qa" in policy.service.counters  # its request still runs
    _run_to_end(coordinator)
    assert "qa" not in policy.service.counters
