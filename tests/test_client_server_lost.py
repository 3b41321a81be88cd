"""A server killed under load: every SDK call waiting on it fails at once with
`ConnectionLostError`, and the same client objects work again once a server is back.

A real `inlaid serve` (coordinator + executor) on a free loopback port gets long generations
from a sync client (a generate and an open stream on one client), from an async client
(three generates and a stream), and over HTTP through a standalone `inlaid http` front (an
AsyncClient inside). With all of them running, the coordinator is SIGKILLed. Each call must
end within a few seconds with the typed error (HTTP: 503 `unavailable`), not after its
timeout. A second server then binds the same address, and each client's next call succeeds:
the clients (and the front) found it by themselves.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from inlaid.client import AsyncClient, Client, TokenStream
from inlaid.serve.launcher import ServerProcess, free_tcp_port
from serving_helpers import executor_pids, server_config, signal_process, wait_gone

CALL_TIMEOUT_S = 20.0  # far above FAIL_BOUND_S: a call that waited for its timeout fails the bound
FAIL_BOUND_S = 5.0  # "at once": the client's socket monitor reports the disconnect in milliseconds
LONG = dict(prompt="Tell me a long story about the sea.", max_tokens=400, ignore_eos=True)  # ~400 steps


def _start(model_dir: Path, address: str, workdir: Path) -> ServerProcess:
    config = server_config(model_dir, {}, address=address, max_pending_requests=32, shutdown_grace_s=2.0)
    workdir.mkdir()
    server = ServerProcess(config, workdir=workdir)
    server.wait_ready(timeout_s=120)
    return server


def _start_front(address: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_tcp_port()
    front = subprocess.Popen([sys.executable, "-m", "inlaid.cli", "http", "--address", address, "--port", str(port),
                              "--request-timeout", str(CALL_TIMEOUT_S), "--log-format", "text"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while _post(url, "/health", None)[0] != 200:
        assert front.poll() is None and time.monotonic() < deadline, "the HTTP front did not come up"
        time.sleep(0.1)
    return front, url


def _post(url: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=data), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:  # not listening yet
        return 0, str(error).encode()


class _Loop:
    """An event loop in a thread: one AsyncClient lives on it across both servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _ended(call: Callable[[], object]) -> tuple[str, float]:
    """How `call` ended (its exception's type name, or "returned") and when (monotonic)."""
    try:
        call()
        return "returned", time.monotonic()
    except Exception as error:  # noqa: BLE001 - the type is the assertion
        return type(error).__name__, time.monotonic()


async def _async_ended(call: Callable[[], Coroutine[Any, Any, object]]) -> tuple[str, float]:
    try:
        await call()
        return "returned", time.monotonic()
    except Exception as error:  # noqa: BLE001 - the type is the assertion
        return type(error).__name__, time.monotonic()


