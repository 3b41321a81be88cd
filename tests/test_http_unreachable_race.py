"""The HTTP front when its server dies between its reachability check and the SDK call.

CI caught it: `inlaid serve`'s front answered a request sent a moment after its coordinator
was SIGKILLed with uvicorn's plain-text 500, 5 s later, not 503 `unavailable` at once. The
front checked reachability only while its SDK client held no hello; the request found the
hello still held (the disconnect not read yet), and the SDK call then found the connection
lost, dropped it and greeted the dead server again, a hello that waits its whole timeout.
Now the front's clients refuse a request sent with no hello held (the hello, a health ask)
themselves when nothing accepts connections. (/health's ask, which needs no hello, waited its
2-s bound the same way: a helper hunting flaky tests under load found it.)

The server is a stand-in (a ZeroMQ ROUTER answering hello, `test_cli_leftovers_wait.py`);
the front and its SDK client are the real ones. The loop is held still with a blocking
sleep, so the disconnect waits unread in the monitor exactly as it did in the race.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_cli_leftovers_wait import StandInServer

from inlaid.client import ConnectionLostError
from inlaid.http.app import Front
from inlaid.http.settings import HttpConfig
from inlaid.protocol import Health, HealthReply
from inlaid.serve.launcher import free_tcp_port

AT_ONCE_S = 1.5  # a refused connect answers in milliseconds; the hello's bound here is 10 s
WAIT_BOUND_S = 8.0  # the old code's hello ran into the client's 10-s timeout


async def _front_holding_a_hello() -> tuple[Front, StandInServer]:
    server = StandInServer(f"tcp://127.0.0.1:{free_tcp_port()}")
    front = Front(server.address, HttpConfig(request_timeout_s=10.0))
    assert (await front.hello()).model == "none"
    return front, server


CALLS = {  # what a request makes of the SDK once the front holds the hello: a generate, /health's ask
    "generate": lambda front: front.client.generate("hi", max_tokens=2),
    "health": lambda front: front.client.health(timeout_s=5.0),  # no hello of its own: `_HEALTH_TIMEOUT_S` was spent
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_loss_found_by_the_sdk_call_after_the_front_check_is_refused_at_once(call: str) -> None:
    async def scenario() -> None:
        front, server = await _front_holding_a_hello()
        try:
            server.stop()
            time.sleep(0.3)  # blocking: the disconnect is queued in the monitor, nobody has read it
            assert (await front.hello()).model == "none"  # the held hello, as a request finds it
            start = time.monotonic()
            with pytest.raises(ConnectionLostError, match="unreachable"):
                await asyncio.wait_for(CALLS[call](front), WAIT_BOUND_S)
            assert time.monotonic() - start < AT_ONCE_S
        finally:
            await front.client.close()

    asyncio.run(scenario())


def test_a_loss_read_between_the_front_check_and_its_hello_is_refused_at_once() -> None:
    async def scenario() -> None:
        front, server = await _front_holding_a_hello()
        try:
            server.stop()
            await asyncio.sleep(0.3)  # the SDK's reader sees the disconnect and drops the hello
            assert front.client.server is None
            start = time.monotonic()
            with pytest.raises(ConnectionLostError, match="unreachable"):
                await asyncio.wait_for(front.hello(), WAIT_BOUND_S)
            assert time.monotonic() - start < AT_ONCE_S
            # A stream's own hello, and the admin client's, refuse the same way.
            with pytest.raises(ConnectionLostError, match="unreachable"):
                await asyncio.wait_for(front.client.stream("hi", max_tokens=2), WAIT_BOUND_S)
            admin = front._sdk_admin_client("token")
            with pytest.raises(ConnectionLostError, match="unreachable"):
                await asyncio.wait_for(admin.list_tasks(), WAIT_BOUND_S)
            await admin.close()
            assert time.monotonic() - start < 3 * AT_ONCE_S
        finally:
            await front.client.close()

    asyncio.run(scenario())


def test_a_server_that_comes_back_is_greeted_again() -> None:
    """The refusal is per hello, not sticky: a server listening again is served at once."""
    async def scenario() -> None:
        front, server = await _front_holding_a_hello()
        replacement = None
        try:
            server.stop()
            await asyncio.sleep(0.3)
            with pytest.raises(ConnectionLostError):
                await front.hello()
            replacement = StandInServer(server.address)
            assert (await asyncio.wait_for(front.hello(), WAIT_BOUND_S)).model == "none"
        finally:
            await front.client.close()
            if replacement is not None:
                replacement.stop()

    asyncio.run(scenario())


class _HealthAnswering(StandInServer):
    """The stand-in, answering health asks too (they need no hello)."""

    def _reply(self, request: object):
        if isinstance(request, Health):
            return HealthReply(request_id=request.request_id, status="ok", executor_ready=True, uptime_seconds=1.0)
        return super()._reply(request)


def test_a_loss_during_the_reachability_check_is_checked_again() -> None:
    """A reviewer's sequence: no hello held (a health ask needs none), the check passes, and
    the server dies while it runs; the SDK's reader drops the connection meanwhile, and the
    request, which had no queue yet to hear of it, went out on a fresh socket to the dead
    server: its whole timeout. Now the check runs again, and refuses."""
    async def scenario() -> None:
        server = _HealthAnswering(f"tcp://127.0.0.1:{free_tcp_port()}")
        front = Front(server.address, HttpConfig(request_timeout_s=10.0))
        assert (await front.client.health()).status == "ok" and front.client.server is None
        checks: list[int] = []
        real_check = front.refuse_when_unreachable

        async def dies_during_the_first_check() -> None:
            checks.append(1)
            if len(checks) == 1:  # reachable when probed; then it dies and the reader sees it
                server.stop()
                await asyncio.sleep(0.3)
                return
            await real_check()

        front.client.reachability_check = dies_during_the_first_check
        try:
            start = time.monotonic()
            with pytest.raises(ConnectionLostError, match="unreachable"):
                await asyncio.wait_for(front.client.health(timeout_s=5.0), WAIT_BOUND_S)
            assert time.monotonic() - start < AT_ONCE_S + 0.3 and len(checks) == 2
        finally:
            await front.client.close()

    asyncio.run(scenario())
