"""Defects an outside probe found in the asyncio client (and the frame limit both clients
share), each against a live `inlaid serve`:

* `close()` with a generate and a stream in flight: both waited their whole timeout and
  raised RequestTimeoutError; now both fail at once with ClientClosedError and the server
  stops running them.
* Cancelling the first call on a new client (its hello still to come) was ignored: the
  task returned the whole result, `asyncio.wait_for(..., 0.0001)` did not time out, and a
  cancelled `stream()` returned a stream whose request kept running. asyncio.wait_for
  (before Python 3.12) swallows a cancellation when what it waits for finishes at the same
  moment, here the hello lock.
* A request far over the server's frame limit made ZeroMQ drop the connection, failing
  every other request on it with ConnectionLostError; the hello now carries the server's
  `max_frame_bytes` and both clients refuse a larger request before sending it.
* One AsyncClient used from two `asyncio.run()` calls: the second call's answer went
  unread (the first loop's reader task was gone) and the call waited its whole timeout.
* A second loop over a stream that failed read as empty, sync and async alike.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest

from inlaid.client import (
    AsyncClient, Client, ClientClosedError, ConnectionLostError, FrameTooLargeError, InlaidError,
)
from inlaid.client.messages import checked_frame_size, encode
from inlaid.protocol import PROTOCOL_VERSION, Generate, HelloReply, SamplingParams, ServerReply
from inlaid.serve.launcher import ServerProcess, free_tcp_port
from serving_helpers import server_config

MAX_FRAME_BYTES = 16_384  # small, so that a prompt over ZeroMQ's cut-off (16x) is cheap to build
OVER_ZMQ_CUTOFF = "a" * (MAX_FRAME_BYTES * 16 + 100_000)  # the server's MAXMSGSIZE drops the connection
AT_ONCE_S = 2.0  # the fixed calls end in milliseconds; the defects waited a timeout or a generation
# Runs ~25 s on a shared CPU: still running whenever a test looks.
LONG = dict(prompt="Tell me a long story about the sea.", max_tokens=400, ignore_eos=True)
# ~6 s: enough to tell a cancelled call from one that ran whole, short when it does (the defect).
MEDIUM = dict(prompt="Tell me a long story about the sea.", max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    config = server_config(model_dir, {}, address=f"tcp://127.0.0.1:{free_tcp_port()}",
                           max_frame_bytes=MAX_FRAME_BYTES, shutdown_grace_s=2.0)
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("server"))
    try:
        process.wait_ready(timeout_s=180)
        yield process
    finally:
        process.terminate()


def _until_idle(address: str, timeout_s: float = 5.0) -> tuple[int, int]:
    """(waiting, running) on the server once both are 0, or as they are after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with Client(address, timeout_s=10) as client:
        while True:
            stats = client.stats()
            counts = (stats.requests_waiting, stats.requests_running)
            if counts == (0, 0) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)


def test_close_fails_an_inflight_generate_and_stream_at_once_and_the_server_stops_them(server):
    async def main() -> tuple[type[BaseException], type[BaseException], float]:
        client = AsyncClient(server.address, timeout_s=10)
        generating = asyncio.create_task(client.generate(**LONG))
        stream = await client.stream(**LONG)
        iterator = aiter(stream)
        await anext(iterator)  # both run on the server now
        closed_at = time.monotonic()
        await client.close()
        with pytest.raises(ClientClosedError) as generate_error:
            await generating
        with pytest.raises(ClientClosedError) as stream_error:
            await anext(iterator)
        with pytest.raises(ClientClosedError):  # a second loop says so again (not "cancelled by an earlier loop")
            [chunk async for chunk in stream]
        assert not client._queues
        return type(generate_error.value), type(stream_error.value), time.monotonic() - closed_at

    _, _, seconds = asyncio.run(main())
    assert seconds < AT_ONCE_S
    assert _until_idle(server.address) == (0, 0)  # cancelled, not generating for nobody


def test_cancelling_the_first_call_on_a_new_client_cancels_it(server):
    async def cancelled_at_once(call: str) -> float:
        client = AsyncClient(server.address, timeout_s=30)
        task = asyncio.create_task(getattr(client, call)(**MEDIUM))
        await asyncio.sleep(0)  # it is inside the hello now
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client._queues
        await client.close()
        return time.monotonic() - started

    async def timed_out_at_once(timeout_s: float) -> float:
        async with AsyncClient(server.address, timeout_s=30) as client:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.generate(**MEDIUM), timeout_s)
            assert not client._queues
            return time.monotonic() - started

    assert asyncio.run(cancelled_at_once("generate")) < AT_ONCE_S
    assert asyncio.run(cancelled_at_once("stream")) < AT_ONCE_S
    for timeout_s in (0.0001, 0.001):
        assert asyncio.run(timed_out_at_once(timeout_s)) < AT_ONCE_S
    assert _until_idle(server.address) == (0, 0)


