"""Clients that flood the coordinator and close cannot abort it: with ZMTP heartbeats on its
ROUTER, libzmq 4.3.5 aborted the whole process (`Assertion failed: !_io_error
(src/stream_engine_base.cpp:310)`) when a heartbeat fell due on a connection whose reading
was paused (1,000 frames queued, the front loop behind) after its peer had reset it. An
outside probe's recipe did it 5 times in 5: four connections, each flooding GetMetrics just
before the first heartbeat tick (10 s after the handshake) and closing a second later.
The ROUTER now leaves dead-peer detection to TCP keepalive."""

from __future__ import annotations

import socket
import struct
import time

import msgspec
import pytest
import zmq

from inlaid.client import Client
from inlaid.protocol import GetMetrics
from inlaid.serve.launcher import ServerProcess
from serving_helpers import server_config


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    config = server_config(model_dir, adapter_dirs, max_pending_requests=1024, shutdown_grace_s=2.0)
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("wire-abort"))
    process.wait_ready(timeout_s=300)
    yield process
    process.terminate()


def _flood_then_close(server, wait_s: float, **options: int) -> None:
    context = zmq.Context()
    sockets = []
    for _ in range(4):
        sock = context.socket(zmq.DEALER)
        for option, value in ((zmq.RCVHWM, 1), (zmq.RCVBUF, 4096), (zmq.LINGER, 0), (zmq.SNDHWM, 0)):
            sock.setsockopt(option, value)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(server.address)
        sockets.append(sock)
    frames = [[msgspec.msgpack.encode(GetMetrics(request_id=f"m{k}-{i}")) for i in range(3000)] for k in range(4)]
    time.sleep(wait_s)
    for sock, batch in zip(sockets, frames):
        for frame in batch:
            sock.send(frame)
    time.sleep(1.0)
    for sock in sockets:
        sock.close()  # unread replies in its kernel buffer: the close is a reset
    context.term()
    time.sleep(4.0)  # past the ROUTER's first heartbeat tick, when it had heartbeats


def _assert_serving(server) -> None:
    assert server.process.poll() is None, server.logs()[-2000:]
    assert "Assertion failed" not in server.logs()
    with Client(server.address, timeout_s=30) as client:
        assert client.health().status == "ok"
        assert client.generate("Hello", max_tokens=2).finish_reason == "length"


def test_a_flood_then_close_before_a_heartbeat_tick_does_not_abort_the_server(server):
    _flood_then_close(server, wait_s=8.5)  # the handshake plus 8.5 s: the reset ~0.5 s before the tick
    _assert_serving(server)


def _zmtp_dealer(address: str) -> socket.socket:
    """A raw ZMTP 3.1 DEALER (NULL mechanism), connected and greeted, to send frames and PINGs
    exactly where a test wants them (libzmq sends its heartbeats on its own clock)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 1]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(greeting + bytes([0x04, len(ready)]) + ready)
    received = b""
    while len(received) < 64 + 2:  # the server's greeting and its READY command's head
        received += sock.recv(4096)
    return sock


def _zmtp_message(payload: bytes) -> bytes:
    return (bytes([0x00, len(payload)]) if len(payload) < 256 else b"\x02" + struct.pack(">Q", len(payload))) + payload


ZMTP_PING = bytes([0x04, 7]) + b"\x04PING" + b"\x00\x00"  # a command frame: PING, TTL 0


def test_a_flood_with_pings_then_reset_does_not_abort_the_server(server):
    """Raw clients flooding GetMetrics with a ZMTP PING every 10 frames, then resetting the
    connection (SO_LINGER 0): the ROUTER without heartbeats of its own still aborted, answering
    a PING it had read before the reset once its paused reading resumed (a review: 2 of 2).
    Its reading no longer pauses so soon (front_inbox.py drains it; RCVHWM 20,000)."""
    sockets = [_zmtp_dealer(server.address) for _ in range(4)]
    for index, sock in enumerate(sockets):
        chunks = []
        for i in range(3000):
            chunks.append(_zmtp_message(msgspec.msgpack.encode(GetMetrics(request_id=f"p{index}-{i}"))))
            if i % 10 == 9:
                chunks.append(ZMTP_PING)
        sock.sendall(b"".join(chunks))
    time.sleep(1.0)
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
    time.sleep(4.0)
    _assert_serving(server)
