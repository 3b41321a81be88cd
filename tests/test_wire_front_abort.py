"""Clients that flood the coordinator and close cannot abort it: with ZMTP heartbeats on its
ROUTER, libzmq 4.3.5 aborted the whole process (`Assertion failed: !_io_error
(src/stream_engine_base.cpp:310)`) when a heartbeat fell due on a connection whose reading
was paused (1,000 frames queued, the front loop behind) after its peer had reset it. An
outside probe's recipe did it 5 times in 5: four connections, each flooding GetMetrics just
before the first heartbeat tick (10 s after the handshake) and closing a second later.
The ROUTER now leaves dead-peer detection to TCP keepalive."""

from __future__ import annotations

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


def test_a_flood_then_close_before_a_heartbeat_tick_does_not_abort_the_server(server):
    context = zmq.Context()
    sockets = []
    for _ in range(4):
        sock = context.socket(zmq.DEALER)
        for option, value in ((zmq.RCVHWM, 1), (zmq.RCVBUF, 4096), (zmq.LINGER, 0), (zmq.SNDHWM, 0)):
            sock.setsockopt(option, value)
        sock.connect(server.address)
        sockets.append(sock)
    frames = [[msgspec.msgpack.encode(GetMetrics(request_id=f"m{k}-{i}")) for i in range(3000)] for k in range(4)]
    time.sleep(8.5)  # the handshake plus 8.5 s: the reset lands ~0.5 s before the first tick
    for sock, batch in zip(sockets, frames):
        for frame in batch:
            sock.send(frame)
    time.sleep(1.0)
    for sock in sockets:
        sock.close()
    context.term()
    time.sleep(4.0)  # past the tick
    assert server.process.poll() is None, server.logs()[-2000:]
    assert "Assertion failed" not in server.logs()
    with Client(server.address, timeout_s=30) as client:
        assert client.health().status == "ok"
        assert client.generate("Hello", max_tokens=2).finish_reason == "length"
