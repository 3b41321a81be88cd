"""The coordinator's client-facing ROUTER: the socket, its replies, and which peer went away. Torch-free.

ZeroMQ hides connections from a ROUTER: a peer that disconnects just stops sending (the
draft `ROUTER_NOTIFY` option is not in the released libzmq builds). What it does offer: a
socket monitor reports `EVENT_DISCONNECTED` with the connection's file descriptor, and
every received message can name the descriptor it came in on (`ZMQ_SRCFD`). `PeerWatch`
pairs the two: it remembers each peer identity's descriptor and reports the identity
whose descriptor disconnected (unless that identity is already back on another one).

Descriptor reuse is handled: pending monitor events are drained before each message is
attributed (libzmq queues a connection's disconnect event before it can accept the next
connection on the same descriptor), and a descriptor that turns up with a new identity
means its previous peer is gone.

The monitor's event and a peer's last frames arrive on two sockets, in either order: a
client that sends a Cancel and closes (the SDK after a timeout) was reported gone before its
Cancel was read, and its request counted `abandoned`, not `cancelled` (an outside soak: 46
of 393 timeouts). The coordinator's watch reports an anonymous peer (the SDK's, the HTTP
front's) gone `settle_s` after the event, and later while frames still wait to be read (at
most `_SETTLE_BOUND_S`), so that the frames it sent before closing are handled first; a peer
with an identity of its own may reconnect under it at once, and is reported at the event.

`FrontReplies` sends the replies: each at once or not at all, never queued without bound
(see its docstring); `seed_routing_ids` makes the ROUTER's anonymous peer ids unpredictable.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("inlaid.coordinator")

# Frames above max_frame_bytes get a typed error; far larger ones are cut off by ZeroMQ
# itself (the peer is disconnected) before they are ever buffered whole.
_HARD_FRAME_FACTOR = 16
# TCP keepalive, not ZMTP heartbeats: a client whose host vanished without closing its
# connection is dropped by the kernel after ~60 s of silence (idle 30 s, then 3 probes 10 s
# apart), which the PeerWatch sees as a disconnect (its requests are cancelled). The ROUTER's
# own ZMTP heartbeats aborted the coordinator (libzmq 4.3.5: `Assertion failed: !_io_error
# (src/stream_engine_base.cpp:310)`) when a ping fell due on a connection whose reading was
# paused (1,000 frames queued, the front loop behind) after its peer had reset it: four clients
# flooding GetMetrics, then closing, did it 5 times in 5 (an outside probe). Clients still send
# their heartbeats (inlaid/client/connection.py), which libzmq answers here without its own.
_CLIENT_KEEPALIVE_IDLE_S = 30
_CLIENT_KEEPALIVE_INTERVAL_S = 10
_CLIENT_KEEPALIVE_PROBES = 3
# Keepalive probes only run on an idle connection: a client host that vanished while the server
# streamed to it was found by TCP's retransmission timeout only (~15 min, requests computed for
# nobody). TCP_USER_TIMEOUT (ZMQ_TCP_MAXRT) drops it after this long without an acknowledgement.
# On Linux it also decides for keepalive (tcp(7)), hence the same 60 s as the probes above, and
# bounds zero-window probing: a client whose kernel takes nothing for 60 s is dropped too.
_CLIENT_UNACKED_LIMIT_MS = 60_000
# Frames ZeroMQ holds for one connection before it stops reading it (its default: 1,000). The
# coordinator reads tens of thousands a second into its own bounded inbox (front_inbox.py), so
# only a connection sending faster than that for a while is paused; at 0 (no limit) such a
# flood of small frames would grow the coordinator's memory without bound instead.
FRONT_RCVHWM = 20_000
# The longest a disconnected peer's report waits for the frames queued before it (PeerWatch)
_SETTLE_BOUND_S = 2.0
# Replies a connection may leave unread in the coordinator (ZeroMQ's SNDHWM, per connection)
# before it is treated as gone (`FrontReplies`): several per request it may hold, so a
# client reading its streams a little late is never cut off, yet one that never reads holds
# megabytes, not the 100,000 replies (~470 MiB of GetMetrics answers in a probe) it used to.
_MIN_UNREAD_REPLIES = 1_000
_UNREAD_REPLIES_PER_PENDING_REQUEST = 4
# How long a connection cut off for unread replies has its frames dropped before it is let
# back in (FrontReplies): long enough that a client that never reads costs one request a
# second, short enough that a front that fell behind once is serving again at once.
READMIT_AFTER_S = 1.0


def front_socket(max_frame_bytes: int, max_pending_requests: int) -> zmq.asyncio.Socket:
    """The coordinator's client-facing ROUTER, not yet bound."""
    seed_routing_ids()  # before the ROUTER exists: its anonymous peer ids start at rand()
    front = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 2000)  # let the last replies out on shutdown
    front.setsockopt(zmq.SNDHWM, max(_MIN_UNREAD_REPLIES, _UNREAD_REPLIES_PER_PENDING_REQUEST * max_pending_requests))
    front.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises (FrontReplies), never drops in silence
    front.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes * _HARD_FRAME_FACTOR)
    # A receive limit far past what the FrontInbox lets wait: a connection whose reading paused at
    # it could abort the process (libzmq 4.3.5, front_inbox.py), and the inbox drains the socket
    # at once; yet a limit all the same, whose backpressure bounds memory under a flood.
    front.setsockopt(zmq.RCVHWM, FRONT_RCVHWM)
    front.setsockopt(zmq.TCP_KEEPALIVE, 1)
    front.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _CLIENT_KEEPALIVE_IDLE_S)
    front.setsockopt(zmq.TCP_KEEPALIVE_INTVL, _CLIENT_KEEPALIVE_INTERVAL_S)
    front.setsockopt(zmq.TCP_KEEPALIVE_CNT, _CLIENT_KEEPALIVE_PROBES)
    front.setsockopt(zmq.TCP_MAXRT, _CLIENT_UNACKED_LIMIT_MS)
    return front


