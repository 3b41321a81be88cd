"""Defects an outside probe of the HTTP front found, checked on the ASGI app with a stand-in
SDK client (no server, no model): fast.

* A body starting with a UTF-8 byte-order mark was refused as "not valid JSON" (RFC 8259
  lets a parser ignore the mark; .NET and PowerShell clients send it).
* Unloading an unknown adapter answered 404 with `param: "model"`, a field the request
  does not have: it names `lora_name` now.
* A gzip-compressed body (`Content-Encoding: gzip`) was read as JSON and refused as invalid
  characters: it is a 415 naming the encoding now.
* A request head or body sent slowly, or never finished, held its connection for ever: a
  client opening enough of them (slowloris) left the front no file descriptor for anyone
  else. Each now has `http.client_send_timeout_s`, then 408 (checked on a real uvicorn).
* JSON nested ~1,000 deep in a field typed `Any` (`tool_choice`) crashed the decoder into a
  500 with a traceback (and the official client retried it twice): 400 now.
* Whole JSON answers went out chunked, which an HTTP/1.0 client reads as garbage: they carry
  Content-Length now.
* A body that is not UTF-8 named the wrong byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from typing import Any

import pytest

from inlaid.client import UnknownTaskError
from inlaid.http.app import create_app
from inlaid.http.errors import from_inlaid
from inlaid.http.settings import HttpConfig
from inlaid.protocol import GenerateDone, HelloReply

BASE = "SmolLM2-135M-Instruct"


class _StandInClient:
    """What the endpoints use of the SDK client: the hello, generate, remove_task_reply."""

    def __init__(self) -> None:
        self.server = HelloReply(request_id="h", protocol_version=1, server_version="test", model=BASE,
                                 max_model_len=512)
        self.generated: list[dict[str, Any]] = []

    async def handshake(self, timeout_s: float | None = None) -> HelloReply:
        return self.server

    async def generate(self, **kwargs: Any) -> GenerateDone:
        if kwargs.get("task") == "no-such-task":
            raise UnknownTaskError("[unknown_task] unknown task 'no-such-task'", "r2")
        self.generated.append(kwargs)
        return GenerateDone(request_id="r", text=" ok", token_ids=[1], finish_reason="length", num_prompt_tokens=2,
                            queue_seconds=0.0, first_token_seconds=0.0, total_seconds=0.0)

    async def remove_task_reply(self, name: str, timeout_s: float | None = None) -> Any:
        raise UnknownTaskError(f"[unknown_task] unknown task {name!r}", "r1")

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "_StandInClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


def _post(app: Any, path: str, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = (),
          more_body: bool = False, method: str = "POST") -> tuple[int, bytes]:
    """One POST (or `method`) through the ASGI app, as uvicorn would run it; `more_body`: the
    client sends `body` and then nothing more (a stalled upload). Status and body."""
    status, _, answer = _asgi(app, path, body, headers, more_body, method)
    return status, answer


def _asgi(app: Any, path: str, body: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = (),
          more_body: bool = False, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    """`_post`'s exchange: status, response headers (lower-case names), body."""

    async def run() -> tuple[int, dict[str, str], bytes]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
        incoming = [{"type": "http.request", "body": body, "more_body": more_body}]
        sent: list[dict[str, Any]] = []
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await done.wait()  # the client stays connected until the answer is complete
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done.set()

        await app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        answer_headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        return start["status"], answer_headers, b"".join(m.get("body", b"") for m in sent
                                                         if m["type"] == "http.response.body")

    return asyncio.run(run())


def _app(client: _StandInClient, config: HttpConfig | None = None) -> Any:
    return create_app("tcp://127.0.0.1:1", config or HttpConfig(), client=client, admin_client=lambda token: client)


def test_a_body_with_a_utf8_byte_order_mark_is_read():
    client = _StandInClient()
    body = b"\xef\xbb\xbf" + json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1}).encode()
    status, answer = _post(_app(client), "/v1/completions", body)
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["text"] == " ok" and client.generated[0]["prompt"] == "hi"
    # A mark alone is still "no body", and a mark in the middle is still bad JSON.
    for bad in (b"\xef\xbb\xbf", b"{\xef\xbb\xbf}"):
        status, answer = _post(_app(client), "/v1/completions", bad)
        assert status == 400 and json.loads(answer)["error"]["code"] == "invalid_request", answer


def test_unloading_an_unknown_adapter_names_lora_name():
    status, answer = _post(_app(_StandInClient()), "/v1/unload_lora_adapter", b'{"lora_name": "nope"}')
    error = json.loads(answer)["error"]
    assert (status, error["code"], error["param"]) == (404, "model_not_found", "lora_name"), answer
    # Generation keeps naming `model`; elsewhere a 404 names only what the caller says it does.
    unknown = UnknownTaskError("[unknown_task] unknown task 'x'", "r1")
    assert from_inlaid(unknown, model="x").param == "model"
    assert from_inlaid(unknown).param is None
    assert from_inlaid(unknown, not_found_param="lora_name").param == "lora_name"


