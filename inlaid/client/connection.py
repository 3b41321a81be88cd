"""What both clients share about their socket: opening it, and learning that its connection broke.

A DEALER hides its connection: when the server dies, the socket quietly reconnects and a
request waiting for an answer would wait for its whole timeout. Two libzmq features close
that gap, and the clients use both:

* A socket monitor reports `EVENT_DISCONNECTED` the moment an established connection ends.
  A killed or crashed server's kernel closes its end (TCP FIN/RST, or EOF on a Unix socket
  for ipc://), so this catches the common case within milliseconds, over tcp:// and ipc://
  alike, at no cost while the connection is healthy. Only established connections report it:
  a refused or pending connect (no server yet) is not a loss, so new calls still wait for a
  server up to their own timeout.
* ZMTP heartbeats cover what the kernel cannot report: a server host that vanished or a
  network path that went silent. A heartbeat timeout closes the connection, which the
  monitor then reports like any other disconnect. Heartbeats alone would not do: libzmq
  drops and reconnects silently, so without the monitor nobody would fail the waiting
  requests. Their timeout matches how long the server's TCP keepalive takes to drop a
  silent client (~60 s): a client is never stricter than the server about the same
  connection. (The server sets no heartbeats of its own, only answers these: libzmq 4.3.5
  aborted it on one, inlaid/serve/peers.py.)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from inlaid.client.errors import ClientClosedError, ClientInUseError, ConnectionLostError
from inlaid.client.messages import decode_reply
from inlaid.protocol import ServerReply

_RECONNECT_IVL_MS = 100
_RECONNECT_IVL_MAX_MS = 2000
_HEARTBEAT_IVL_MS = 10_000
_HEARTBEAT_TIMEOUT_MS = 60_000


class Connection:
    """A DEALER connected to the server and the monitor that reports its disconnects. For an
    asyncio context both are asyncio sockets; the reads here never block either way."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        # Replies are taken off the wire by ZeroMQ's own thread whatever this process's loop
        # is doing: the server treats a connection that leaves a few thousand replies unread
        # as gone (inlaid/serve/peers.py FrontReplies), and one HTTP front's streams, read a
        # little late under load, must never look like that. Unread replies wait here instead.
        sock.setsockopt(zmq.RCVHWM, 0)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # before connect: no event slips by
        sock.connect(address)
        self.socket = sock
        # Blocking-API views of the same sockets: an asyncio socket's own recv returns a future.
        self._frames = zmq.Socket.shadow(sock.underlying)
        self._events = zmq.Socket.shadow(self.monitor.underlying)

    def replies(self) -> Iterator[ServerReply]:
        """Every reply already received, without blocking (unreadable frames are dropped)."""
        while True:
            try:
                frame = self._frames.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = decode_reply(frame)
            if reply is not None:
                yield reply

    def lost(self) -> bool:
        """Whether the monitor reported a disconnect since the last look (reads every event).
        The replies that came before it are already readable: libzmq queues a connection's
        messages before it reports the connection's end."""
        seen = False
        while True:
            try:
                message = self._events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return seen
            seen = seen or parse_monitor_message(message)["event"] == zmq.EVENT_DISCONNECTED

    def close(self, linger_ms: int) -> None:
        """Close the DEALER and its monitor: nothing of either is left behind."""
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:  # the socket is already closed
            pass
        self.monitor.close(linger=0)
        self.socket.close(linger=linger_ms)


def connection_lost(request_id: str) -> ConnectionLostError:
    # The message names no address: the HTTP front passes it on to its own clients, who
    # have no business with the server's internal address (the SDK's caller knows it).
    return ConnectionLostError("the connection to the server was lost before the answer came "
                               "(the server stopped, crashed or restarted)", request_id)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def one_thread_at_a_time(method: _Method) -> _Method:
    """For the sync Client's methods that use its sockets: another thread's call while one
    runs raises ClientInUseError at once, before it touches them. Two threads on one socket
    took each other's replies and a call timed out at random, saying only "no answer" (an
    outside probe). Reentrant: a call's own handshake passes."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        lock: threading.RLock = self._one_thread
        if not lock.acquire(blocking=False):
            if self._closed:  # close() from another thread holds it for a moment: the client is closed
                raise ClientClosedError("the client is closed")
            raise ClientInUseError("this Client is in use by another thread: a sync Client is not thread-safe; "
                                   "use one per thread, or one AsyncClient")
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()

    return guarded  # type: ignore[return-value]
