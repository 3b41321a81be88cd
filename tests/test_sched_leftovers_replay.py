"""`python -m inlaid.scheduling.replay`, the replay's command line: help, one-line refusals
(exit 2) for a missing or malformed trace and for a server that does not answer within the
bounded wait, and per-request timings from a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest
from inlaid.serve.launcher import ServerProcess

ADDRESS = "tcp://127.0.0.1:20660"  # this file's servers: the shared machine's range for this work


def _replay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inlaid.scheduling.replay", *args], capture_output=True, text=True,
                          timeout=timeout)


def _trace(path: Path, tasks: tuple[str | None, ...] = (None, None, None)) -> Path:
    requests = [TraceRequest(0.05 * index, task, 6 + index, 4, 4) for index, task in enumerate(tasks)]
    Trace(requests, {t: TaskProfile(t, "gsm8k", 8) for t in tasks if t is not None}).save(path)
    return path


def _refused(done: subprocess.CompletedProcess[str]) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("replay: "), (done.returncode, err)
    assert "Traceback" not in err
    return err


def test_the_replay_module_has_a_command_line_with_help() -> None:
    done = _replay("--help")
    assert done.returncode == 0
    for option in ("--trace", "--address", "--out", "--ready-timeout-s", "--synthetic-prompts"):
        assert option in done.stdout, done.stdout


def test_a_missing_or_malformed_trace_is_one_line(tmp_path: Path) -> None:
    assert "--trace: cannot read" in _refused(_replay("--trace", str(tmp_path / "none.jsonl"), "--address", ADDRESS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"requests": []}\n')
    assert "line 1 is not a trace header" in _refused(_replay("--trace", str(bad), "--address", ADDRESS))
    _refused(_replay("--trace", str(_trace(tmp_path / "t.jsonl")), "--address", "not-an-address",
                     "--synthetic-prompts"))


def test_an_unreachable_server_is_one_line_after_the_bounded_wait(tmp_path: Path) -> None:
    started = time.monotonic()
    err = _refused(_replay("--trace", str(_trace(tmp_path / "t.jsonl")), "--address", "tcp://127.0.0.1:20661",
                           "--synthetic-prompts", "--ready-timeout-s", "1"))
    assert "not ready within 1 s" in err and time.monotonic() - started < 30


def test_a_trace_not_drawn_from_the_suite_is_told_to_use_synthetic_prompts(tmp_path: Path) -> None:
    err = _refused(_replay("--trace", str(_trace(tmp_path / "t.jsonl")), "--address", ADDRESS))
    assert "--synthetic-prompts" in err


def test_a_replay_writes_per_request_timings(tmp_path: Path) -> None:
    trace = _trace(tmp_path / "t.jsonl")
    out = tmp_path / "out" / "timings.jsonl"
    config = {"executor": {"max_num_seqs": 4, "num_kv_blocks": 128}, "server": {"address": ADDRESS}}
    with ServerProcess(config, tmp_path) as server:
        server.wait_ready()
        done = _replay("--trace", str(trace), "--address", ADDRESS, "--synthetic-prompts", "--ignore-eos",
                       "--out", str(out), timeout=300)
        assert server.terminate() == 0
        log = server.log_path.read_text()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["requests"] == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_tokens"] for r in records] == [6, 7, 8]
    for record in records:
        assert not record["error"] and len(record["token_times"]) == 4
        assert record["arrival_s"] <= record["admitted_s"] <= record["token_times"][0] <= record["finish_s"]
    # The server's own log names the policy serving (fifo: the default) at start.
    assert any(json.loads(line).get("msg") == "scheduling policy" for line in log.splitlines() if line.startswith("{"))