def seed_routing_ids() -> None:
    """Seed libc's rand() with 32 random bits; call it before the ROUTER socket is made.

    Why: libzmq's ROUTER names each anonymous peer 0x00 + a 4-byte counter that starts at
    libc rand()'s value when the socket is created, and it never checks that counter
    against the ids peers chose themselves (ZMQ_ROUTING_ID). rand() is never seeded, so the
    first anonymous peer is always 0x006b8b4567 (glibc's first rand()): a peer that claims
    the next few thousand ids, then any anonymous connection (every SDK client is one),
    aborted the coordinator (`Assertion failed: ok (src/socket_base.cpp:2113)`), and the
    claiming sockets reconnected by themselves to the restarted server. Seeded, the start
    is unpredictable; an attacker opening very many connections could still hit the
    counter by chance (docs/serving.md, "Limits": the port is for trusted clients)."""
    libc = ctypes.CDLL(None)
    libc.srand.argtypes = [ctypes.c_uint]
    libc.srand(int.from_bytes(os.urandom(4), "little"))


class FrontReplies:
    """Replies to the ROUTER's peers, each sent at once (DONTWAIT) or not at all.

    The socket (`front_socket`) has ZMQ_ROUTER_MANDATORY and a bounded SNDHWM per
    connection. Without MANDATORY a ROUTER silently drops what a full queue cannot take, a
    request's only GenerateDone included, and below the drop point a peer that never reads
    holds up to SNDHWM replies in the coordinator's memory. With it, a send to a full queue
    raises zmq.Again: that connection is cut off (one WARNING; `on_unread` cancels its
    requests as abandoned soon after, never inside the send, whose caller may be in the
    middle of ending a request; its replies and frames are dropped meanwhile). It is let back
    in `READMIT_AFTER_S` later: its next frame is handled again, and if it still does not
    read, the first reply cuts it off again. It never has to disconnect: the SDK does not by
    itself, and the HTTP front is one connection for all its users (cut off for good, a front
    that fell behind once would stay silent). A send to a peer already disconnected raises
    EHOSTUNREACH and is forgotten silently, as the ROUTER used to drop it: the PeerWatch
    reports that peer's disconnect."""

    def __init__(self, socket: zmq.asyncio.Socket, on_unread: Callable[[bytes], None]) -> None:
        self._socket = socket
        self._on_unread = on_unread
        self.queue_limit: int = socket.getsockopt(zmq.SNDHWM)
        self.cut_off_at: dict[bytes, float] = {}  # connection -> when it was cut off (monotonic)

    def is_cut_off(self, identity: bytes) -> bool:
        """Whether a frame of `identity` is dropped now (cut off less than READMIT_AFTER_S ago)."""
        at = self.cut_off_at.get(identity)
        if at is None:
            return False
        if time.monotonic() - at >= READMIT_AFTER_S:
            del self.cut_off_at[identity]
            return False
        return True

    def send(self, identity: bytes, payload: bytes) -> None:
        if identity in self.cut_off_at:
            return
        future = self._socket.send_multipart([identity, payload], flags=zmq.DONTWAIT)
        if not future.done():  # pyzmq queued it behind an earlier send (not expected with DONTWAIT)
            future.add_done_callback(_consume_exception)
            return
        if isinstance(future.exception(), zmq.Again):
            self.cut_off_at[identity] = time.monotonic()
            log.warning("a client leaves its replies unread: its requests are cancelled and its frames dropped for "
                        f"{READMIT_AFTER_S:g} s", extra={"client": identity.hex(), "queued_replies": self.queue_limit})
            asyncio.get_running_loop().call_soon(self._cut_off, identity)

    def _cut_off(self, identity: bytes) -> None:
        if identity in self.cut_off_at:  # not disconnected (and forgotten) meanwhile
            self._on_unread(identity)

    def forget(self, identity: bytes) -> None:
        """The peer disconnected: an identity it chose itself may come back, and is served again."""
        self.cut_off_at.pop(identity, None)


