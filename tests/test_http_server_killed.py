"""The coordinator SIGKILLed behind the HTTP fronts (an outside probe's findings).

One `inlaid serve` with `[http]` (its own front, which exits once its coordinator is gone)
and a standalone `inlaid http` in front of the same server. With requests running on both,
the coordinator is SIGKILLed. Every request, running or sent afterwards, must be answered
at once with OpenAI's JSON error, 503 `unavailable` (a stream: its error event). Before:
a request sent after the kill waited for a hello no server would answer, 20 s (the front's
request timeout here) to a 504 on the standalone front, and on `inlaid serve`'s front until
uvicorn's 5-s graceful shutdown cancelled it, a plain-text 500.

Then the killed coordinator's private ipc directory, left in TMPDIR (its cleanup never
ran), is removed by the next server's start, while a live process's directory is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from http_harness import error_of, http_request, wait_running
from serving_helpers import server_config
from test_client_server_lost import _start_front

from inlaid.serve.launcher import ServerProcess

ANSWER_BOUND_S = 1.5  # "at once": a refused connect or a lost connection is known within milliseconds
LONG = {"max_tokens": 400, "ignore_eos": True}  # ~400 steps: still running when the coordinator dies


def _timed(url: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes, float]:
    """(status, headers in lower case, body, seconds); status 0 when the connection was refused."""
    start = time.monotonic()
    try:
        status, headers, data = http_request(SimpleNamespace(http_url=url), "GET" if body is None else "POST",
                                             path, body)
    except (urllib.error.URLError, ConnectionError) as error:
        return 0, {}, str(error).encode(), time.monotonic() - start
    return status, {k.lower(): v for k, v in headers.items()}, data, time.monotonic() - start


def _unavailable(answer: tuple[int, dict[str, str], bytes, float]) -> None:
    status, headers, body, seconds = answer
    assert status == 503 and headers.get("content-type") == "application/json", answer
    error = error_of(body)
    assert error["type"] == "server_error" and error["code"] == "unavailable", error
    assert headers.get("retry-after") == "1" and seconds < ANSWER_BOUND_S, answer


def _stream_error(answer: tuple[int, dict[str, str], bytes, float]) -> dict[str, Any]:
    status, _, body, _ = answer
    assert status == 200, answer
    last = body.decode().strip().split("\n\n")[-1]
    assert last.startswith("data: {"), body[-500:]
    return json.loads(last.removeprefix("data: "))["error"]


def test_a_killed_coordinator_is_answered_at_once_and_its_ipc_directory_removed(model_dir, tmp_path, monkeypatch):
    # A short TMPDIR of this test's own (the ipc socket path must stay under ~100 bytes):
    # the directories in it are this test's alone.
    temporary = Path(tempfile.mkdtemp(prefix="ipc-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(temporary))
    config = server_config(model_dir, {}, max_pending_requests=32, shutdown_grace_s=2.0)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = ServerProcess({**config, "http": {"request_timeout_s": 20.0}}, workdir=tmp_path / "first")
    second: ServerProcess | None = None
    front = None
    try:
        first.wait_ready(timeout_s=120)
        front, alone_url = _start_front(first.address)  # its request timeout: 20 s
        with first.client() as client:
            model = client.handshake().model
        fronts = {"serve": first.http_url, "alone": alone_url}
        chat = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}]}
        completion = {"model": model, "prompt": "Count to a thousand:"}
        with ThreadPoolExecutor(8) as pool:
            running = {(name, kind): pool.submit(_timed, url, f"/v1/{kind}", {**body, **LONG, "stream": stream})
                       for name, url in fronts.items()
                       for kind, body, stream in (("completions", completion, False), ("chat/completions", chat, True))}
            wait_running(first, len(running))
            os.kill(first.pid, signal.SIGKILL)  # not reaped yet: a zombie while the second server starts

            # The `inlaid serve` front lives on until it sees its coordinator gone (within 0.5 s):
            # whatever it accepts meanwhile is answered 503 at once, the rest is refused.
            # (Its 0.5-s watch may fire in the few milliseconds before the first request: then every
            # request is refused at once, also right; tests/test_http_unreachable_race.py holds the
            # race still for the 503.)
            answered = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                answer = _timed(first.http_url, "/v1/completions", {**completion, "max_tokens": 2})
                if answer[0] == 0:
                    assert answered or answer[3] < ANSWER_BOUND_S, answer
                    break
                answered.append(answer)
                time.sleep(0.05)
            for answer in answered:
                _unavailable(answer)

            # The standalone front outlives the server: every route says so at once.
            after = {path: pool.submit(_timed, alone_url, path, body) for path, body in (
                ("/v1/completions", {**completion, "max_tokens": 2}),
                ("/v1/chat/completions", {**chat, "max_tokens": 2}),
                ("/v1/completions?stream", {**completion, "max_tokens": 2, "stream": True}),
                ("/v1/chat/completions?stream", {**chat, "max_tokens": 2, "stream": True}),
                ("/v1/models", None), ("/metrics", None))}
            health = _timed(alone_url, "/health")
            assert health[0] == 503 and json.loads(health[2]) == {"status": "unreachable"}, health
            assert health[3] < ANSWER_BOUND_S, health
            for path, answer in after.items():
                _unavailable(answer.result(60))

            # The requests that were running: the lost connection, in OpenAI's error forms (a
            # stream whose first piece had not come yet gets the error status instead).
            for (name, kind), future in running.items():
                answer = future.result(60)
                if answer[0] == 200 and kind == "chat/completions":
                    assert _stream_error(answer)["code"] == "unavailable", (name, answer)
                else:
                    _unavailable((*answer[:3], 0.0))

        # The killed coordinator left its ipc directory; the next start removes it (its pid is
        # a zombie now), not a live process's, nor what is not Inlaid's.
        left = sorted(temporary.glob("inlaid-*"))
        assert left, "the killed coordinator's ipc directory"
        live = temporary / f"inlaid-ipc-{os.getpid()}-live"
        other = temporary / "inlaid-server-kept"
        for keep in (live, other):
            keep.mkdir()
        second = ServerProcess(config, workdir=tmp_path / "second")
        second.wait_ready(timeout_s=120)
        assert not any(path.exists() for path in left), left
        assert live.exists() and other.exists()
        assert list(temporary.glob(f"inlaid-ipc-{second.pid}-*")), "the second server's own ipc directory"
    finally:
        if front is not None:
            front.send_signal(signal.SIGTERM)
            front.wait(30)
        first.terminate()
        if second is not None:
            second.terminate()
        shutil.rmtree(temporary, ignore_errors=True)
