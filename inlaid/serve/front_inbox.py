"""The coordinator's client frames: read off the ROUTER at once, queued per connection here
(bounded), handled in turn over the connections. Torch-free.

Why not let ZeroMQ queue them: libzmq 4.3.5 aborts the whole process (`Assertion failed:
!_io_error (src/stream_engine_base.cpp:310)`) when a connection whose reading is paused -- its
receive queue at RCVHWM, the front behind -- is reset by its peer, and a ZMTP PING is among the
bytes read before (or a heartbeat of the ROUTER's own falls due): answering it writes to the
dead connection. Outside probes did it every time with four clients flooding GetMetrics and
closing (PINGs among their frames, or before the ROUTER's first heartbeat tick). So the ROUTER
has no heartbeats and a receive limit 20 times ZeroMQ's default (`peers.front_socket`), which
this inbox keeps it far from: a connection may have `per_connection` frames waiting here; past
that its frames are dropped (counted, reason `frames_queued`; one that names its request is
answered `overloaded`) until it has fewer. The reader drains the socket in turns of a few
milliseconds (reading a frame costs microseconds, handling one up to milliseconds), so ZeroMQ's
own queue stays short unless a client sends faster than the reader reads for a while: a
hostile flood, for which the limit's backpressure still bounds memory (and the libzmq abort
stays reachable: the port is for trusted clients, docs/serving.md). The handler takes one frame of each
waiting connection in turn: one connection's backlog no longer delays another's frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import zmq
import zmq.asyncio

log = logging.getLogger("inlaid.coordinator")

# A turn of either loop before it lets the others run (the step loops, the other loop): without
# it an await on a waiting frame never suspends, and 3,000 queued frames stalled every stream 11 s.
# Two loops: each gets half the single front loop's 5 ms, so a step waits no longer than it did.
TURN_S = 0.0025
# The bytes a connection may have waiting, in frames of at most max_frame_bytes each.
FRAMES_OF_BYTES = 64
# At most one log line this often about frames refused for a full backlog (a flood refuses
# thousands a second; none at all left the refusals to /metrics alone).
REFUSALS_LOGGED_EVERY_S = 10.0
_refusal_clock = time.monotonic  # (a test's clock replaces this one alone)


class _Turn:
    """A loop's turn on the event loop: it lets the others run once it has run TURN_S."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._ends = time.monotonic() + TURN_S

    async def yield_if_over(self) -> None:
        if time.monotonic() >= self._ends:
            await asyncio.sleep(0)
            self.restart()


