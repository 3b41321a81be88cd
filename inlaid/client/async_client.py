"""asyncio client: any number of concurrent requests over one socket.

A reader task sorts replies into one queue per request id. Cancelling the task awaiting
`generate` (or leaving a stream early) cancels the request on the server. The stream a
`stream()` call returns is `async_stream.AsyncTokenStream`; the calls of one request and one
reply (health, stats, the admin calls on tasks, ...) are in `async_calls.py`.

The client follows the running event loop: used from a new one (a second `asyncio.run()`),
it drops the socket whose reader task died with the old loop and connects afresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from inlaid.client.arguments import ChatMessageArg, checked_seconds
from inlaid.client.connection import Connection, connection_lost
from inlaid.client.async_stream import AsyncTokenStream
from inlaid.client.async_calls import AsyncCalls
from inlaid.client.errors import ClientClosedError, ConnectionLostError, InlaidError, RequestTimeoutError
from inlaid.client.messages import (
    DEFAULT_ADDRESS,
    GenerateResult,
    RequestIds,
    build_generate,
    call_timeout,
    check_hello,
    checked_address,
    checked_frame_size,
    encode,
    expect,
    hello,
)
from inlaid.protocol import (
    Cancel,
    Generate,
    GenerateDone,
    HelloReply,
    SamplingParams,
    ServerReply,
)

# What a request's queue holds: its replies, then the error that ended it before its answer
# came (ConnectionLostError: the connection broke; ClientClosedError: close() was called).
_Queue = asyncio.Queue[ServerReply | InlaidError]


class AsyncClient(AsyncCalls):
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = 120.0,
        admin_token: str | None = None,
        client_name: str = "inlaid-async-client",
        reachability_check: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.address = checked_address(address)
        # Awaited before each request sent while no hello is held (the hello itself, a health
        # ask); what it raises fails the call at once. Such a request to a dead server waits
        # its whole timeout otherwise (a DEALER never says that nothing listens); the HTTP
        # front refuses then when nothing accepts connections (http/reachability.py).
        self.reachability_check = reachability_check
        self.timeout_s = checked_seconds(timeout_s, "timeout_s")
        self.admin_token = admin_token
        self.client_name = client_name
        self.server: HelloReply | None = None
        self._ids = RequestIds()
        self._queues: dict[str, _Queue] = {}
        self._conn: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._handshake_lock: asyncio.Lock | None = None
        # The loop the connection's reader task, queues and lock belong to (_follow_loop).
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ connection
    def _sock(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise ClientClosedError("the client is closed")
        self._follow_loop()
        if self._conn is None:
            self._conn = Connection(zmq.asyncio.Context.instance(), self.address)
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(self._conn))
            self.server = None
        return self._conn.socket

    async def _read_loop(self, conn: Connection) -> None:
        # One task reads both sockets, replies first, so answers sent before a disconnect are not
        # failed by it; it only awaits readiness, so a cancel never loses a frame it took.
        poller = zmq.asyncio.Poller()
        poller.register(conn.socket, zmq.POLLIN)
        poller.register(conn.monitor, zmq.POLLIN)
        try:
            while self._conn is conn:
                await poller.poll()
                self._deliver(conn)
                self._check_connection()
        except (zmq.ZMQError, asyncio.CancelledError):
            return

    def _deliver(self, conn: Connection) -> None:
        for reply in conn.replies():
            queue = self._queues.get(reply.request_id)
            if queue is not None:
                queue.put_nowait(reply)

    def _check_connection(self) -> None:
        # Also before each new request, lest it be failed by a disconnect older than itself.
        # On a loss each waiting request and open stream gets its own error after what it has
        # received, and the socket goes: frames queued in it would reach a restarted server
        # and run for nobody; the next call opens a fresh one.
        self._follow_loop()
        conn = self._conn
        if conn is None or not conn.lost():
            return
        self._deliver(conn)
        if self._reader is asyncio.current_task():
            self._reader = None  # it ends by itself
        self._drop_connection()
        for request_id, queue in self._queues.items():
            queue.put_nowait(connection_lost(request_id))

    def _follow_loop(self) -> None:
        """Start over on a new running loop. The old loop's reader task is gone (asyncio.run
        cancels what is left when it ends) and nothing would read this socket again: every
        answer waited its whole timeout. Requests still open from the old loop (a stream not
        read to its end) are forgotten: their next read raises ConnectionLostError (`_next`),
        and the server abandons them with the old connection."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._refuse_another_running_loop()
        old_loop, self._loop = self._loop, loop
        if old_loop is None:
            return
        self._drop_connection()
        self._handshake_lock = None  # an asyncio.Lock binds to the loop it first waits on
        self._queues.clear()  # refilled, they were never read (their streams' finalizers do nothing off their loop)

    def _refuse_another_running_loop(self) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop() and self._loop.is_running():
            # in another thread: no socket serves two loops (nor may one loop close another's)
            raise InlaidError("this AsyncClient is in use on another running event loop; "
                              "make one client per event loop")

    def reconnect(self) -> None:
        """Drop the socket and connect afresh at the next call. Each call still waiting and each
        open stream fails at once with ConnectionLostError (they waited their whole timeout,
        where the sync Client failed them at once), and their requests are cancelled on the
        server. Not from another thread while the client's loop runs (InlaidError: its socket
        is that loop's); with no loop running, it only drops the socket."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # no running loop here: no queue may be touched from this thread
            running = None
        if self._loop is not None and self._loop is not running and self._loop.is_running():
            raise InlaidError("this AsyncClient is in use on another running event loop; reconnect it from there")
        if running is not None and self._loop is running:
            for request_id, queue in self._queues.items():
                self._cancel_nowait(request_id)  # before the socket goes (its linger sends them)
                queue.put_nowait(ConnectionLostError("the request was dropped by AsyncClient.reconnect() before its "
                                                     "end", request_id))
        self._drop_connection()

    def _drop_connection(self) -> None:
        """Close the socket and stop its reader, failing nothing (the callers fail what waits)."""
        if self._reader is not None:
            try:
                self._reader.cancel()
            except RuntimeError:  # its loop is closed (a reader a finished asyncio.run left behind)
                pass
            self._reader = None
        if self._conn is not None:
            self._conn.close(linger_ms=100)  # lets a last cancel go out
            self._conn = None
        self.server = None

    async def close(self) -> None:
        """Close the socket. Each call still waiting for its answer and each open stream fails
        at once with ClientClosedError (they waited their whole timeout); their requests are
        cancelled on the server (the server also abandons a closed connection's requests)."""
        self._refuse_another_running_loop()
        self._closed = True  # first: nothing reopens the socket
        if self._loop is asyncio.get_running_loop():
            for request_id, queue in self._queues.items():
                self._cancel_nowait(request_id)  # idempotent on the server: a finished or unknown id is ignored
                queue.put_nowait(ClientClosedError("the client was closed before the answer came", request_id))
        else:  # requests of a loop that ended: nobody waits on them, and the server abandons them with the socket
            self._queues.clear()
        self._drop_connection()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def handshake(self, timeout_s: float | None = None) -> HelloReply:
        self.server = check_hello(await self._roundtrip(hello(self._ids.next(), self.client_name), timeout_s))
        return self.server

    # ------------------------------------------------------------------ plumbing
    async def _send(self, message: msgspec.Struct | bytes) -> None:
        await self._sock().send(message if isinstance(message, bytes) else encode(message))

    async def _next(self, request_id: str, timeout_s: float) -> ServerReply:
        self._follow_loop()  # a stream read on in a new loop: its request went with the old one
        queue = self._queues.get(request_id)
        if queue is None:  # forgotten by _follow_loop: a KeyError said nothing
            raise ConnectionLostError("the request was made on another event loop, which ended; this client "
                                      "reconnected on the current one", request_id)
        if queue.empty():
            getting = asyncio.ensure_future(queue.get())
            if not await _finished_within(getting, timeout_s):
                raise RequestTimeoutError(f"no answer from {self.address} in time", request_id)
            reply = getting.result()
        else:
            reply = queue.get_nowait()
        if isinstance(reply, InlaidError):
            raise reply
        return reply

    async def _roundtrip(self, message: Any, timeout_s: float | None, frame: bytes | None = None) -> ServerReply:
        request_id = message.request_id
        wait_s = call_timeout(timeout_s, self.timeout_s)
        frame = frame or encode(message)  # an unencodable request fails here, before anything is registered
        await self._checked_connection()
        frame = checked_frame_size(frame, self.server, request_id)
        self._queues[request_id] = asyncio.Queue()
        answered = False
        try:
            await self._send(frame)
            reply = await self._next(request_id, wait_s)
            answered = True
            return reply
        except RequestTimeoutError:
            if isinstance(message, Generate):
                self._cancel_nowait(request_id)
            answered = True
            self._after_timeout(request_id)
            raise
        except (ConnectionLostError, ClientClosedError):
            answered = True  # nothing to cancel: the server that had it is gone, or close() cancelled it
            raise
        finally:
            if not answered and isinstance(message, Generate):
                self._cancel_nowait(request_id)  # the awaiting task was cancelled
            self._queues.pop(request_id, None)

    async def _checked_connection(self) -> None:
        """`_check_connection`, then `reachability_check` while no hello is held (a loss found
        here drops it). Again if the connection was lost during that check: a request with
        no queue yet hears of no loss, and would go out on a fresh socket to a dead server."""
        while True:
            self._check_connection()
            if self.server is not None or self.reachability_check is None:
                return
            conn = self._conn
            await self.reachability_check()
            if conn is None or self._conn is conn:
                return

    def _after_timeout(self, request_id: str) -> None:
        # A dead server leaves a socket that may never answer; start over unless other
        # requests still wait on this one.
        if all(other == request_id for other in self._queues):
            self._drop_connection()

    def _cancel_nowait(self, request_id: str) -> None:
        if self._conn is None:
            return
        try:
            self._conn.socket.send(encode(Cancel(request_id=request_id)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def _ensure_handshake(self, deadline: float) -> float:
        """Greet the server once (many first calls at once: one hello), within the call's
        `deadline` (the loop's clock); the seconds left of it. The wait for another call's
        hello counts: each call queued behind a hello to no server waited its own whole
        timeout after the previous one's, so four calls of 5 s failed at 5, 10, 15, 20 s."""
        loop = asyncio.get_running_loop()
        if self.server is None:
            lock = self._handshake_lock = self._handshake_lock or asyncio.Lock()
            acquiring = asyncio.ensure_future(lock.acquire())
            try:
                acquired = await _finished_within(acquiring, max(0.0, deadline - loop.time()))
            except BaseException:  # cancelled: a lock it took at the same moment is given back
                if acquiring.done() and not acquiring.cancelled():
                    lock.release()
                raise
            if not acquired:
                raise RequestTimeoutError(f"no answer from {self.address} in time")
            try:
                if self.server is None:
                    await self.handshake(self._left(deadline))
            finally:
                lock.release()
        return self._left(deadline)

    def _left(self, deadline: float) -> float:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise RequestTimeoutError(f"no answer from {self.address} in time")
        return left

    async def _call(self, message: Any, kind: type[Any], timeout_s: float | None = None) -> Any:
        wait_s = call_timeout(timeout_s, self.timeout_s)
        deadline = asyncio.get_running_loop().time() + wait_s
        frame = encode(message)  # a request msgpack cannot carry fails before the handshake
        self._check_connection()  # a server restarted unnoticed is greeted again
        left = await self._ensure_handshake(deadline)
        return expect(await self._roundtrip(message, left, frame), kind)

    # ------------------------------------------------------------------ API
    async def generate(
        self,
        prompt: str | None = None,
        *,
        task: str | None = None,
        messages: Sequence[ChatMessageArg] | None = None,  # OpenAI's form, as the HTTP front takes them
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int | None = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] | None = (),  # a str is one stop string
        stop_token_ids: Iterable[int] | None = (),
        ignore_eos: bool = False,
        sampling: SamplingParams | None = None,
        deadline_s: float | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        message = build_generate(
            self._ids.next(), prompt=prompt, task=task, messages=messages, prompt_token_ids=prompt_token_ids,
            sampling=sampling, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, stream=False,
            deadline_s=deadline_s,
        )  # fmt: skip
        return await self._call(message, GenerateDone, timeout_s)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        task: str | None = None,
        messages: Sequence[ChatMessageArg] | None = None,  # OpenAI's form, as the HTTP front takes them
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int | None = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] | None = (),  # a str is one stop string
        stop_token_ids: Iterable[int] | None = (),
        ignore_eos: bool = False,
        sampling: SamplingParams | None = None,
        deadline_s: float | None = None,
        timeout_s: float | None = None,
    ) -> AsyncTokenStream:
        """Start a streaming generate; `async for chunk in stream` yields TextChunks."""
        message = build_generate(
            self._ids.next(), prompt=prompt, task=task, messages=messages, prompt_token_ids=prompt_token_ids,
            sampling=sampling, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, stream=True,
            deadline_s=deadline_s,
        )  # fmt: skip
        wait_s = call_timeout(timeout_s, self.timeout_s)
        frame = encode(message)
        self._check_connection()
        await self._ensure_handshake(asyncio.get_running_loop().time() + wait_s)
        request_id = message.request_id
        frame = checked_frame_size(frame, self.server, request_id)
        self._queues[request_id] = asyncio.Queue()
        try:
            await self._send(frame)
        except BaseException:  # cancelled, or closed: no stream will read or end the request
            self._queues.pop(request_id, None)
            self._cancel_nowait(request_id)  # it may have gone out before the cancellation came
            raise
        return AsyncTokenStream(self, request_id, wait_s)

    async def cancel(self, request_id: str) -> None:
        await self._send(Cancel(request_id=request_id))


async def _finished_within(future: asyncio.Future[Any], timeout_s: float) -> bool:
    """Whether `future` finished within `timeout_s`; not finished, it is cancelled. Unlike
    asyncio.wait_for (before Python 3.12), a cancellation of the caller is raised even when
    `future` finishes at the same moment: wait_for returned its result instead, and the first
    call on a new client, whose hello lock was free, could not be cancelled (it ran whole)."""
    try:
        done, _ = await asyncio.wait((future,), timeout=timeout_s)
    finally:
        future.cancel()  # nothing when done; else what it waited for (a queued reply) stays where it was
    return bool(done)
