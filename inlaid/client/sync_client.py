"""Blocking client. One socket; replies are sorted by request id, so a stream may stay open
while other calls run. Not thread-safe: use one Client per thread, or AsyncClient."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import zmq

from inlaid.client.arguments import ChatMessageArg, checked_seconds
from inlaid.client.connection import Connection, connection_lost, one_thread_at_a_time
from inlaid.client.errors import ClientClosedError, ConnectionLostError, RequestTimeoutError
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
from inlaid.client.sync_admin import AdminCalls
from inlaid.client.sync_stream import TokenStream
from inlaid.protocol import (
    Cancel,
    Generate,
    GenerateDone,
    Health,
    HealthReply,
    HelloReply,
    SamplingParams,
    ServerReply,
)

# How soon a call waiting on the socket notices close() from another thread (it polls in slices).
CLOSE_NOTICE_S = 0.05


class Client(AdminCalls):
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = 120.0,
        admin_token: str | None = None,
        client_name: str = "inlaid-client",
    ) -> None:
        self.address = checked_address(address)
        self.timeout_s = checked_seconds(timeout_s, "timeout_s")
        self.admin_token = admin_token
        self.client_name = client_name
        self.server: HelloReply | None = None
        self._context = zmq.Context.instance()
        self._ids = RequestIds()
        # Each request's replies, then a ConnectionLostError if the connection broke first.
        self._inbox: dict[str, deque[ServerReply | ConnectionLostError]] = {}
        self._conn: Connection | None = None
        self._poller = zmq.Poller()  # the connection's socket and monitor
        self._closed = False
        # Work other threads leave for the thread that uses this client (a ZeroMQ socket is not
        # for two threads), done at its next call: ("forget", id) for a stream dropped unread on
        # another thread, ("cancel", id) for a cancel sent from another thread during a call.
        self._deferred: deque[tuple[str, str]] = deque()
        self._one_thread = threading.RLock()  # see one_thread_at_a_time

    # ------------------------------------------------------------------ connection
    def _sock(self) -> zmq.Socket:
        if self._closed:
            self._drop_socket(linger_ms=0)  # closed from another thread during a call: its socket goes here
            raise ClientClosedError("the client is closed")
        if self._conn is None:
            self._conn = Connection(self._context, self.address)
            self._poller = zmq.Poller()
            self._poller.register(self._conn.socket, zmq.POLLIN)
            self._poller.register(self._conn.monitor, zmq.POLLIN)
            self.server = None
        return self._conn.socket

    def _drop_socket(self, linger_ms: int) -> None:
        if self._conn is not None:
            self._conn.close(linger_ms)
            self._conn = None
        self.server = None

    def _deliver(self, conn: Connection) -> None:
        for reply in conn.replies():
            target = self._inbox.get(reply.request_id)
            if target is not None:
                target.append(reply)
            # else: the answer to a request given up on (timeout); drop it.

    @one_thread_at_a_time
    def _check_connection(self) -> None:
        # Also called before each new request: nothing reads the monitor between calls, and
        # a disconnect while idle must not fail the next request.
        while self._deferred:
            action, request_id = self._deferred.popleft()
            if action == "forget":
                self._forget_stream(request_id)
            else:
                self._cancel_quietly(request_id)
        conn = self._conn
        if conn is None or not conn.lost():
            return
        self._deliver(conn)
        # Every waiting request and open stream gets its own error after what it already
        # received. The socket goes too: frames still queued in it would reach a restarted
        # server and run for nobody; the next call opens a fresh one.
        self._drop_socket(linger_ms=0)
        for request_id, queue in list(self._inbox.items()):  # a stream's finalizer may pop meanwhile
            queue.append(connection_lost(request_id))

    @one_thread_at_a_time
    def reconnect(self) -> None:
        """Drop the socket (and every pending request) and connect afresh. A stream still
        open is cancelled on the server, and its next read raises ConnectionLostError."""
        for request_id in list(self._inbox):  # between calls, only open streams wait here
            self._cancel_quietly(request_id)
        self._start_over()

    def _start_over(self) -> None:
        self._drop_socket(linger_ms=100)  # lets a last cancel go out
        self._inbox.clear()

    def _stream_dropped(self, request_id: str, owner_thread: int) -> None:
        """A TokenStream's finalizer: it was dropped before its end. Never raises or blocks
        (a finalizer's exception is only printed), and touches the socket only on the thread
        that opened the stream, the one that uses this client."""
        try:
            if threading.get_ident() == owner_thread:
                self._forget_stream(request_id)
            else:
                self._deferred.append(("forget", request_id))
        except Exception:  # noqa: BLE001  (at interpreter exit even the modules may be gone)
            pass

    def _forget_stream(self, request_id: str) -> None:
        # Only a request still waiting here runs on the server; a closed client has no socket.
        if self._inbox.pop(request_id, None) is not None:
            self._cancel_quietly(request_id)

    def close(self) -> None:
        """Close the socket; every later call and open stream raises ClientClosedError. From
        another thread while a call runs, that call raises it within CLOSE_NOTICE_S and its own
        thread closes the socket (closing it under the call's poll crashed the process)."""
        self._closed = True  # first: nothing reopens the socket
        if self._one_thread.acquire(blocking=False):
            try:
                self._drop_socket(linger_ms=0)
            finally:
                self._one_thread.release()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handshake(self, timeout_s: float | None = None) -> HelloReply:
        request_id = self._ids.next()
        self.server = check_hello(self._roundtrip(hello(request_id, self.client_name), timeout_s))
        return self.server

    # ------------------------------------------------------------------ plumbing
    def _send(self, message: msgspec.Struct | bytes) -> None:
        self._sock().send(message if isinstance(message, bytes) else encode(message))

    @one_thread_at_a_time
    def _next_reply(self, request_id: str, deadline: float) -> ServerReply:
        queue = self._inbox.get(request_id)
        if queue is None:  # a stream read on after reconnect() dropped it: a KeyError said nothing
            raise ConnectionLostError("the request was dropped by Client.reconnect() before its end", request_id)
        while not queue:  # a lost connection fills every queue: this loop ends with the socket
            self._sock()  # raises ClientClosedError once close() was called, from any thread
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poller.poll(int(min(remaining, CLOSE_NOTICE_S) * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise RequestTimeoutError(f"no answer from {self.address} in time", request_id)
                continue
            assert self._conn is not None
            self._deliver(self._conn)  # replies first: those sent before a disconnect get through
            self._check_connection()
        reply = queue.popleft()
        if self._closed:  # close() came from another thread as this answer did: the socket goes here
            self._drop_socket(linger_ms=0)
        if isinstance(reply, ConnectionLostError):
            raise reply
        return reply

    @one_thread_at_a_time
    def _roundtrip(self, message: Any, timeout_s: float | None, frame: bytes | None = None) -> ServerReply:
        request_id = message.request_id
        wait_s = call_timeout(timeout_s, self.timeout_s)
        frame = frame or encode(message)  # an unencodable request fails here, before anything is registered
        self._check_connection()
        # Over the server's limit: refused unsent (sent, one far over it drops the connection).
        frame = checked_frame_size(frame, self.server, request_id)
        self._inbox[request_id] = deque()
        try:
            self._send(frame)
            return self._next_reply(request_id, time.monotonic() + wait_s)
        except RequestTimeoutError:
            if isinstance(message, Generate):
                self._cancel_quietly(request_id)
            self._after_timeout(request_id)
            raise
        except ConnectionLostError:
            raise  # nothing to cancel: the server that had it is gone
        except BaseException:
            # Ctrl-C (KeyboardInterrupt) or any other escape from the wait: nobody will read
            # the answer, so the server must stop computing it (it ran to max_tokens, KV held).
            if isinstance(message, Generate):
                self._cancel_quietly(request_id)
            raise
        finally:
            self._inbox.pop(request_id, None)

    def _after_timeout(self, request_id: str) -> None:
        # A dead server leaves a socket that may never answer; start over unless other
        # requests still wait on this one.
        if all(other == request_id for other in list(self._inbox)):  # list: a finalizer may pop meanwhile
            self._start_over()  # the request timed out is cancelled already if it was a Generate

    @one_thread_at_a_time
    def _call(self, message: Any, kind: type[Any], timeout_s: float | None = None) -> Any:
        frame = encode(message)  # a request msgpack cannot carry fails before the handshake
        deadline = time.monotonic() + call_timeout(timeout_s, self.timeout_s)
        self._greet_by(deadline)
        return expect(self._roundtrip(message, self._left(deadline, message.request_id), frame), kind)

    def _greet_by(self, deadline: float) -> None:
        """Say hello if no hello is held (a server restarted while idle is greeted again), within
        the call's own deadline: the hello and the request share one timeout_s (each had its
        own, and a call took up to twice it; AsyncClient's share one)."""
        self._check_connection()
        if self.server is None:
            self.handshake(self._left(deadline, ""))

    def _left(self, deadline: float, request_id: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeoutError(f"no answer from {self.address} in time", request_id)
        return remaining

    # ------------------------------------------------------------------ API
    def generate(
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
        """Generate to the end; raises a typed InlaidError on failure. `max_tokens=None` generates
        until the context is full; a number the context cannot hold is refused (ContextLengthError)."""
        message = build_generate(
            self._ids.next(), prompt=prompt, task=task, messages=messages, prompt_token_ids=prompt_token_ids,
            sampling=sampling, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, stream=False,
            deadline_s=deadline_s,
        )  # fmt: skip
        return self._call(message, GenerateDone, timeout_s)

    @one_thread_at_a_time
    def stream(
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
    ) -> "TokenStream":
        """Start a streaming generate; iterate the returned stream for TextChunks."""
        message = build_generate(
            self._ids.next(), prompt=prompt, task=task, messages=messages, prompt_token_ids=prompt_token_ids,
            sampling=sampling, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, stream=True,
            deadline_s=deadline_s,
        )  # fmt: skip
        wait_s = call_timeout(timeout_s, self.timeout_s)
        frame = encode(message)
        self._greet_by(time.monotonic() + wait_s)  # the stream's first wait is per message: not shortened
        frame = checked_frame_size(frame, self.server, message.request_id)  # as `_roundtrip`
        self._inbox[message.request_id] = deque()
        try:
            self._send(frame)
        except BaseException:  # Ctrl-C, a closed socket: no stream will read or end the request
            self._inbox.pop(message.request_id, None)
            raise
        return TokenStream(self, message.request_id, wait_s)

    def cancel(self, request_id: str) -> None:
        """Ask the server to stop `request_id`; its stream ends with finish_reason 'cancelled'.
        From another thread while a call runs (a UI thread stopping a stream a worker reads),
        the cancel goes out with the running call's next message, not over its socket now."""
        if not self._one_thread.acquire(blocking=False):
            self._deferred.append(("cancel", request_id))
            return
        try:
            self._send(Cancel(request_id=request_id))
        finally:
            self._one_thread.release()

    def _cancel_quietly(self, request_id: str) -> None:
        try:
            if self._conn is not None:
                self._conn.socket.send(encode(Cancel(request_id=request_id)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def health(self, timeout_s: float | None = None) -> HealthReply:
        # No handshake: health must answer even to a client of another protocol version.
        reply = self._roundtrip(Health(request_id=self._ids.next()), timeout_s)
        return expect(reply, HealthReply)

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.2) -> HealthReply:
        """Block until the server answers health with a ready executor."""
        deadline = time.monotonic() + checked_seconds(timeout_s, "timeout_s")
        checked_seconds(poll_s, "poll_s", zero_ok=True)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeoutError(f"server at {self.address} not ready within {timeout_s:.0f} s")
            try:
                reply = self.health(timeout_s=min(2.0, remaining))
                if reply.executor_ready and reply.status == "ok":
                    return reply
            except (RequestTimeoutError, ConnectionLostError):  # not up yet, or restarting
                pass
            time.sleep(poll_s)
