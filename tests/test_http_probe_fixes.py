"""Defects an outside probe of the HTTP front found, checked on the ASGI app with a stand-in
SDK client (no server, no model): fast.

* A body starting with a UTF-8 byte-order mark was refused as "not valid JSON" (RFC 8259
  lets a parser ignore the mark; .NET and PowerShell clients send it).
* Unloading an unknown adapter answered 404 with `param: "model"`, a field the request
  does not have: it names `lora_name` now.
* A gzip-compressed body (`Content-Encoding: gzip`) was read as JSON and refused as invalid
  characters: it is a 415 naming the encoding now.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from inlaid.client import UnknownTaskError
from inlaid.http.app import create_app
from inlaid.http.errors import from_inlaid
from inlaid.http.settings import HttpConfig
from inlaid.protocol import GenerateDone, HelloReply

BASE = "SmolLM2-135M-Instruct"


class _StandInClient:
    """What the endpoints use of the SDK client: the hello, generate, remove_task."""

    def __init__(self) -> None:
        self.server = HelloReply(request_id="h", protocol_version=1, server_version="test", model=BASE,
                                 max_model_len=512)
        self.generated: list[dict[str, Any]] = []

    async def handshake(self, timeout_s: float | None = None) -> HelloReply:
        return self.server

    async def generate(self, **kwargs: Any) -> GenerateDone:
        self.generated.append(kwargs)
        return GenerateDone(request_id="r", text=" ok", token_ids=[1], finish_reason="length", num_prompt_tokens=2,
                            queue_seconds=0.0, first_token_seconds=0.0, total_seconds=0.0)

    async def remove_task(self, name: str, timeout_s: float | None = None) -> str:
        raise UnknownTaskError(f"[unknown_task] unknown task {name!r}", "r1")

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "_StandInClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


def _post(app: Any, path: str, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[int, bytes]:
    """One POST through the ASGI app, as uvicorn would run it."""

    async def run() -> tuple[int, bytes]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
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
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    return asyncio.run(run())


def _app(client: _StandInClient) -> Any:
    return create_app("tcp://127.0.0.1:1", HttpConfig(), client=client, admin_client=lambda token: client)


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
