"""The SDK's streams, interrupts, timeouts and reconnects against a real server (an outside
probe's findings): a request the caller can no longer read is cancelled on the server, not
left to run to max_tokens with its KV blocks held, and every failure is a typed InlaidError.

One `inlaid serve` for the module (the default model, on a free loopback port); each test
checks the server's own view: `requests_running` back to zero, the `cancelled` outcome counted.
"""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inlaid.cli import main
from inlaid.client import (
    AsyncClient, Client, ClientInUseError, ConnectionLostError, InlaidError, InvalidRequestError, RequestTimeoutError,
    UnknownTaskError,
)
from inlaid.serve.launcher import free_tcp_port

ADDRESS = f"tcp://127.0.0.1:{free_tcp_port()}"
# ~20 tokens/s on a shared CPU: 400 tokens run ~20 s, far past every bound below.
LONG: dict[str, Any] = dict(prompt="Tell me a long story about the sea.", max_tokens=400, ignore_eos=True)
ENDED_S = 5.0  # a cancel takes effect within a step or two


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from inlaid.serve.launcher import ServerProcess
    from serving_helpers import server_config

    process = ServerProcess(server_config(model_dir, {}, address=ADDRESS), workdir=tmp_path_factory.mktemp("server"))
    try:
        process.wait_ready(timeout_s=300)
        yield process
    finally:
        process.terminate()


@pytest.fixture
def observer(server: Any) -> Iterator[Client]:
    """A client of its own for the server's stats, apart from the client under test."""
    with Client(server.address, timeout_s=30) as client:
        _until(lambda: client.stats().requests_running == 0, 60)  # nothing left over from before
        yield client


