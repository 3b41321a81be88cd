"""The scheduling tools' inputs and the replay's records, outside probe of 2026-12-06: a bad
--suite-lengths hung sched_sim (its pool respawned failing workers forever), its options were
unchecked (tracebacks, or a whole sweep run before failing), `--quick` ignored --requests,
traces.py's help collapsed a line and drew any number of tasks, and the replay recorded the
trace's prompt length instead of the one sent, cancelled requests a shutting-down server still
finished, and a non-UTF-8 or deeply nested trace line was no one-line error. Each test failed
on the code before."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from inlaid.client import ShuttingDownError
from inlaid.scheduling import replay as replay_module
from inlaid.scheduling.replay import Replay
from inlaid.scheduling.traces import Trace, TraceRequest, TraceSpec

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))


def _run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: a bench script's sys.path[0] is bench/, so `inlaid` must come from this tree
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
                          env=env)


def _sim_refusal(*args: str) -> str:
    """sched_sim.main's refusal (exit status 2, no traceback) and its last stderr line."""
    import sched_sim

    def no_sweep(*_: Any) -> dict:
        raise AssertionError("the sweep started before the options were checked")

    err = StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as raised, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sched_sim, "_sweep", no_sweep)
        sched_sim.main(list(args))
    assert raised.value.code == 2, err.getvalue()
    assert "Traceback" not in err.getvalue()
    return err.getvalue().strip().splitlines()[-1]


def test_a_bad_suite_lengths_file_is_one_line_not_a_hang(tmp_path: Path) -> None:
    """Before: loaded only in the pool's initializer, it failed in every worker, forever."""
    bad = tmp_path / "garbage.jsonl"
    bad.write_text('{"meta": {}, "tasks": []}\n')
    for path in (bad, tmp_path / "missing.jsonl"):
        done = _run(str(BENCH / "sched_sim.py"), "--quick", "--suite-lengths", str(path), "--out-dir",
                    str(tmp_path / "out"))
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1, (done.returncode, err[-2000:])
        assert err.startswith("sched_sim.py: --suite-lengths: ") and str(path) in err
    # sched_tune.py's sweep draws from the same pool: it hung on the same file
    done = _run(str(BENCH / "sched_tune.py"), "--suite-lengths", str(bad), "--out-dir", str(tmp_path / "out"))
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, (done.returncode, err[-2000:])
    assert err.startswith("sched_tune.py: --suite-lengths: ") and str(bad) in err