def test_a_frame_over_the_servers_limit_is_refused_before_sending_and_spares_the_other_requests(server):
    async def main() -> None:
        async with AsyncClient(server.address, timeout_s=60) as client:
            assert (await client.handshake()).max_frame_bytes == MAX_FRAME_BYTES  # the server tells it
            others = [asyncio.create_task(client.generate(**{**MEDIUM, "max_tokens": 8})) for _ in range(3)]
            await asyncio.sleep(0.2)  # all three sent
            for call in (client.generate, client.stream):
                with pytest.raises(FrameTooLargeError, match=f"the limit is {MAX_FRAME_BYTES}") as refused:
                    await call(OVER_ZMQ_CUTOFF, max_tokens=2)
                assert refused.value.request_id  # names the request, as the server's refusal does
            assert [(await other).finish_reason for other in others] == ["length"] * 3
            assert not client._queues

    asyncio.run(main())
    with Client(server.address, timeout_s=60) as client:
        with pytest.raises(FrameTooLargeError, match=f"the limit is {MAX_FRAME_BYTES}"):
            client.generate(OVER_ZMQ_CUTOFF, max_tokens=2)
        assert client.generate("Hi", max_tokens=2).finish_reason == "length"  # the same connection


def test_the_hello_s_frame_limit_is_optional_both_ways():
    old_server_hello = msgspec.msgpack.encode({"type": "hello_reply", "request_id": "r", "protocol_version":
                                               PROTOCOL_VERSION, "server_version": "0", "model": "m",
                                               "max_model_len": 64})
    hello = msgspec.msgpack.decode(old_server_hello, type=ServerReply)
    assert isinstance(hello, HelloReply) and hello.max_frame_bytes is None
    big = encode(Generate(request_id="r", prompt="a" * 100_000, sampling=SamplingParams()))
    assert checked_frame_size(big, hello, "r") is big  # limit unknown: the server judges

    class OldHelloReply(msgspec.Struct, kw_only=True, tag="hello_reply"):  # a client before the field
        request_id: str
        protocol_version: int
        server_version: str
        model: str
        max_model_len: int

    new_hello = msgspec.msgpack.encode(msgspec.structs.replace(hello, max_frame_bytes=MAX_FRAME_BYTES))
    assert msgspec.msgpack.decode(new_hello, type=OldHelloReply).max_model_len == 64


def test_one_client_serves_one_asyncio_run_after_another(server):
    client = AsyncClient(server.address, timeout_s=10)
    assert asyncio.run(client.generate("Hi", max_tokens=2)).finish_reason == "length"
    for _ in range(2):
        started = time.monotonic()
        assert asyncio.run(client.generate("Hi", max_tokens=2)).finish_reason == "length"
        assert time.monotonic() - started < 8.0  # a new loop, a reconnect, a hello, 2 tokens; the defect took 10 s

    async def open_stream():  # type: ignore[no-untyped-def]
        return await client.stream(**LONG)

    left_open = asyncio.run(open_stream())  # its loop ends with the stream unread

    async def read_on() -> None:
        with pytest.raises(ConnectionLostError, match="another event loop"):
            async for _ in left_open:
                pass
        assert not client._queues  # forgotten, not kept for a loop nobody runs
        assert (await client.generate("Hi", max_tokens=2)).finish_reason == "length"

    asyncio.run(read_on())
    asyncio.run(client.close())


def test_a_client_busy_on_another_running_loop_refuses_at_once(server):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    client = AsyncClient(server.address, timeout_s=10)
    try:
        assert asyncio.run_coroutine_threadsafe(client.generate("Hi", max_tokens=2), loop).result(30)
        with pytest.raises(InlaidError, match="another running event loop"):
            asyncio.run(client.generate("Hi", max_tokens=2))
        with pytest.raises(InlaidError, match="another running event loop"):  # it closed the other loop's socket
            asyncio.run(client.close())
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_second_loop_over_a_failed_stream_raises_its_error_again(server):
    """A stream that ended in an error (an unknown task, a per-message timeout) read as empty
    the second time, with `result` None: a retrying loop took the failure for an empty answer
    (an outside probe, 2026-12-07). Sync and async alike."""
    from inlaid.client import RequestTimeoutError, UnknownTaskError

    with Client(server.address, timeout_s=30) as client:
        stream = client.stream("hi", task="nope")
        for _ in range(2):
            with pytest.raises(UnknownTaskError):
                list(stream)
        assert stream.result is None

    async def run() -> None:
        async with AsyncClient(server.address, timeout_s=30) as client:
            await client.generate("hi", max_tokens=1)  # the handshake done: only the stream's wait is short
            stream = await client.stream(**LONG, timeout_s=0.001)
            for _ in range(2):
                with pytest.raises(RequestTimeoutError):
                    [chunk async for chunk in stream]
            stream = await client.stream("hi", task="nope")
            for _ in range(2):
                with pytest.raises(UnknownTaskError):
                    [chunk async for chunk in stream]

    asyncio.run(run())
    assert _until_idle(server.address) == (0, 0)