def _until(predicate: Callable[[], bool], timeout_s: float = ENDED_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def _cancelled(client: Client) -> int:
    match = re.search(r'^inlaid_requests_total\{outcome="cancelled",task="__base__"\} (\S+)$', client.metrics(),
                      re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def _running(client: Client) -> int:
    return client.stats().requests_running


def test_a_sync_stream_dropped_unread_is_cancelled_and_forgotten(observer: Client) -> None:
    before = _cancelled(observer)
    with Client(ADDRESS, timeout_s=30) as client:
        stream = client.stream(**LONG)
        request_id = stream.request_id
        _until(lambda: _running(observer) == 1)
        del stream
        gc.collect()
        assert request_id not in client._inbox  # its replies are no longer kept
        _until(lambda: _running(observer) == 0)
        assert _cancelled(observer) == before + 1
        # Dropped on another thread: the socket is not touched there; the next call sends the cancel.
        holder = [client.stream(**LONG)]
        _until(lambda: _running(observer) == 1)
        dropper = threading.Thread(target=holder.clear)
        dropper.start()
        dropper.join()
        assert client.generate("Hi", max_tokens=1).finish_reason in ("stop", "length")
        _until(lambda: _running(observer) == 0)
        assert _cancelled(observer) == before + 2 and not client._inbox


def test_an_async_stream_dropped_unread_is_cancelled_and_forgotten(observer: Client) -> None:
    before = _cancelled(observer)

    async def run() -> None:
        async with AsyncClient(ADDRESS, timeout_s=30) as client:
            stream = await client.stream(**LONG)
            await asyncio.to_thread(_until, lambda: _running(observer) == 1)
            del stream
            gc.collect()
            await asyncio.sleep(0.1)  # the cancel is scheduled on the loop, not sent from the finalizer
            assert not client._queues
            await asyncio.to_thread(_until, lambda: _running(observer) == 0)
            # Dropped on another thread: scheduled onto the client's loop.
            holder = [await client.stream(**LONG)]
            await asyncio.to_thread(_until, lambda: _running(observer) == 1)
            await asyncio.to_thread(holder.clear)
            await asyncio.to_thread(_until, lambda: _running(observer) == 0)
            assert not client._queues and _cancelled(observer) == before + 2
            kept.append(await client.stream(**LONG))  # outlives its loop (below)

    kept: list[Any] = []
    asyncio.run(run())
    _until(lambda: _running(observer) == 0)  # closing the client ended it (cancelled, or abandoned with the socket)
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        kept.clear()  # its loop is closed: the finalizer does nothing, and raises nothing
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable


def test_ctrl_c_during_generate_cancels_the_request_on_the_server(observer: Client) -> None:
    before = _cancelled(observer)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with Client(ADDRESS, timeout_s=30) as client:
            client.generate("Hi", max_tokens=1)  # the handshake done: the interrupt lands in the wait
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            with pytest.raises(KeyboardInterrupt):
                client.generate(**LONG)
            _until(lambda: _running(observer) == 0)
            assert _cancelled(observer) == before + 1 and not client._inbox
            assert client.generate("Hi", max_tokens=2).text is not None  # the client goes on
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_generate_that_times_out_alone_is_counted_cancelled_not_abandoned(observer: Client) -> None:
    """After a timeout with nothing else waiting, the SDK sends the Cancel and reconnects (the
    server may be dead): the server saw the disconnect before it read the Cancel and counted
    the request `abandoned`, a client that went away (an outside soak: 46 of 393 timeouts;
    alone on its client, some; tests/test_fault_units.py makes the order certain)."""
    before = _cancelled(observer), observer.stats().requests_abandoned

    async def timed_out() -> None:
        async with AsyncClient(ADDRESS, timeout_s=30) as client:
            await client.generate("Hi", max_tokens=1)  # the handshake done
            for _ in range(2):
                with pytest.raises(RequestTimeoutError):
                    await client.generate(**LONG, timeout_s=0.4)
                await client.generate("Hi", max_tokens=1)

    asyncio.run(timed_out())
    with Client(ADDRESS, timeout_s=30) as client:
        client.generate("Hi", max_tokens=1)
        for _ in range(2):
            with pytest.raises(RequestTimeoutError):
                client.generate(**LONG, timeout_s=0.4)
            client.generate("Hi", max_tokens=1)
    _until(lambda: _running(observer) == 0)
    assert (_cancelled(observer), observer.stats().requests_abandoned) == (before[0] + 4, before[1])


def test_timeouts_past_the_shared_bound_are_refused_before_anything_is_sent(observer: Client) -> None:
    from inlaid.cli_args import MAX_SECONDS

    for make in (lambda: Client(ADDRESS, timeout_s=3e6), lambda: AsyncClient(ADDRESS, timeout_s=1e300)):
        with pytest.raises(InvalidRequestError, match="timeout_s") as refused:
            make()  # the sync one raised OverflowError from its poll, after the Generate went out
        assert refused.value.param == "timeout_s"
    received = observer.stats().requests_received
    with Client(ADDRESS, timeout_s=MAX_SECONDS) as client:  # the bound itself is taken, and works
        assert client.generate("Hi", max_tokens=2).finish_reason in ("stop", "length")
        with pytest.raises(InvalidRequestError, match="timeout_s"):
            client.generate("Hi", max_tokens=2, timeout_s=3e6)
        with pytest.raises(InvalidRequestError, match="timeout_s"):
            client.wait_ready(timeout_s=3e6)
    assert observer.stats().requests_received == received + 1  # the refused one never reached it


def test_a_stream_read_after_reconnect_is_a_lost_connection_and_is_cancelled(observer: Client) -> None:
    with Client(ADDRESS, timeout_s=30) as client:
        chunks = iter(client.stream(**LONG))
        next(chunks)
        client.reconnect()
        with pytest.raises(ConnectionLostError, match="reconnect"):  # a raw KeyError('<request id>')
            next(chunks)
        _until(lambda: _running(observer) == 0)  # the dropped request runs for nobody no more
        assert client.generate("Hi", max_tokens=2).finish_reason in ("stop", "length")


def test_refusals_name_the_value_at_fault(observer: Client) -> None:
    """An outside probe: these said what was wrong but not with what (nor where in a list)."""
    with Client(ADDRESS, timeout_s=30) as client:
        with pytest.raises(InvalidRequestError, match=r"in \[0, \d+\), got 1000000 at index 1") as raised:
            client.generate(prompt_token_ids=[5, 1_000_000], max_tokens=1)
        assert raised.value.param == "prompt_token_ids"
        with pytest.raises(InvalidRequestError, match=r"stop_token_ids must be .*, got 1000000 at index 0") as raised:
            client.generate("Hi", max_tokens=1, stop_token_ids=[1_000_000])
        assert raised.value.param == "stop_token_ids"
        with pytest.raises(InvalidRequestError, match="deadline_s must be a positive number of seconds, got -1.0"):
            client.generate("Hi", max_tokens=1, deadline_s=-1)
        with pytest.raises(InvalidRequestError, match=r"exactly one of .* \(got prompt and messages\)"):
            client.generate("Hi", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        # a tokenizer's numpy array is a list of token ids too
        assert client.generate(prompt_token_ids=np.array([5, 6, 7]), max_tokens=1,
                               stop_token_ids=np.array([2])).num_prompt_tokens == 3


def test_cli_stream_ends_the_partial_line_before_a_mid_stream_error(server: Any,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # A counting prompt runs far past the deadline without an end of sequence.
    code = main(["client", "--address", ADDRESS, "generate", "1, 2, 3, 4,", "--max-tokens", "500",
                 "--deadline", "3", "--stream"])  # 500 tokens take ~25 s here
    out, err = capsys.readouterr()
    assert code == 1 and "deadline" in err and len(err.strip().splitlines()) == 1, err
    assert out.strip() and out.endswith("\n") and not out.endswith("\n\n"), repr(out)


def test_cli_stream_ends_the_partial_line_at_ctrl_c(server: Any, capsys: pytest.CaptureFixture) -> None:
    """"inlaid client: interrupted" came on the line of the text streamed so far."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)  # 500 tokens take ~25 s here
        code = main(["client", "--address", ADDRESS, "generate", "1, 2, 3, 4,", "--max-tokens", "500", "--stream"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert code == 130 and err == "inlaid client: interrupted\n", err
    assert out.strip() and out.endswith("\n") and not out.endswith("\n\n"), repr(out)


# ---------------------------------------------------------------- a third probe's findings
SHORT: dict[str, Any] = dict(prompt="The capital of France is", max_tokens=12, ignore_eos=True)
ONE_ITERATOR = "cannot be read again"


def test_a_sync_stream_has_one_iterator_peeked_then_read_on(observer: Client) -> None:
    """`next(iter(stream))` then `list(stream)` read nothing and said nothing: the dropped
    first iterator had cancelled the request. Now the second loop says so; one kept
    iterator reads a first chunk and the rest, which together are the greedy answer."""
    before = _cancelled(observer)
    with Client(ADDRESS, timeout_s=30) as client:
        stream = client.stream(**LONG)
        next(iter(stream))
        with pytest.raises(InlaidError, match=ONE_ITERATOR):
            list(stream)
        _until(lambda: _cancelled(observer) == before + 1 and _running(observer) == 0)
        stream = client.stream(**SHORT)
        chunks = iter(stream)
        first = next(chunks)
        with pytest.raises(InlaidError, match="another loop over it is still open"):
            next(iter(stream))  # a second open iterator would take every other chunk
        rest = list(chunks)
        assert first.text + "".join(chunk.text for chunk in rest) == stream.result.text
        assert stream.result.text == client.generate(**SHORT).text and stream.result.finish_reason == "length"


def test_an_async_stream_peeked_then_read_on_says_why_at_once(observer: Client) -> None:
    """The same with `anext(aiter(stream))`: the second loop waited its whole timeout (the
    first iterator's finalizer removed the reply queue under it), then said "no answer"."""

    async def run() -> None:
        async with AsyncClient(ADDRESS, timeout_s=30) as client:
            stream = await client.stream(**LONG)
            await anext(aiter(stream))
            started = time.monotonic()
            with pytest.raises(InlaidError, match=ONE_ITERATOR):
                [chunk async for chunk in stream]
            assert time.monotonic() - started < 5
            stream = await client.stream(**SHORT)
            chunks = aiter(stream)
            first = await anext(chunks)
            rest = [chunk async for chunk in chunks]
            assert first.text + "".join(chunk.text for chunk in rest) == stream.result.text
            assert stream.result.text == (await client.generate(**SHORT)).text

    asyncio.run(run())
    _until(lambda: _running(observer) == 0)


def test_argument_types_are_refused_by_name_before_sending(observer: Client) -> None:
    """`max_tokens=1.5`, `temperature="hot"`, ... went to the server and came back `malformed`
    (not an InvalidRequestError, no param). Now refused here by name; nothing reaches the server."""
    refused = re.compile(r"^inlaid_frames_refused_total\{[^}]*\} (\S+)$", re.MULTILINE)

    def frames_refused() -> float:
        return sum(float(value) for value in refused.findall(observer.metrics()))

    before = frames_refused()
    with Client(ADDRESS, timeout_s=30) as client:
        for param, value in (("max_tokens", 1.5), ("max_tokens", "4"), ("max_tokens", True), ("temperature", "hot"),
                             ("top_k", 1.5), ("top_p", "0.5"), ("seed", 1.0), ("ignore_eos", "yes"),
                             ("deadline_s", "5"), ("deadline_s", True)):
            with pytest.raises(InvalidRequestError, match=f"^{param} must be") as raised:
                client.generate("Hi", **{param: value})
            assert raised.value.param == param, (param, value)
        # an int is a number (and a numpy number the Python number it stands for)
        assert client.generate("Hi", temperature=1, max_tokens=np.int64(2), seed=3).finish_reason == "length"
    assert frames_refused() == before


def test_a_sync_client_used_by_two_threads_at_once_says_so() -> None:
    """A second thread's call while one runs took the other's replies; one call timed out at
    random with "no answer". Now every call that would touch the sockets is refused at once
    (ClientInUseError), and a cancel from another thread waits for the owner's next call. A
    server that never answers holds the first call for as long as the test needs."""
    import zmq

    silent = zmq.Context.instance().socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=30) as client:
            outcome: list[BaseException] = []
            runner = threading.Thread(target=lambda: outcome.append(pytest.raises(
                RequestTimeoutError, client.health, timeout_s=3).value))
            runner.start()
            assert silent.poll(10_000)  # its request arrived: the runner's call is under way
            for call in (client.health, client.stats, client.list_tasks, client.reconnect, client.handshake,
                         lambda: client.generate("Hi"), lambda: client.stream("Hi")):
                with pytest.raises(ClientInUseError, match="in use by another thread"):
                    call()
            client.cancel("r-1")  # from another thread: kept for the owner, not refused
            assert list(client._deferred) == [("cancel", "r-1")]
            runner.join(10)
            assert len(outcome) == 1 and isinstance(outcome[0], RequestTimeoutError)
            with pytest.raises(RequestTimeoutError):  # this thread's turn now: no refusal
                client.health(timeout_s=0.2)
            assert not client._deferred
    finally:
        silent.close(linger=0)


def test_a_stream_read_while_another_thread_calls_is_not_cancelled() -> None:
    """A refusal of the client's socket is momentary: the stream stays open (it was closed,
    and its request cancelled, by the refusal's exit from the loop)."""
    from inlaid.client import TokenStream

    class Busy:
        _inbox = {"r-2": []}
        cancels: list[str] = []

        def _next_reply(self, request_id: str, deadline: float) -> Any:
            raise ClientInUseError("this Client is in use by another thread")

        def _cancel_quietly(self, request_id: str) -> None:
            self.cancels.append(request_id)

        def _stream_dropped(self, request_id: str, owner_thread: int) -> None:
            self.cancels.append(request_id)

    busy = Busy()
    stream = TokenStream(busy, "r-2", 5.0)  # type: ignore[arg-type]
    with pytest.raises(ClientInUseError):
        list(stream)
    assert busy.cancels == [] and not stream._left_early and not stream._done
    with pytest.raises(ClientInUseError):  # and it may be read again (not "cannot be read again")
        next(iter(stream))


def test_the_base_models_name_is_no_task_and_the_error_says_what_is(observer: Client) -> None:
    with pytest.raises(UnknownTaskError, match=r"\(for the base model, send no task\); this server has: none"):
        observer.generate("Hi", task="SmolLM2-135M-Instruct", max_tokens=2)
