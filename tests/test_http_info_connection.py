"""The HTTP front asks /health and /metrics on an SDK connection of its own. The coordinator
handles each connection's frames in order (connections in turn, `front_inbox.py`); on the
generations' connection a health ask waited behind up to a thousand queued frames, and a
busy, working server answered 503 "unreachable" after 3.5 s and dropped its series from
/metrics (an outside probe: 1,100 requests with long prompts).

A stand-in coordinator holds every frame of the first connection that speaks (the
generations' backlog, never reached) and answers the others at once, as the real one
answers a connection whose queue is empty while another's is long."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import zmq
import zmq.asyncio

from inlaid.http import app as http_app
from inlaid.http.settings import HttpConfig
from inlaid.protocol import PROTOCOL_VERSION, HealthReply, HelloReply, MetricsReply


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _stand_in(router: zmq.asyncio.Socket, held: list[bytes]) -> None:
    backlogged: bytes | None = None
    while True:
        identity, frame = await router.recv_multipart()
        message = msgspec.msgpack.decode(frame)
        if backlogged is None:
            backlogged = identity
        if identity == backlogged:
            held.append(frame)  # behind the backlog: not reached in this test's time
            continue
        kind, request_id = message["type"], message["request_id"]
        if kind == "hello":
            reply: msgspec.Struct = HelloReply(request_id=request_id, protocol_version=PROTOCOL_VERSION,
                                               server_version="test", model="m", max_model_len=64)
        elif kind == "health":
            reply = HealthReply(request_id=request_id, status="ok", executor_ready=True, uptime_seconds=1.0)
        else:
            assert kind == "metrics", kind
            reply = MetricsReply(request_id=request_id, text="inlaid_up 1\n")
        await router.send_multipart([identity, msgspec.msgpack.encode(reply)])


def test_health_and_metrics_do_not_wait_behind_the_generations_queue():
    address = f"tcp://127.0.0.1:{_free_port()}"

    async def scenario() -> tuple[int, bytes, bytes, int]:
        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        router.bind(address)
        held: list[bytes] = []
        stand_in = asyncio.ensure_future(_stand_in(router, held))
        front = http_app.Front(address, HttpConfig())
        try:
            # the generations' connection speaks first and is backlogged from then on
            blocked = asyncio.ensure_future(front.client.health(timeout_s=30.0))
            while not held:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            started = loop.time()
            health = await http_app._health(front, None)
            metrics = await http_app._metrics(front, _Request())
            took_ms = round((loop.time() - started) * 1000)
            blocked.cancel()
            return health.status_code, health.body, metrics.body, took_ms
        finally:
            await front.close_clients()
            stand_in.cancel()
            router.close(linger=0)
            context.term()

    status, health_body, metrics_body, took_ms = asyncio.run(scenario())
    # Before: 503 {"status":"unreachable"} after the 2-s bound, and /metrics without the server's series.
    assert status == 200 and msgspec.json.decode(health_body)["status"] == "ok"
    assert b"inlaid_up 1" in metrics_body and b"inlaid_http_server_metrics_missing 0" in metrics_body
    assert took_ms < 2000, took_ms


class _Request:
    """What `_metrics` reads of a request: the front's own metrics."""

    class app:  # noqa: N801
        class state:  # noqa: N801
            class http_metrics:  # noqa: N801
                @staticmethod
                def exposition() -> str:
                    return ""
