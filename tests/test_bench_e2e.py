"""The end-to-end benchmark (bench/e2e.py): its quick mode run for real (four servers on
loopback: transformers + PEFT and three `inlaid serve`), and its report checked against
what the servers did -- their own request and token counts, the client's records -- and
against an independent reference: the transformers + PEFT server and Inlaid on the same
fp32 weights must give the same greedy answers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import e2e  # noqa: E402  (bench/ is no package)

SYSTEMS = [s.label for s in e2e.SYSTEMS]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    out = tmp_path_factory.mktemp("e2e-quick")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "e2e.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line]
    return report, records, out


def test_every_request_answered_and_counted_by_the_servers(quick):
    report, records, _ = quick
    settings = e2e.QUICK
    assert {row["system"] for row in report["workloads"]} == set(SYSTEMS)
    assert all(not r["error"] and r["finish_s"] is not None for r in records), [r["error"] for r in records if r["error"]]
    by_run = defaultdict(list)
    for r in records:
        if r["phase"] == "sweep":
            by_run[(r["tasks"], r["popularity"], r["rate_index"], r["system"])].append(r)
    assert len(report["workloads"]) == len(by_run) == len(SYSTEMS) * settings.rates
    for row in report["workloads"]:
        run = by_run[(row["tasks"], row["popularity"], row["rate_index"], row["system"])]
        assert row["requests"] == row["finished"] == len(run) == settings.requests_at(row["rate"])
        assert row["output_tokens"] == sum(len(r["token_ids"]) for r in run)
        # throughput recomputed from the client's records: answers over first arrival to last answer
        span = max(r["finish_s"] for r in run) - min(r["arrival_s"] for r in run)
        assert row["throughput_rps"] == pytest.approx(len(run) / span, rel=1e-9)
        assert row["latency_s"]["max"] == pytest.approx(max(r["finish_s"] - r["arrival_s"] for r in run))
    for r in records:
        assert 1 <= len(r["token_ids"]) == len(r["token_times"]) <= settings.max_tokens
    # each server's own counts (its GetStats) match what the client sent it and got back
    for tasks, server in report["servers"].items():
        for system, counts in server["counts"].items():
            mine = [r for r in records if r["system"] == system and str(r["tasks"]) == tasks]
            assert counts["received"] == counts["finished"] == len(mine), system
            assert counts["failed"] == 0
            assert counts["tokens_generated"] == sum(len(r["token_ids"]) for r in mine), system
            assert counts["rss_bytes"] > 0
        assert set(server["calibration_rps"]) == {"hf-peft", "inlaid-4bit-inlaid"}
        rates, calibrated = server["rates"], server["calibration_rps"]
        high = max(settings.high_load * calibrated["inlaid-4bit-inlaid"], settings.high_vs_baseline * calibrated["hf-peft"])
        ends = (settings.low_load * calibrated["hf-peft"], high)
        assert rates == sorted(rates) and (rates[0], rates[-1]) == pytest.approx((min(ends), max(ends)))


def test_same_requests_same_greedy_answers_on_the_same_fp32_weights(quick):
    report, records, _ = quick
    answers = defaultdict(dict)
    for r in records:
        if r["phase"] == "sweep":
            answers[(r["tasks"], r["popularity"], r["rate_index"], r["request_id"])][r["system"]] = r
    for by_system in answers.values():
        assert len(by_system) == len(SYSTEMS)
        assert len({(r["task"], r["prompt_tokens"]) for r in by_system.values()}) == 1  # the same request ...
        arrivals = [r["arrival_s"] for r in by_system.values()]
        assert max(arrivals) - min(arrivals) < 0.5  # ... at the same time of its trace (client jitter)
    pairs = [(a["hf-peft"]["token_ids"], a["inlaid-fp32-fifo"]["token_ids"]) for a in answers.values()]
    identical = sum(x == y for x, y in pairs)
    assert identical >= len(pairs) - 1  # batched fp32 may flip one near-tie; tests/test_engine_parity.py
    line = next(a for a in report["agreement"] if a["systems"] == ["hf-peft", "inlaid-fp32-fifo"])
    assert (line["compared"], line["identical"]) == (len(pairs), identical)
    assert len({tuple(x) for x, _ in pairs}) > 1  # different tasks and prompts: different answers


def test_headline_and_report_files(quick):
    report, _, out = quick
    (line,) = report["headline"]
    rows = [r for r in report["workloads"] if (r["tasks"], r["popularity"]) == (line["tasks"], line["popularity"])]
    best = max((r for r in rows if r["system"] == "hf-peft"), key=lambda r: r["throughput_rps"])
    assert line["baseline_rps"] == best["throughput_rps"] and line["baseline_p50_s"] == best["latency_s"]["p50"]
    ours = [r for r in rows if r["system"] == "inlaid-4bit-inlaid" and r["latency_s"]["p50"] <= best["latency_s"]["p50"]]
    if ours:
        assert line["ratio_at_equal_or_better_p50"] == pytest.approx(
            max(r["throughput_rps"] for r in ours) / best["throughput_rps"])
    else:
        assert line["ratio_at_equal_or_better_p50"] is None
    markdown = (out / "e2e.md").read_text()
    assert "## Headline" in markdown and markdown.count("| 9 | zipf |") == 1 + len(rows)
    for name in ("throughput_vs_rate", "latency_cdf", "slo_vs_rate", "tasks_per_step", "memory"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["machine_loadavg_before"]) == 3


def test_every_trace_of_a_task_count_asks_the_tasks_the_servers_load():
    """The servers load the adapters of one probe trace's task table (e2e.task_dirs); each rate's
    trace was drawn with its own seed, which named tasks after other families (7 tasks: a
    request for a task no server had, a crash; 100 tasks: 89 of the names another family's, so
    a prompt was answered by another family's adapter). An outside probe of 2026-12-07."""
    from inlaid.scheduling.suite import load_suite_lengths
    from inlaid.scheduling.traces import TaskProfile, TraceSpec, generate_trace

    settings = e2e.E2eSettings()
    for count in (7, 100):
        probe = e2e.make_trace(settings, count, "uniform", 1, settings.seed)
        served = {name: task.family for name, task in probe.tasks.items()}
        for seed in (settings.seed + 1, settings.seed + 2, settings.seed + 1000):
            trace = e2e.make_trace(settings, count, "zipf", 40, seed)
            assert {name: task.family for name, task in trace.tasks.items()} == served, (count, seed)
            assert {request.task for request in trace.requests if request.task} <= set(served)
    # a table that does not fit the trace asked for is refused
    records = [record for record in load_suite_lengths() if record.split == "eval"]
    with pytest.raises(ValueError, match="the task table holds 1 tasks"):
        generate_trace(TraceSpec(rate=1.0, num_requests=4, num_tasks=2, seed=1), records,
                       tasks={"a": TaskProfile("a", records[0].task, 8)})


def test_replicated_adapters_are_perturbed_copies(tmp_path):
    from safetensors.torch import load_file

    from inlaid.engine.adapter_config import read_adapter_spec

    paths = e2e.replicate_adapters({"task-0000": "sentiment", "task-0001": "sentiment"}, tmp_path, 0.05, seed=3)
    source = load_file(str(e2e.ADAPTERS / "sentiment" / "adapter_model.safetensors"))
    copies = [load_file(str(paths[name] / "adapter_model.safetensors")) for name in ("task-0000", "task-0001")]
    for copy in copies:
        assert copy.keys() == source.keys()
        assert read_adapter_spec("task-0000", paths["task-0000"]).rank == read_adapter_spec("s", e2e.ADAPTERS / "sentiment").rank
        for key, value in source.items():
            assert copy[key].dtype == value.dtype and copy[key].shape == value.shape
        key = next(k for k in source if "lora_B" in k)
        nonzero = source[key].float().abs() > 1e-3
        ratio = copy[key].float()[nonzero] / source[key].float()[nonzero] - 1
        assert 0.03 < float(ratio.std()) < 0.07  # the requested perturbation, up to fp16 rounding
    assert any(not (copies[0][k] == copies[1][k]).all() for k in source)  # distinct adapters


def test_replicated_adapters_cache_holds_the_same_copies(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    families = {"task-0000": "sentiment", "task-0001": "qa"}
    first = e2e.replicated_adapters(families, 0.05, seed=3)
    fresh = e2e.replicate_adapters(families, tmp_path / "fresh", 0.05, seed=3)
    for name in families:
        cached, made = (load_file(str(d[name] / "adapter_model.safetensors")) for d in (first, fresh))
        assert cached.keys() == made.keys() and all((cached[k] == made[k]).all() for k in made)
    (first["task-0000"] / "marker").write_text("")  # a second call reuses the folder ...
    assert e2e.replicated_adapters(families, 0.05, seed=3) == first and (first["task-0000"] / "marker").exists()
    other = e2e.replicated_adapters(families, 0.05, seed=4)  # ... another seed gets its own
    assert other["task-0000"].parent != first["task-0000"].parent
    assert [p.name for p in (tmp_path / "cache" / "inlaid" / "e2e-tasks").iterdir()] != []
    assert all("." not in p.name for p in (tmp_path / "cache" / "inlaid" / "e2e-tasks").iterdir())  # no partial left


def _processes_naming(text: str) -> dict[int, str]:
    """Live processes whose command line holds `text`: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def test_ctrl_c_mid_run_stops_every_server_and_says_so(tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the run's whole process group, its servers
    too) once the replays began: the run exits 130 saying that no task count finished, and
    leaves no server, executor or baseline process and no work folder behind."""
    # A short temp dir of the run's own (its servers' ipc sockets live there: paths <= ~100 bytes)
    temporary = Path(tempfile.mkdtemp(prefix="e2e-int-", dir="/tmp"))
    out, errors = tmp_path / "out", tmp_path / "stderr.txt"
    with open(errors, "w") as stderr_file:
        run = subprocess.Popen([sys.executable, str(ROOT / "bench" / "e2e.py"), "--quick", "--out", str(out)],
                               env={**os.environ, "TMPDIR": str(temporary)}, stdout=subprocess.DEVNULL,
                               stderr=stderr_file, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "e2e 9 tasks" not in errors.read_text(errors="replace"):  # the sweep's bar: servers up, calibrated
            assert run.poll() is None and time.monotonic() < deadline, errors.read_text()[-3000:]
            time.sleep(0.1)
        servers = _processes_naming(str(temporary))  # coordinators (their configs) and executors (their sockets)
        assert sum("serve" in command for command in servers.values()) >= len(SYSTEMS), servers
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=120)
        stderr = errors.read_text(errors="replace")
        assert run.returncode == 130, stderr[-3000:]
        assert "e2e: interrupted; the servers are stopped; no task count had finished: no report written" in stderr
        assert not (out / "e2e.json").exists()
        deadline = time.monotonic() + 30  # executors follow their coordinator (PDEATHSIG)
        while _processes_naming(str(temporary)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_naming(str(temporary)) == {}
        assert not list(temporary.glob("inlaid-e2e-*")), list(temporary.iterdir())  # the run's work folder
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for pid in _processes_naming(str(temporary)):
            with contextlib.suppress(ProcessLookupError):  # gone since the scan
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temporary, ignore_errors=True)