def test_a_compressed_body_is_refused_naming_its_encoding():
    import gzip

    client = _StandInClient()
    body = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1}).encode()
    status, answer = _post(_app(client), "/v1/completions", gzip.compress(body), ((b"content-encoding", b"gzip"),))
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (415, "unsupported_content_encoding") and "gzip" in error["message"], answer
    assert not client.generated
    status, _ = _post(_app(client), "/v1/completions", body, ((b"content-encoding", b"identity"),))
    assert status == 200


def test_deeply_nested_json_and_bad_utf8_are_400s_naming_the_problem():
    client = _StandInClient()
    for field in ("tool_choice", "function_call"):
        nested = "[" * 5000 + "]" * 5000
        body = f'{{"model": "{BASE}", "messages": [{{"role": "user", "content": "x"}}], "{field}": {nested}}}'.encode()
        status, answer = _post(_app(client), "/v1/chat/completions", body)
        error = json.loads(answer)["error"]
        assert status == 400 and "nested too deeply" in error["message"], answer
    body = json.dumps({"model": BASE, "prompt": "hi there", "max_tokens": 1}).encode().replace(b"there", b"th\xffre")
    status, answer = _post(_app(client), "/v1/completions", body)
    assert status == 400 and f"at byte {body.index(bytes([0xFF]))}" in json.loads(answer)["error"]["message"], answer
    assert not client.generated


def test_a_stalled_body_gets_408():
    client = _StandInClient()
    app = _app(client, HttpConfig(client_send_timeout_s=0.3))
    status, answer = _post(app, "/v1/completions", b'{"model": "', more_body=True)  # and then nothing
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (408, "request_timeout") and "0.3 s" in error["message"], answer
    assert not client.generated
    status, _ = _post(app, "/v1/completions", json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1}).encode())
    assert status == 200


def test_a_body_still_arriving_when_the_front_stops_gets_503():
    """Uvicorn's graceful shutdown cancelled a request still receiving its body after 5 s: a
    bare plain-text 500 and an ERROR traceback (an outside probe, 2026-12-07). The front's
    stop now answers it with OpenAI's JSON 503 `unavailable`, and a body read that starts
    after the stop too."""
    client = _StandInClient()
    app = _app(client, HttpConfig(client_send_timeout_s=30))
    front = app.app.state.front
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"60")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}

    async def exchange() -> tuple[int, dict[str, Any]]:
        pieces = [{"type": "http.request", "body": b'{"model": "', "more_body": True}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if pieces:
                return pieces.pop(0)
            await asyncio.Event().wait()  # the client sends nothing more
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))

    async def run() -> list[tuple[int, dict[str, Any]]]:
        asyncio.get_running_loop().call_later(0.2, front.stop_body_reads)
        started = time.monotonic()
        stopped = await asyncio.wait_for(exchange(), 10)
        assert time.monotonic() - started < 5  # at the stop, not at the 30-s body timeout
        return [stopped, await asyncio.wait_for(exchange(), 10)]

    for status, answer in asyncio.run(run()):
        assert (status, answer["error"]["code"]) == (503, "unavailable") and "stopping" in answer["error"]["message"]
    assert not client.generated
    # A cancel of someone else's (uvicorn's, an outer timeout) besides the stop's is not swallowed.
    app = _app(client, HttpConfig(client_send_timeout_s=30))
    front = app.app.state.front

    async def cancelled_by_another_too() -> None:
        task = asyncio.ensure_future(exchange())
        await asyncio.sleep(0.1)
        front.stop_body_reads()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_by_another_too())


@contextlib.contextmanager
def _uvicorn(head_timeout_s: float, client: _StandInClient | None = None):  # noqa: ANN202
    """The front's app with `client` (the stand-in by default) on a real uvicorn (the protocol
    `serve` uses), on a free loopback port, in a thread; yields the port."""
    import uvicorn

    from inlaid.http.cli import uvicorn_config

    client = client or _StandInClient()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = HttpConfig(port=port, client_send_timeout_s=head_timeout_s)
    server = uvicorn.Server(uvicorn_config(_app(client, config), config))  # `inlaid http`'s own
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _exchange(port: int, request: bytes, timeout_s: float = 30) -> bytes:
    """Send `request` on a fresh connection, read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    return reply


def test_slow_request_heads_are_cut_off_and_others_are_served():
    with _uvicorn(head_timeout_s=0.5) as port:
        # Connections that send half a head, or nothing: each gets 408 and is closed.
        holders = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(20)]
        for index, holder in enumerate(holders):
            if index % 2:
                holder.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        # Meanwhile a whole request is answered at once.
        body = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1}).encode()
        reply = _exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        for holder in holders:
            reply = b""
            while chunk := holder.recv(65536):  # returns b"" once the server closes the connection
                reply += chunk
            holder.close()
            head, _, answer = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), reply
            assert json.loads(answer)["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 20


def test_whole_answers_carry_content_length_for_http_1_0_clients():
    with _uvicorn(head_timeout_s=30) as port:
        for model, expected in ((BASE, 200), ("no-such-task", 404)):  # an answer, the server's refusal
            body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
            reply = _exchange(port, b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head, _, answer = reply.partition(b"\r\n\r\n")
            headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            assert int(head.split()[1]) == expected and b"transfer-encoding" not in headers, reply
            assert int(headers[b"content-length"]) == len(answer)
            json.loads(answer)  # whole JSON, no chunk framing