class FrontInbox:
    """`read_loop` and `handle_loop` run as two tasks on the coordinator's event loop.

    on_read(identity_frame): each frame as read (PeerWatch maps its descriptor then);
    dropped(identity) -> bool: whether the connection's frames are dropped now (cut off for
    unread replies): checked as read and as handled; handle(identity, body): one message
    (also one refused as read: not one frame, or over `max_frame_bytes`, which no one queues);
    refuse(identity, body): a frame past its connection's bound (`per_connection` frames,
    FRAMES_OF_BYTES x `max_frame_bytes` bytes), which it may queue all the same (a Cancel)."""

    def __init__(self, socket: zmq.asyncio.Socket, per_connection: int, max_frame_bytes: int,
                 on_read: Callable[[zmq.Frame], None], dropped: Callable[[bytes], bool],
                 handle: Callable[[bytes, list[bytes]], None], refuse: Callable[[bytes, list[bytes]], None],
                 refuse_dropped: Callable[[], None]) -> None:
        self._socket = socket
        self.per_connection = per_connection
        self.max_frame_bytes = max_frame_bytes
        self.max_bytes = FRAMES_OF_BYTES * max_frame_bytes
        self._bytes: dict[bytes, int] = {}  # waiting bytes by connection
        self._on_read, self._dropped, self._handle = on_read, dropped, handle
        self._refuse, self._refuse_dropped = refuse, refuse_dropped
        self._queues: dict[bytes, deque[list[bytes]]] = {}
        self._turns: deque[bytes] = deque()  # connections with frames waiting, in turn
        self._arrived = asyncio.Event()
        self._refusals_unlogged = 0
        self._refusals_logged_at = -float("inf")

    def waiting(self, identity: bytes) -> bool:
        """Whether a frame of this connection waits to be handled (PeerWatch reports a leaving
        peer after them)."""
        return identity in self._queues

    def log_refused(self, identity: bytes) -> None:
        """A frame of `identity` was refused for its connection's full backlog: a WARNING at
        most every REFUSALS_LOGGED_EVERY_S, counting those since the last."""
        self._refusals_unlogged += 1
        now = _refusal_clock()
        if now - self._refusals_logged_at >= REFUSALS_LOGGED_EVERY_S:
            log.warning("messages refused: a connection sends faster than the server handles them",
                        extra={"refused": self._refusals_unlogged, "queued": self.queued(identity),
                               "limit": self.per_connection, "connection": identity.hex()[:16]})
            self._refusals_unlogged = 0
            self._refusals_logged_at = now

    def queued(self, identity: bytes) -> int:
        """Frames of this connection waiting to be handled."""
        queue = self._queues.get(identity)
        return len(queue) if queue is not None else 0

    def forget(self, identity: bytes) -> int:
        """A peer reported gone: the frames it left are not handled; returns how many."""
        queue = self._queues.pop(identity, None)
        if queue is None:
            return 0
        self._turns.remove(identity)
        del self._bytes[identity]
        return len(queue)

    def put(self, identity: bytes, body: list[bytes], force: bool = False) -> bool:
        """Queue a frame; False (not queued) when its connection is at its bound, unless `force`."""
        size = sum(len(part) for part in body)
        queue = self._queues.get(identity)
        if queue is not None and not force and (
                len(queue) >= self.per_connection or self._bytes[identity] + size > self.max_bytes):
            return False
        if queue is None:
            queue = self._queues[identity] = deque()
            self._bytes[identity] = 0
            self._turns.append(identity)
        queue.append(body)
        self._bytes[identity] += size
        self._arrived.set()
        return True

    def take(self) -> tuple[bytes, list[bytes]] | None:
        """The next connection's oldest frame, or None."""
        if not self._turns:
            return None
        identity = self._turns.popleft()
        queue = self._queues[identity]
        body = queue.popleft()
        self._bytes[identity] -= sum(len(part) for part in body)
        if queue:
            self._turns.append(identity)
        else:
            del self._queues[identity], self._bytes[identity]
        return identity, body

    def _handle_safely(self, identity: bytes, body: list[bytes]) -> None:
        try:
            self._handle(identity, body)
        except Exception:  # a bug must cost this one message, never the loop (and so the server)
            log.exception("internal error handling a client frame", extra={"client": identity.hex()})

    async def read_loop(self) -> None:
        turn = _Turn()
        while True:
            try:
                frames = await self._socket.recv_multipart(copy=False)
            except zmq.ZMQError as error:
                log.error("front socket receive failed", extra={"error": str(error)})
                await asyncio.sleep(0.01)
                continue
            self._on_read(frames[0])
            identity = frames[0].bytes
            if self._dropped(identity):  # it left its replies unread just now
                self._refuse_dropped()
            elif len(frames) != 2 or len(frames[1]) > self.max_frame_bytes:  # refused at once, never queued
                self._handle_safely(identity, [frame.bytes for frame in frames[1:]])
            elif not self.put(identity, body := [frames[1].bytes]):
                self._refuse(identity, body)
            await turn.yield_if_over()

    async def handle_loop(self) -> None:
        turn = _Turn()
        while True:
            item = self.take()
            if item is None:
                self._arrived.clear()
                await self._arrived.wait()
                turn.restart()
                continue
            identity, body = item
            if self._dropped(identity):
                self._refuse_dropped()
            else:
                self._handle_safely(identity, body)
            await turn.yield_if_over()