def test_a_killed_server_fails_waiting_calls_at_once_and_the_same_clients_reconnect(model_dir, tmp_path):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    first = _start(model_dir, address, tmp_path / "first")
    second: ServerProcess | None = None
    front, url = _start_front(address)
    loop = _Loop()
    sync_client = Client(address, timeout_s=CALL_TIMEOUT_S)
    async_client = AsyncClient(address, timeout_s=CALL_TIMEOUT_S)
    try:
        executors = executor_pids(first.pid)
        model = sync_client.handshake().model
        completion = {"model": model, **LONG}

        # Sync: a stream left open (its chunks queue up unread) while a generate blocks.
        sync_stream: TokenStream = sync_client.stream(**LONG)
        ends: dict[str, tuple[str, float]] = {}
        http_reply: list[tuple[int, bytes]] = []

        def sync_calls() -> None:
            ends["sync generate"] = _ended(lambda: sync_client.generate(**LONG))
            ends["sync stream"] = _ended(lambda: list(sync_stream))

        def http_call() -> None:
            ends["http"] = _ended(lambda: http_reply.append(_post(url, "/v1/completions", completion)))

        async def async_calls() -> list[tuple[str, float]]:
            async def stream() -> None:
                async for _ in await async_client.stream(**LONG):
                    pass

            calls = [lambda: async_client.generate(**LONG)] * 3 + [stream]
            return list(await asyncio.gather(*(_async_ended(call) for call in calls)))

        threads = [threading.Thread(target=target, daemon=True) for target in (sync_calls, http_call)]
        for thread in threads:
            thread.start()
        async_future = asyncio.run_coroutine_threadsafe(async_calls(), loop.loop)
        with Client(address, timeout_s=10) as watcher:
            deadline = time.monotonic() + 60
            while watcher.stats().requests_running < 7:  # 2 sync, 4 async, 1 HTTP: all generating
                assert time.monotonic() < deadline, watcher.stats()
                time.sleep(0.05)
        killed_at = time.monotonic()
        signal_process(first.pid, signal.SIGKILL)

        ends.update({f"async {i}": end for i, end in enumerate(async_future.result(CALL_TIMEOUT_S + 10))})
        for thread in threads:
            thread.join(CALL_TIMEOUT_S + 10)
        after_kill = {call: (how, round(at - killed_at, 2)) for call, (how, at) in ends.items()}
        assert len(after_kill) == 7, after_kill
        for call, (how, seconds) in after_kill.items():
            expected = "returned" if call == "http" else "ConnectionLostError"  # HTTP: its answer below
            assert how == expected and seconds < FAIL_BOUND_S, after_kill
        ((status, body),) = http_reply
        assert status == 503 and json.loads(body)["error"]["code"] == "unavailable", (status, body)

        # The executor dies with its coordinator; nothing of the first server is left.
        assert first.process.wait(10) == -signal.SIGKILL
        assert all(wait_gone(pid, 30) for pid in executors), "an executor outlived its killed coordinator"

        # The same clients (and front), once a new server listens on the same address.
        second = _start(model_dir, address, tmp_path / "second")
        assert sync_client.generate("Hello", max_tokens=4, ignore_eos=True).finish_reason == "length"
        assert len(list(sync_client.stream("Hello", max_tokens=3, ignore_eos=True))) >= 1
        assert loop.run(async_client.generate("Hello", max_tokens=4, ignore_eos=True)).finish_reason == "length"
        status, body = _post(url, "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 4})
        assert status == 200, body
    finally:
        sync_client.close()
        loop.run(async_client.close())
        loop.stop()
        front.send_signal(signal.SIGTERM)
        front.wait(30)
        first.terminate()
        if second is not None:
            second.terminate()


def test_calls_with_no_server_each_fail_at_their_own_timeout():
    """Concurrent first calls while nothing listens: each waited for the hello of the call
    ahead of it, then its own whole timeout (an outside probe: 5 s calls failed at 5, 10,
    15, 20 s; after a server's SIGTERM, 120-s calls at 120 and 240 s). Now each ends at its
    own deadline; so does each request of the HTTP front, which greets through one client
    (before a port that accepts and never answers: a refused one it answers 503 at once)."""
    import socket

    from inlaid.client import RequestTimeoutError
    from inlaid.http.app import Front
    from inlaid.http.errors import ApiError
    from inlaid.http.settings import HttpConfig

    address = f"tcp://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody speaks ZeroMQ
    silent_address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"

    async def timed(call: Callable[[], Coroutine[Any, Any, Any]], start: float) -> float:
        try:
            await call()
        except RequestTimeoutError:
            return asyncio.get_running_loop().time() - start
        except ApiError as error:  # the front's hello: its 504, naming its own bound
            assert (error.status, error.code) == (504, "timeout"), error.message
            return asyncio.get_running_loop().time() - start
        raise AssertionError("answered by no server")

    async def scenario() -> tuple[list[float], list[float]]:
        loop = asyncio.get_running_loop()
        async with AsyncClient(address, timeout_s=30.0) as client:
            start = loop.time()
            sdk = await asyncio.gather(*(timed(lambda: client.generate("hi", timeout_s=1.0), start) for _ in range(4)))
        front = Front(silent_address, HttpConfig(request_timeout_s=1.0))
        start = loop.time()
        http = await asyncio.gather(*(timed(front.hello, start) for _ in range(4)))
        await front.client.close()
        return sdk, http

    with silent:
        sdk, http = asyncio.run(scenario())
    assert max(sdk) < 1.8 and min(sdk) >= 0.9, sdk
    assert max(http) < 1.8 and min(http) >= 0.9, http
