"""Which peer of a ZeroMQ ROUTER socket went away. Torch-free.

ZeroMQ hides connections from a ROUTER: a peer that disconnects just stops sending (the
draft `ROUTER_NOTIFY` option is not in the released libzmq builds). What it does offer: a
socket monitor reports `EVENT_DISCONNECTED` with the connection's file descriptor, and
every received message can name the descriptor it came in on (`ZMQ_SRCFD`). `PeerWatch`
pairs the two: it remembers each peer identity's descriptor and reports the identity
whose descriptor disconnected.

Descriptor reuse is handled: pending monitor events are drained before each message is
attributed (libzmq queues a connection's disconnect event before it can accept the next
connection on the same descriptor), and a descriptor that turns up with a new identity
means its previous peer is gone.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message


class PeerWatch:
    def __init__(self, socket: zmq.asyncio.Socket, on_gone: Callable[[bytes], None]) -> None:
        self._socket = socket
        self._on_gone = on_gone
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitor_now = zmq.Socket.shadow(self._monitor.underlying)  # for non-blocking drains
        self._identity_of: dict[int, bytes] = {}

    def saw(self, identity_frame: zmq.Frame) -> None:
        """A message arrived from this peer (its identity frame, received with copy=False)."""
        self.drain()
        try:
            fd = int(identity_frame.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return
        identity = identity_frame.bytes
        previous = self._identity_of.get(fd)
        if previous != identity:
            self._identity_of[fd] = identity
            if previous is not None:
                self._on_gone(previous)

    def drain(self) -> None:
        """Handle every monitor event queued so far."""
        while True:
            try:
                message = self._monitor_now.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(message)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                identity = self._identity_of.pop(int(event["value"]), None)
                if identity is not None:
                    self._on_gone(identity)

    async def run(self) -> None:
        """Report disconnects as they happen (also while no message arrives)."""
        while True:
            await self._monitor.poll(timeout=None, flags=zmq.POLLIN)
            self.drain()

    def close(self) -> None:
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
