"""A replay that ends early: a server that goes away mid-replay fails the requests left at
once (not each after --timeout-s) and exits 1; Ctrl-C writes what it has and exits 130;
a bad --model is one line; the all-failed summary has no 1e-9 s makespan."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from inlaid.scheduling.traces import Trace, TraceRequest
from inlaid.serve.launcher import ServerProcess

UNREACHABLE = "tcp://127.0.0.1:23611"  # nothing listens here
SERVED = "tcp://127.0.0.1:23612"


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "inlaid.scheduling.replay", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _trace(path: Path, arrivals: list[float], max_tokens: int = 4) -> Path:
    Trace([TraceRequest(a, None, 6, max_tokens, max_tokens) for a in arrivals], {}).save(path)
    return path


def test_ctrl_c_writes_the_records_and_a_partial_summary_and_exits_130(tmp_path: Path) -> None:
    # Arrivals over an hour apart: the replay says the span at start, which tells the test
    # that the replay (and its signal handling) has begun; it then waits for the server.
    trace = _trace(tmp_path / "t.jsonl", [0.0, 4000.0])
    out = tmp_path / "timings.jsonl"
    replay = _start("--trace", str(trace), "--address", UNREACHABLE, "--synthetic-prompts", "--out", str(out),
                    "--ready-timeout-s", "60")
    assert replay.stderr is not None
    first = replay.stderr.readline()
    assert first.startswith("replay: the trace's arrivals span 1.11 h"), first
    time.sleep(0.5)
    replay.send_signal(signal.SIGINT)
    stdout, stderr = replay.communicate(timeout=30)
    assert replay.returncode == 130, (replay.returncode, stderr)
    assert stderr.strip() == "replay: interrupted" and "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["partial"] is True and summary["stopped"] == "interrupted (SIGINT)"
    assert summary["requests"] == 2 and summary["not_sent"] == 2 and summary["makespan_s"] is None
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in records] == ["not sent: interrupted (SIGINT)"] * 2


def test_a_bad_model_is_one_line(tmp_path: Path) -> None:
    trace = _trace(tmp_path / "t.jsonl", [0.0])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text("{bad")
    cases = ((tmp_path / "none", "is not a directory"), (tmp_path / "model", "cannot load the tokenizer"))
    for model, expected in cases:
        done = subprocess.run([sys.executable, "-m", "inlaid.scheduling.replay", "--trace", str(trace), "--address",
                               UNREACHABLE, "--model", str(model)], capture_output=True, text=True, timeout=60)
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("replay: --model: "), err
        assert expected in err


def test_a_server_gone_mid_replay_fails_the_rest_at_once_and_exits_1(tmp_path: Path) -> None:
    # 24 requests over 9.2 s; the server stops after ~3 s (SIGTERM: it finishes what it has
    # and exits). Before, each later request waited --timeout-s for a server long gone.
    trace = _trace(tmp_path / "t.jsonl", [0.4 * i for i in range(24)])
    out = tmp_path / "timings.jsonl"
    config = {"executor": {"max_num_seqs": 4, "num_kv_blocks": 128}, "server": {"address": SERVED}}
    with ServerProcess(config, tmp_path) as server:
        server.wait_ready()
        replay = _start("--trace", str(trace), "--address", SERVED, "--synthetic-prompts", "--ignore-eos",
                        "--out", str(out), "--ready-timeout-s", "2", "--timeout-s", "600")
        time.sleep(5)  # start-up (~2 s), then a few requests
        started = time.monotonic()
        server.terminate()
        stdout, stderr = replay.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert replay.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert "went away" in lines[-2] and "failed at once" in lines[-2], lines
    assert "requests failed (exit status 1)" in lines[-1], lines
    summary = json.loads(stdout)
    assert summary["requests"] == 24 and summary["failed"] >= 1 and summary["not_sent"] >= 1
    assert summary["partial"] is True and "went away" in summary["stopped"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 24
    assert all(r["isolated_s"] is None for r in records)  # not known to a replay (0.0 before)
    # The makespan is the replay's wall time (to the stop), not the finished requests' span
    ends = [r["finish_s"] for r in records if r["finish_s"] is not None]
    assert summary["makespan_s"] >= max(ends, default=0.0) - records[0]["arrival_s"]