@pytest.mark.parametrize("args, words", [
    (("--slots", "abc"), "argument --slots: must be comma-separated integers"),
    (("--slots", "8,,4"), "argument --slots: must be comma-separated integers"),
    (("--slots", "0"), "argument --slots: must be comma-separated integers"),
    (("--long-run-s", "nan"), "argument --long-run-s: must be a number of seconds"),
    (("--long-run-s", "-1"), "argument --long-run-s: must be a number of seconds"),
    (("--workers", "0"), "argument --workers: must be an integer in 1.."),
    (("--workers", "-1"), "argument --workers: must be an integer in 1.."),
    (("--requests", "0"), "argument --requests: must be an integer in 1.."),
    (("--requests", "-5"), "argument --requests: must be an integer in 1.."),
])
def test_sched_sim_options_are_checked_before_any_work(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    # Without --quick: the old code ran (or started) the sweep on each of these
    line = _sim_refusal(*args, "--out-dir", str(tmp_path))
    assert words in line, line


def test_render_without_its_json_is_one_line_naming_it(tmp_path: Path) -> None:
    line = _sim_refusal("--render", "--slots", "8", "--out-dir", str(tmp_path))
    assert line.startswith("sched_sim.py: --render: cannot read") and str(tmp_path / "sched_sim_slots8.json") in line


def test_quick_honours_an_explicit_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--quick --requests 20` ran 300 requests a run. The simulation and report are stubbed:
    what is checked is the size of every job the sweep hands out."""
    import sched_report
    import sched_sim

    sizes: list[int] = []

    def fake_run(job: dict) -> dict:
        sizes.append(job["requests"])
        return {**job, "throughput_rps": 1.0}

    monkeypatch.setattr(sched_sim, "_run", fake_run)
    monkeypatch.setattr(sched_report, "write_sim_markdown", lambda report, path: None)
    monkeypatch.setattr(sched_report, "plot_sweep", lambda report, path: None)
    reports = sched_sim.main(["--quick", "--requests", "20", "--slots", "8", "--workers", "1",
                              "--out-dir", str(tmp_path)])
    assert reports[8]["requests_per_run"] == 20 and sizes and set(sizes) == {20}
    sizes.clear()
    sched_sim.main(["--quick", "--slots", "8", "--workers", "1", "--out-dir", str(tmp_path)])
    assert set(sizes) == {300}  # the default stays


def test_traces_help_keeps_its_line_break_and_tasks_are_bounded(tmp_path: Path) -> None:
    done = _run(str(BENCH / "traces.py"), "--help")
    assert "--rate 2 \\\n" in done.stdout and "--rate 2         --requests" not in done.stdout
    with pytest.raises(ValueError, match="num_tasks must be <= 100000"):
        TraceSpec(rate=1.0, num_requests=10, num_tasks=100_001).validate()
    done = _run(str(BENCH / "traces.py"), "--tasks", "100000000", "--out", "t.jsonl", cwd=tmp_path)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "num_tasks must be <= 100000" in err, err
    assert not (tmp_path / "t.jsonl").exists()


def _good_trace(path: Path) -> bytes:
    Trace([TraceRequest(0.0, None, 5, 2, 2), TraceRequest(1.0, None, 5, 2, 2)], {}).save(path)
    return path.read_bytes()


def test_a_non_utf8_or_deeply_nested_trace_line_is_named(tmp_path: Path) -> None:
    good = _good_trace(tmp_path / "good.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(good + b'{"arrival_s": 2.0, \xff\xfe}\n')
    with pytest.raises(ValueError, match=rf"^{binary}: line 4 is not UTF-8 text \(byte 0xff\)$"):
        Trace.load(binary)
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(good + b"[" * 100_000 + b"\n")
    with pytest.raises(ValueError, match=rf"^{deep}: line 4 is not a trace request \(JSON nested too deeply\)$"):
        Trace.load(deep)
    # The replay's command line: one line each, exit status 2, before any connection
    for path, words in ((binary, "line 4 is not UTF-8"), (deep, "line 4 is not a trace request")):
        done = _run("-m", "inlaid.scheduling.replay", "--trace", str(path), "--address", "tcp://127.0.0.1:1",
                    "--synthetic-prompts")
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1, (done.returncode, err[-2000:])
        assert err.startswith(f"replay: --trace: {path}: ") and words in err


class _FakeStream:
    """A streamed answer: `tokens` tokens, `delay_s` apart."""

    def __init__(self, tokens: int, delay_s: float) -> None:
        self.tokens, self.delay_s = tokens, delay_s
        self.result = SimpleNamespace(queue_seconds=0.0)

    async def _chunks(self) -> AsyncIterator[Any]:
        for _ in range(self.tokens):
            await asyncio.sleep(self.delay_s)
            yield SimpleNamespace(token_ids=[7])

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()


class _ShuttingDownClient:
    """A server in a graceful shutdown: the first request (sent before it) streams to its end;
    every later one is refused with ShuttingDownError. Records each prompt it is sent."""

    sent_prompts: list[list[int]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls = 0

    async def __aenter__(self) -> "_ShuttingDownClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def wait_ready(self, timeout_s: float) -> None:
        return None

    async def list_tasks(self, timeout_s: float) -> list[Any]:
        return []

    async def health(self, timeout_s: float) -> None:
        return None

    async def stream(self, prompt_token_ids: list[int], **kwargs: Any) -> _FakeStream:
        self.sent_prompts.append(prompt_token_ids)
        self.calls += 1
        if self.calls > 1:
            raise ShuttingDownError("the server is shutting down")
        return _FakeStream(tokens=4, delay_s=0.1)


def test_a_shutting_down_server_stops_the_sending_but_requests_in_flight_finish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the first ShuttingDownError cancelled request 0, which the server still finished
    (server: finished=10; replay: 9 finished + 1 cancelled)."""
    monkeypatch.setattr(replay_module, "AsyncClient", _ShuttingDownClient)
    _ShuttingDownClient.sent_prompts = []
    trace = Trace([TraceRequest(0.0, None, 9000, 4, 4, "a"), TraceRequest(0.1, None, 9000, 4, 4, "a"),
                   TraceRequest(0.6, None, 9000, 4, 4, "a")], {})
    replay = Replay("tcp://fake", trace, {"a": [1, 2, 3]}, timeout_s=10, ready_timeout_s=5)
    records = asyncio.run(replay.run())
    assert records[0].finished and len(records[0].token_times) == 4, records[0]
    assert records[1].error.startswith("ShuttingDownError")
    assert records[2].error.startswith("not sent: ") and "ShuttingDownError" in records[2].error
    assert "ShuttingDownError" in replay.stopped and replay.sent == 2
    assert len(_ShuttingDownClient.sent_prompts) == 2


def test_the_record_says_the_prompt_length_sent_not_the_trace_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace line of 9,000 prompt tokens naming a 3-token suite prompt recorded 9,000."""
    monkeypatch.setattr(replay_module, "AsyncClient", _ShuttingDownClient)
    _ShuttingDownClient.sent_prompts = []
    trace = Trace([TraceRequest(0.0, None, 9000, 4, 4, "a")], {})
    (record,) = asyncio.run(Replay("tcp://fake", trace, {"a": [1, 2, 3]}, timeout_s=10).run())
    assert record.finished and _ShuttingDownClient.sent_prompts == [[1, 2, 3]]
    assert record.prompt_tokens == 3