def _consume_exception(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()  # a reply to a vanished client: nothing to do


class PeerWatch:
    def __init__(self, socket: zmq.asyncio.Socket, on_gone: Callable[[bytes], None], settle_s: float = 0.0,
                 backlog: Callable[[bytes], bool] = lambda identity: False) -> None:
        self._socket = socket
        self._backlog = backlog  # whether frames of a peer read off the socket still wait to be handled (FrontInbox)
        self._on_gone = on_gone
        self._settle_s = settle_s  # how long after its disconnect an anonymous peer is reported gone
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitor_now = zmq.Socket.shadow(self._monitor.underlying)  # for non-blocking drains
        self._identity_of: dict[int, bytes] = {}  # connection (descriptor) -> peer
        self._fd_of: dict[bytes, int] = {}  # peer -> its latest connection
        # Anonymous peers whose disconnect was seen, not yet reported: their late frames (read
        # after the event) must not map the descriptor back to them, which a new peer may hold
        # already (its own disconnect then named the departed peer, and it was never reported).
        self._leaving: set[bytes] = set()
        self._timers: set[asyncio.TimerHandle] = set()

    def saw(self, identity_frame: zmq.Frame) -> None:
        """A message arrived from this peer (its identity frame, received with copy=False)."""
        self.drain()
        identity = identity_frame.bytes
        if identity in self._leaving:  # one of its last frames: the coordinator handles it, nothing to map
            return
        try:
            fd = int(identity_frame.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return
        previous = self._identity_of.get(fd)
        self._fd_of[identity] = fd
        if previous != identity:
            self._identity_of[fd] = identity
            if previous is not None:
                self._gone(previous, fd)

    def drain(self) -> None:
        """Handle every monitor event queued so far."""
        while True:
            try:
                message = self._monitor_now.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(message)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fd = int(event["value"])
                identity = self._identity_of.pop(fd, None)
                if identity is not None:
                    self._gone(identity, fd)

    def _gone(self, identity: bytes, fd: int) -> None:
        # ZeroMQ's generated ids start with a zero byte, which a chosen one may not: only an
        # anonymous peer is known never to come back under its id, so its report can wait for
        # its last frames. A peer with a chosen id may reconnect at once, on the same descriptor.
        if self._settle_s > 0 and identity[:1] == b"\0":
            self._leaving.add(identity)
            self._later(self._settle_s, self._settled, identity, fd, time.monotonic() + _SETTLE_BOUND_S)
        else:
            self._report_gone(identity, fd)

    def _later(self, delay_s: float, callback: Callable[..., None], *args: object) -> None:
        timer = asyncio.get_running_loop().call_later(delay_s, lambda: (self._timers.discard(timer), callback(*args)))
        self._timers.add(timer)

    def _settled(self, identity: bytes, fd: int, until: float) -> None:
        """Report the peer gone once no frame waits on the socket (any may be its last), or at
        `until`: a front busy with other clients' frames still hears of it."""
        try:
            # pyzmq's asyncio get re-arms its reader
            waiting = bool(self._socket.get(zmq.EVENTS) & zmq.POLLIN) or self._backlog(identity)
        except zmq.ZMQError:  # closed: shutting down
            waiting = False
        if waiting and time.monotonic() < until:
            self._later(self._settle_s, self._settled, identity, fd, until)
        else:  # after the front loops' turns: a frame just read is handled first
            self._later(0.0, self._report_gone, identity, fd)

    def _report_gone(self, identity: bytes, fd: int) -> None:
        self._leaving.discard(identity)
        # A peer with a chosen identity may already be back on another connection: then only
        # its old connection closed, and the peer itself is not gone.
        if self._fd_of.get(identity) == fd:
            del self._fd_of[identity]
            self._on_gone(identity)

    async def run(self) -> None:
        """Report disconnects as they happen (also while no message arrives)."""
        while True:
            await self._monitor.poll(timeout=None, flags=zmq.POLLIN)
            self.drain()

    def close(self) -> None:
        for timer in self._timers:  # reports after the close would reach a coordinator that has stopped
            timer.cancel()
        self._timers.clear()
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
