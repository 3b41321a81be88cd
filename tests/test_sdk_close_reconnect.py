"""The SDK's close, reconnect, timeouts and admin arguments, from an outside probe of
2026-12-07: `Client.close()` from another thread while a call waited closed the socket under
its poll (the process died of SIGSEGV in 4 of 5 runs, else a raw ZMQError);
`AsyncClient.reconnect()` left waiting calls to their whole timeout where the sync client
failed them at once; a sync call whose hello came late waited up to twice its `timeout_s`;
`remove_task` / `task_status` sent a name of any type, refused by the server as a malformed
frame. Against a stand-in server (a ROUTER answering hello and admin calls, never a generate)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import msgspec
import pytest

from inlaid.client import (
    AsyncClient, Client, ClientClosedError, ConnectionLostError, InvalidRequestError, RequestTimeoutError,
)
from inlaid.protocol import Cancel, Hello
from inlaid.serve.launcher import free_tcp_port

from test_cli_leftovers_wait import StandInServer


class RecordingServer(StandInServer):
    """The stand-in, recording every request it gets; its hello answered after `hello_delay_s`."""

    def __init__(self, address: str, hello_delay_s: float = 0.0) -> None:
        self.received: list[msgspec.Struct] = []
        self.hello_delay_s = hello_delay_s
        super().__init__(address)

    def _reply(self, request: object) -> msgspec.Struct | None:
        self.received.append(request)
        if isinstance(request, Hello):
            time.sleep(self.hello_delay_s)
        return super()._reply(request)


@pytest.fixture
def stand_in():
    server = RecordingServer(f"tcp://127.0.0.1:{free_tcp_port()}")
    yield server
    server.stop()


def test_close_from_another_thread_fails_the_waiting_call_at_once(stand_in) -> None:
    """Twenty closes at random moments: in the hello, in the generate's wait, or before the call."""
    random.seed(7)
    for attempt in range(20):
        client = Client(stand_in.address, timeout_s=30)
        outcome: list[BaseException] = []
        started = threading.Event()

        def call() -> None:
            started.set()
            try:
                client.generate("never answered", max_tokens=4)
            except BaseException as error:  # noqa: BLE001  (the test reads what it was)
                outcome.append(error)

        worker = threading.Thread(target=call)
        worker.start()
        started.wait(5)
        time.sleep(random.uniform(0.0, 0.15))
        closed_at = time.monotonic()
        client.close()
        worker.join(5)
        assert not worker.is_alive(), attempt
        assert len(outcome) == 1 and isinstance(outcome[0], ClientClosedError), (attempt, outcome)
        assert time.monotonic() - closed_at < 1.0, attempt
        assert client._conn is None  # the socket went, closed by the thread that used it
        with pytest.raises(ClientClosedError):
            client.generate("after close", max_tokens=1)


def test_async_reconnect_fails_waiting_calls_at_once_and_cancels_them(stand_in) -> None:
    async def scenario() -> float:
        async with AsyncClient(stand_in.address, timeout_s=20) as client:
            waiting = asyncio.ensure_future(client.generate("never answered", max_tokens=4))
            while not any(type(r).__name__ == "Generate" for r in stand_in.received):
                await asyncio.sleep(0.01)
            start = asyncio.get_running_loop().time()
            client.reconnect()
            with pytest.raises(ConnectionLostError, match="reconnect"):
                await waiting
            elapsed = asyncio.get_running_loop().time() - start
            await client.handshake()  # the client goes on, on a fresh socket
            return elapsed

    assert asyncio.run(scenario()) < 1.0  # it waited its whole 20 s
    generate_id = next(r.request_id for r in stand_in.received if type(r).__name__ == "Generate")
    deadline = time.monotonic() + 5
    while not any(isinstance(r, Cancel) and r.request_id == generate_id for r in stand_in.received):
        assert time.monotonic() < deadline, "the dropped request was not cancelled on the server"
        time.sleep(0.02)


def test_a_call_waits_its_timeout_once_its_hello_included() -> None:
    """The hello is answered after 1 s, the generate never: the call ends at its 1.5 s, not 2.5."""
    server = RecordingServer(f"tcp://127.0.0.1:{free_tcp_port()}", hello_delay_s=1.0)
    try:
        with Client(server.address, timeout_s=30) as client:
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                client.generate("hi", max_tokens=2, timeout_s=1.5)
            sync_elapsed = time.monotonic() - start

        async def timed() -> float:
            async with AsyncClient(server.address, timeout_s=30) as client:
                start = asyncio.get_running_loop().time()
                with pytest.raises(RequestTimeoutError):
                    await client.generate("hi", max_tokens=2, timeout_s=1.5)
                return asyncio.get_running_loop().time() - start

        async_elapsed = asyncio.run(timed())
    finally:
        server.stop()
    assert 1.4 < sync_elapsed < 2.2 and 1.4 < async_elapsed < 2.2, (sync_elapsed, async_elapsed)


def test_task_names_are_checked_before_anything_is_sent(stand_in) -> None:
    with Client(stand_in.address, timeout_s=5) as client:
        for call in (client.remove_task, client.task_status, client.remove_task_reply):
            with pytest.raises(InvalidRequestError, match="name must be a string, got int") as raised:
                call(5)
            assert raised.value.param == "name"
        with pytest.raises(InvalidRequestError, match="lone surrogate") as raised:
            client.task_status("\ud800")
        assert raised.value.param == "name" and raised.value.request_id

    async def asynchronous() -> None:
        async with AsyncClient(stand_in.address, timeout_s=5) as client:
            for call in (client.remove_task, client.task_status):
                with pytest.raises(InvalidRequestError, match="name must be a string, got None") as raised:
                    await call(None)
                assert raised.value.param == "name"

    asyncio.run(asynchronous())
    assert stand_in.received == []  # nothing reached the server, not even a hello
