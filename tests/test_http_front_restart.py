"""The HTTP front's supervisor when a front ends by itself: restarted, unless the server has
begun its stop (a SIGTERM to the whole cgroup reaches the front as the server drains: a fresh
front then took connections during the drain, a reviewer). The front's process is a stand-in
that runs a moment and exits 0, as a drained front does; the supervisor is the real one."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from inlaid.http.process import HttpFrontProcess
from inlaid.http.settings import HttpConfig
from inlaid.serve.launcher import free_tcp_port


def _supervised(server_stopping) -> HttpFrontProcess:  # type: ignore[no-untyped-def]
    front = HttpFrontProcess("ipc:///tmp/unused.ipc", HttpConfig(port=free_tcp_port()), "WARNING", "json",
                             server_stopping=server_stopping)
    front.bind()  # the listening socket the server holds for its fronts
    starts: list[int] = []

    async def spawn() -> None:  # a front that drains and exits 0 after 1.2 s (past the clean-exit second)
        front._process = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(1.2)")
        starts.append(front._process.pid)

    async def watch(process) -> None:  # type: ignore[no-untyped-def]  # (no liveness asks to a stand-in)
        await process.wait()

    front._spawn = spawn  # type: ignore[method-assign]
    front._watch = watch  # type: ignore[method-assign]
    front.starts = starts  # type: ignore[attr-defined]
    return front


def test_a_front_ending_once_the_server_stops_is_not_started_again() -> None:
    async def scenario() -> tuple[int, int]:
        stopping = {"now": False}
        front = _supervised(lambda: stopping["now"])
        supervisor = asyncio.get_running_loop().create_task(front._supervise())
        await asyncio.sleep(0.3)
        stopping["now"] = True  # the server's stop begins while its front drains
        await asyncio.wait_for(supervisor, 10)  # the supervisor ends: no new front
        # and no connection waits in the backlog of a port no front will serve (a reviewer)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", front.config.port), timeout=2).close()
        return len(front.starts), front.restarts  # type: ignore[attr-defined]

    assert asyncio.run(scenario()) == (1, 0)


def test_a_front_ending_while_the_server_serves_is_started_again() -> None:
    async def scenario() -> int:
        front = _supervised(lambda: False)
        front.start()
        while len(front.starts) < 2:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        await front.stop()
        return front.restarts

    assert asyncio.run(scenario()) >= 1
