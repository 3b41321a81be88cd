"""asyncio client: any number of concurrent requests over one socket.

A reader task sorts replies into one queue per request id. Cancelling the task awaiting
`generate` (or leaving a stream early) cancels the request on the server. The stream a
`stream()` call returns is `async_stream.AsyncTokenStream`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from inlaid.client.arguments import ChatMessageArg, checked_seconds
from inlaid.client.connection import Connection, connection_lost
from inlaid.client.async_stream import AsyncTokenStream
from inlaid.client.task_wait import TASK_POLL_ANSWER_S, TaskWait
from inlaid.client.errors import ClientClosedError, ConnectionLostError, RequestTimeoutError
from inlaid.client.messages import (
    DEFAULT_ADDRESS,
    GenerateResult,
    RequestIds,
    build_add_task,
    build_generate,
    call_timeout,
    check_hello,
    checked_address,
    encode,
    expect,
    hello,
)
from inlaid.protocol import (
    AdminReply,
    Cancel,
    Generate,
    GenerateDone,
    GetMetrics,
    GetStats,
    Health,
    HealthReply,
    HelloReply,
    ListTasks,
    MetricsReply,
    RemoveTask,
    SamplingParams,
    ServerReply,
    ServerStats,
    TaskInfo,
    TaskList,
    TaskStatus,
    TaskStatusReply,
)


class AsyncClient:
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
        # Each request's replies, then a ConnectionLostError if the connection broke first.
        self._queues: dict[str, asyncio.Queue[ServerReply | ConnectionLostError]] = {}
        self._conn: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._handshake_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ connection
    def _sock(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise ClientClosedError("the client is closed")
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
        conn = self._conn
        if conn is None or not conn.lost():
            return
        self._deliver(conn)
        if self._reader is asyncio.current_task():
            self._reader = None  # it ends by itself
        self.reconnect()
        for request_id, queue in self._queues.items():
            queue.put_nowait(connection_lost(request_id))

    def reconnect(self) -> None:
        """Drop the socket (failing nothing: pending waits run into their timeouts)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._conn is not None:
            self._conn.close(linger_ms=100)  # lets a last cancel go out
            self._conn = None
        self.server = None

    async def close(self) -> None:
        self.reconnect()
        self._closed = True

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
        try:
            reply = await asyncio.wait_for(self._queues[request_id].get(), timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"no answer from {self.address} in time", request_id) from None
        if isinstance(reply, ConnectionLostError):
            raise reply
        return reply

    async def _roundtrip(self, message: Any, timeout_s: float | None, frame: bytes | None = None) -> ServerReply:
        request_id = message.request_id
        wait_s = call_timeout(timeout_s, self.timeout_s)
        frame = frame or encode(message)  # an unencodable request fails here, before anything is registered
        await self._checked_connection()
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
        except ConnectionLostError:
            answered = True  # nothing to cancel: the server that had it is gone
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
            self.reconnect()

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
            if self._handshake_lock is None:
                self._handshake_lock = asyncio.Lock()
            try:
                await asyncio.wait_for(self._handshake_lock.acquire(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"no answer from {self.address} in time") from None
            try:
                if self.server is None:
                    await self.handshake(self._left(deadline))
            finally:
                self._handshake_lock.release()
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
        self._queues[message.request_id] = asyncio.Queue()
        await self._send(frame)
        return AsyncTokenStream(self, message.request_id, wait_s)

    async def cancel(self, request_id: str) -> None:
        await self._send(Cancel(request_id=request_id))

    async def health(self, timeout_s: float | None = None) -> HealthReply:
        return expect(await self._roundtrip(Health(request_id=self._ids.next()), timeout_s), HealthReply)

    async def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.2) -> HealthReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + checked_seconds(timeout_s, "timeout_s")
        checked_seconds(poll_s, "poll_s", zero_ok=True)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestTimeoutError(f"server at {self.address} not ready within {timeout_s:.0f} s")
            try:
                reply = await self.health(timeout_s=min(2.0, remaining))
                if reply.executor_ready and reply.status == "ok":
                    return reply
            except (RequestTimeoutError, ConnectionLostError):  # not up yet, or restarting
                pass
            await asyncio.sleep(poll_s)

    async def list_tasks(self, timeout_s: float | None = None) -> list[TaskInfo]:
        return (await self._call(ListTasks(request_id=self._ids.next()), TaskList, timeout_s)).tasks

    async def stats(self, timeout_s: float | None = None) -> ServerStats:
        return await self._call(GetStats(request_id=self._ids.next()), ServerStats, timeout_s)

    async def metrics(self, timeout_s: float | None = None) -> str:
        """The server's Prometheus metrics, text exposition format."""
        return (await self._call(GetMetrics(request_id=self._ids.next()), MetricsReply, timeout_s)).text

    async def add_task(self, name: str, adapter_dir: str | os.PathLike[str],
                       calibration_jsonl: str | os.PathLike[str] | None = None, *,
                       timeout_s: float | None = None) -> str:
        """Admin: serve task `name` with the PEFT adapter in `adapter_dir` (paths on the server's
        machine); it serves at once on the current base. With `calibration_jsonl` (the task's
        samples) the server then re-quantizes its base for it in the background: follow it with
        `task_status` or `wait_task`."""
        return (await self.add_task_reply(name, adapter_dir, calibration_jsonl, timeout_s=timeout_s)).message

    async def add_task_reply(self, name: str, adapter_dir: str | os.PathLike[str],
                             calibration_jsonl: str | os.PathLike[str] | None = None, *,
                             timeout_s: float | None = None) -> AdminReply:
        """`add_task`, answering the server's whole AdminReply: for a program, the facts
        beside its message (`replaces_config_entry`: the config's task it now overrides)."""
        message = build_add_task(self._ids.next(), name, adapter_dir, calibration_jsonl, self.admin_token)
        return await self._call(message, AdminReply, timeout_s)

    async def task_status(self, name: str, timeout_s: float | None = None) -> TaskStatusReply:
        """Admin: the task's phase, layers done / total, quantization version, what was kept and why."""
        message = TaskStatus(request_id=self._ids.next(), name=name, token=self.admin_token or "")
        return await self._call(message, TaskStatusReply, timeout_s)

    async def wait_task(self, name: str, timeout_s: float = 3600.0, poll_s: float = 0.5,
                        on_status: Callable[[TaskStatusReply], None] | None = None,
                        on_silence: Callable[[float, TaskStatusReply | None], None] | None = None,
                        answer_s: float = TASK_POLL_ANSWER_S) -> TaskStatusReply:
        """Poll `task_status` until the task's re-quantization has ended (ready, failed, or
        none). As `Client.wait_task`: a silent or restarting server does not end the wait before
        `timeout_s`; `on_silence(seconds_silent, last_status)` after each unanswered poll."""
        wait = TaskWait(name, self.address, timeout_s, poll_s, min(answer_s, self.timeout_s), self.timeout_s)
        while True:
            try:
                status = await self.task_status(name, timeout_s=wait.poll_timeout())
            except (RequestTimeoutError, ConnectionLostError) as error:  # down or restarting: keep asking
                wait.unanswered(error, on_silence)  # raises once timeout_s has passed
            else:
                if on_status is not None:
                    on_status(status)
                if wait.answered(status):
                    return status
            await asyncio.sleep(poll_s)

    async def remove_task(self, name: str, timeout_s: float | None = None) -> str:
        message = RemoveTask(request_id=self._ids.next(), name=name, token=self.admin_token or "")
        return (await self._call(message, AdminReply, timeout_s)).message
