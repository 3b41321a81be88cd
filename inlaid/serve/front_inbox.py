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
TURN_S = 0.005


class FrontInbox:
    """`read_loop` and `handle_loop` run as two tasks on the coordinator's event loop.

    on_read(identity_frame): each frame as read (PeerWatch maps its descriptor then);
    dropped(identity) -> bool: whether the connection's frames are dropped now (cut off for
    unread replies): checked as read and as handled; handle(identity, body): one message;
    refuse(identity, body): a frame dropped for its connection's full queue."""

    def __init__(self, socket: zmq.asyncio.Socket, per_connection: int, on_read: Callable[[zmq.Frame], None],
                 dropped: Callable[[bytes], bool], handle: Callable[[bytes, list[bytes]], None],
                 refuse: Callable[[bytes, list[bytes]], None], refuse_dropped: Callable[[], None]) -> None:
        self._socket = socket
        self.per_connection = per_connection
        self._on_read, self._dropped, self._handle = on_read, dropped, handle
        self._refuse, self._refuse_dropped = refuse, refuse_dropped
        self._queues: dict[bytes, deque[list[bytes]]] = {}
        self._turns: deque[bytes] = deque()  # connections with frames waiting, in turn
        self._arrived = asyncio.Event()

    def waiting(self) -> bool:
        """Whether any frame waits to be handled (PeerWatch reports a leaving peer after them)."""
        return bool(self._turns)

    def forget(self, identity: bytes) -> None:
        """A peer reported gone: the frames it left are not handled."""
        if self._queues.pop(identity, None) is not None:
            self._turns.remove(identity)

    def put(self, identity: bytes, body: list[bytes]) -> bool:
        """Queue a frame; False (not queued) when its connection has `per_connection` waiting."""
        queue = self._queues.get(identity)
        if queue is None:
            queue = self._queues[identity] = deque()
            self._turns.append(identity)
        elif len(queue) >= self.per_connection:
            return False
        queue.append(body)
        self._arrived.set()
        return True

    def take(self) -> tuple[bytes, list[bytes]] | None:
        """The next connection's oldest frame, or None."""
        if not self._turns:
            return None
        identity = self._turns.popleft()
        queue = self._queues[identity]
        body = queue.popleft()
        if queue:
            self._turns.append(identity)
        else:
            del self._queues[identity]
        return identity, body

    async def read_loop(self) -> None:
        turn_ends = time.monotonic() + TURN_S
        while True:
            try:
                frames = await self._socket.recv_multipart(copy=False)
            except zmq.ZMQError as error:
                log.error("front socket receive failed", extra={"error": str(error)})
                await asyncio.sleep(0.01)
                continue
            self._on_read(frames[0])
            identity = frames[0].bytes
            body = [frame.bytes for frame in frames[1:]]
            if self._dropped(identity):  # it left its replies unread just now
                self._refuse_dropped()
            elif not self.put(identity, body):
                self._refuse(identity, body)
            if time.monotonic() >= turn_ends:
                await asyncio.sleep(0)
                turn_ends = time.monotonic() + TURN_S

    async def handle_loop(self) -> None:
        turn_ends = time.monotonic() + TURN_S
        while True:
            item = self.take()
            if item is None:
                self._arrived.clear()
                await self._arrived.wait()
                turn_ends = time.monotonic() + TURN_S
                continue
            identity, body = item
            if self._dropped(identity):
                self._refuse_dropped()
            else:
                self._handle(identity, body)
            if time.monotonic() >= turn_ends:
                await asyncio.sleep(0)
                turn_ends = time.monotonic() + TURN_S
