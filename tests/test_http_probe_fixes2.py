"""Defects a second outside probe of the HTTP front found, checked on the ASGI app and on a
real uvicorn with a stand-in SDK client (no server, no model), and on the metrics port:

* One ~100 MB request header froze the front for every client (httptools concatenates a
  header's pieces: quadratic copying on the event loop) and was accepted: a head over
  64 KiB now gets 431 and the connection closes.
* A request for the model `__base__` (unknown) was counted as the base model's.
* Bodies under http.max_body_bytes were refused by the server's frame limit with an
  internal-sounding 413; such configs are refused now, and the 413 says what to do.
* `POST /v1/completions/` answered an empty 307; it is a JSON 404.
* Errors named the wrong `param` (token ids, top_logprobs, function_call), unknown fields of
  a content part were dropped, an empty lora_path meant the server's working directory, the
  metrics port served any path and refused HEAD, the unknown-model 404 omitted the base.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from test_http_probe_fixes import BASE, _app, _exchange, _post, _StandInClient, _uvicorn

from inlaid.client import FrameTooLargeError, InvalidRequestError
from inlaid.client.messages import build_generate, encode
from inlaid.http.cli import add_arguments, settings_from_args
from inlaid.http.settings import HttpConfig
from inlaid.http.slow_clients import MAX_HEAD_BYTES
from inlaid.protocol import DEFAULT_MAX_FRAME_BYTES, GenerateDone, TextChunk
from inlaid.serve.config import ConfigError, config_from_dict
from inlaid.serve.metrics import ServerMetrics
from inlaid.serve.metrics_server import start_metrics_server
from inlaid.serve.requests import ActiveRequest

VOCAB = 49152
_COMPLETION = "/v1/completions"
_CHAT = "/v1/chat/completions"


class _Client(_StandInClient):
    """The stand-in, refusing prompt token ids outside the vocabulary as the server does,
    with streams, the task list, the metrics and add_task."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, str]] = []

    def _refusal(self, kwargs: dict[str, Any]) -> Exception | None:
        ids = kwargs.get("prompt_token_ids")
        if ids is not None and any(not 0 <= t < VOCAB for t in ids):
            return InvalidRequestError(f"[invalid_request] prompt token ids must be integers in [0, {VOCAB})", "r")
        if kwargs.get("prompt") == "too big for a frame":
            return FrameTooLargeError("[frame_too_large] frame of 1048588 bytes; the limit is 1048576", "r")
        return None

    async def generate(self, **kwargs: Any) -> GenerateDone:
        if (refusal := self._refusal(kwargs)) is not None:
            raise refusal
        return await super().generate(**kwargs)

    async def stream(self, **kwargs: Any) -> "_Stream":
        return _Stream(self._refusal(kwargs))  # as the SDK: a refusal arrives with the first reply

    async def list_tasks(self, timeout_s: float | None = None) -> list[Any]:
        return []

    async def metrics(self, timeout_s: float | None = None) -> str:
        return "# server metrics\n"

    async def add_task(self, name: str, adapter_dir: str, timeout_s: float | None = None) -> str:
        self.added.append((name, adapter_dir))
        return f"task {name!r} added: {adapter_dir}"


class _Stream:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.result = GenerateDone(request_id="r", text=" ok", token_ids=[1], finish_reason="length",
                                   num_prompt_tokens=2, queue_seconds=0.0, first_token_seconds=0.0, total_seconds=0.0)

    async def __aenter__(self) -> "_Stream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def __aiter__(self) -> Any:
        if self.error is not None:
            raise self.error
        # One turn of the event loop first, so that a refused prompt's error reaches the
        # front before the other prompts' text (a refusal decides the status, as tested).
        await asyncio.sleep(0)
        yield TextChunk(request_id="r", text=" ok", token_ids=[1])

    async def aclose(self) -> None:
        pass


def _error(app: Any, path: str, body: dict[str, Any], status: int = 400) -> dict[str, Any]:
    got, answer = _post(app, path, json.dumps(body).encode())
    assert got == status, answer
    return json.loads(answer)["error"]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], **fields}


def _request(port: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return _exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)


def test_an_oversized_request_head_is_refused_and_others_are_served():
    small = {"model": BASE, "prompt": "hi", "max_tokens": 1}
    with _uvicorn(head_timeout_s=120) as port:
        # A large head within the limit, its body in the same write, is served.
        data = json.dumps(small).encode()
        padded = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * (MAX_HEAD_BYTES - 200)}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        assert _exchange(port, padded.encode() + data).startswith(b"HTTP/1.1 200")
        # A head exactly at the limit, not finished: held, while another client is served.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as big:
            start = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: "
            big.sendall(start + b"a" * (MAX_HEAD_BYTES - len(start)))
            assert _request(port, small).startswith(b"HTTP/1.1 200")
            big.sendall(b"a")  # one byte over
            reply = b""
            while chunk := big.recv(65536):  # b"" once the front closes the connection
                reply += chunk
        head, _, answer = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431"), reply
        assert json.loads(answer)["error"]["code"] == "request_header_fields_too_large"
        # The probe's flood: 100 MB of one header in 1 MB writes. The front closes the
        # connection long before the end (the writes fail) and answers everyone else.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as flood:
            with pytest.raises(OSError):  # reset or broken pipe
                flood.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: ")
                for _ in range(100):
                    flood.sendall(b"a" * 1_000_000)
        assert _request(port, small).startswith(b"HTTP/1.1 200")


def test_a_request_naming_the_task___base___is_not_counted_as_the_base():
    tasks = {"qa": "/adapters/qa"}
    metrics = ServerMetrics([], tasks, {}, {"model": BASE})

    def request(task: str | None) -> ActiveRequest:
        return ActiveRequest(key=(b"c", "r"), engine_id="e", seq_id=1, task=task, stream=False, num_prompt_tokens=3)

    metrics.on_admitted(request(None))  # the base has run: its series exists
    metrics.on_admitted(request("qa"))
    metrics.on_rejected("__base__", "unknown_task")
    metrics.on_rejected("nope", "unknown_task")
    del tasks["qa"]  # removed while its request runs: the request keeps its task's label
    metrics.on_finished(request("qa"), "stop")
    counts = {(s.labels["task"], s.labels["outcome"]): s.value
              for family in text_string_to_metric_families(metrics.exposition()) if family.name == "inlaid_requests"
              for s in family.samples if s.name == "inlaid_requests_total"}
    assert counts == {("__unknown__", "unknown_task"): 2, ("qa", "stop"): 1}, counts


def test_body_limit_and_frame_limit_agree(model_dir, tmp_path):
    def config(**sections: Any) -> Any:
        return config_from_dict({"model": {"dir": str(model_dir)}, **sections})

    with pytest.raises(ConfigError, match=r"http\.max_body_bytes \(4194304\).*server\.max_frame_bytes \(1048576\)"):
        config(http={"max_body_bytes": 4 << 20})
    assert config(http={"max_body_bytes": 4 << 20}, server={"max_frame_bytes": 8 << 20}).http.max_body_bytes == 4 << 20
    assert config(http={}, server={"max_frame_bytes": 65536}).http.max_body_bytes == 65536 - 1024  # the default shrinks
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        config(http={}, server={"max_frame_bytes": 1024})
    # `inlaid http --config` checks an override against the server's frame limit too.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    toml = tmp_path / "server.toml"
    toml.write_text(f'[model]\ndir = "{model_dir}"\n[http]\n')
    with pytest.raises(ValueError, match="server.max_frame_bytes"):
        settings_from_args(parser.parse_args(["--config", str(toml), "--max-body-bytes", str(2 << 20)]))
    assert settings_from_args(parser.parse_args(["--config", str(toml)]))[1].body_bytes_limit == 1047552


def test_every_body_the_front_accepts_fits_the_servers_frame():
    client = _Client()
    limit = HttpConfig().body_bytes_limit
    model = "m" * 128  # the longest task name
    options = {"max_tokens": 2**63 - 1, "temperature": 0.1, "top_p": 0.1, "top_k": 2**63 - 1, "seed": -(2**63),
               "stop": ["\u00e9" * 256] * 16, "stop_token_ids": [2**63 - 1] * 256, "ignore_eos": True}

    def filled(body: dict[str, Any], pad: Any) -> bytes:
        """`body` with `pad(body, n)` growing its prompt by at most the n bytes left."""
        return msgspec.json.encode(pad(body, limit - len(msgspec.json.encode(body))))

    bodies = []
    # Every option at its widest, and none (the frame then carries the front's defaults,
    # which the body did not pay for).
    for extra in (options, {}):
        bodies += [
            (_COMPLETION, filled({"model": model, "prompt": "", **extra}, lambda b, n: {**b, "prompt": "x" * n})),
            (_COMPLETION, filled({"model": model, "prompt": [], **extra},
                                 lambda b, n: {**b, "prompt": [0] * ((n + 1) // 2)})),
            (_CHAT, filled({"model": model, "messages": [], **extra},
                           lambda b, n: {**b, "messages": [{"role": "user", "content": ""}] * (n // 29)})),
            (_CHAT, filled({"model": model, "messages": [{"role": "developer", "content": ""}], **extra},
                           lambda b, n: {**b, "messages": [{"role": "developer", "content": "y" * n}]})),
        ]
    for path, body in bodies:
        assert limit - 64 <= len(body) <= limit
        status, answer = _post(_app(client, HttpConfig()), path, body)
        assert status == 200, answer
    assert len(client.generated) == len(bodies)
    for kwargs in client.generated:
        form = {name: kwargs.get(name) for name in ("prompt", "messages", "prompt_token_ids")}
        sampling = {name: kwargs[name] for name in options}
        frame = encode(build_generate("0123abcd-18446744073709551615", task=kwargs["task"], sampling=None, stream=True,
                                      deadline_s=1e300, **form, **sampling))
        assert len(frame) <= DEFAULT_MAX_FRAME_BYTES, len(frame)


def test_a_frame_refusal_says_what_to_do():
    error = _error(_app(_Client()), _COMPLETION, {"model": BASE, "prompt": "too big for a frame"}, 413)
    assert (error["code"], error["param"]) == ("request_too_large", "prompt"), error
    assert "1048588 bytes" in error["message"] and "server.max_frame_bytes" in error["message"]
    assert "shorter prompt" in error["message"] and not error["message"].startswith("frame of")


def test_a_trailing_slash_is_an_unknown_path():
    for path in ("/v1/completions/", "/v1/chat/completions/"):
        error = _error(_app(_Client()), path, {"model": BASE, "prompt": "hi"}, 404)
        assert error["code"] == "not_found" and path in error["message"], error


def test_errors_name_the_argument_at_fault():
    app = _app(_Client())
    error = _error(app, _COMPLETION, {"model": BASE, "prompt": [-1]})
    assert error["param"] == "prompt" and "token ids" in error["message"], error
    for stream in (False, True):  # the failing one of several prompts, in either path
        error = _error(app, _COMPLETION, {"model": BASE, "prompt": [[1, 2], [99999999]], "stream": stream})
        assert error["param"] == "prompt[1]" and error["message"].startswith("prompt[1]: "), error
    for value in (2, -1, 21):
        assert _error(app, _CHAT, _chat(top_logprobs=value))["param"] == "top_logprobs"
    assert _error(app, _CHAT, _chat(function_call="auto"))["param"] == "function_call"
    assert _error(app, _CHAT, _chat(functions=[{"name": "f"}]))["param"] == "functions"
    assert _error(app, _CHAT, _chat(logprobs=True, top_logprobs=2))["param"] == "logprobs"
    status, answer = _post(app, _CHAT, json.dumps(_chat(top_logprobs=0, function_call="none")).encode())
    assert status == 200, answer  # neutral values pass


def test_an_unknown_field_of_a_content_part_is_refused():
    client = _Client()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "x", "foo": 1}]}]
    error = _error(_app(client), _CHAT, _chat(messages=messages))
    assert error["param"] == "messages[0].content[1].foo" and "foo" in error["message"], error
    assert not client.generated
    del messages[0]["content"][1]["foo"]
    status, answer = _post(_app(client), _CHAT, json.dumps(_chat(messages=messages)).encode())
    assert status == 200, answer


def test_an_empty_lora_path_is_refused():
    client = _Client()
    error = _error(_app(client), "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": ""})
    assert (error["param"], error["message"]) == ("lora_path", "lora_path must not be empty"), error
    assert not client.added


def test_a_relative_lora_path_is_refused_in_the_apis_words():
    """The server refuses a relative adapter path (it would depend on its working directory),
    naming its own field `adapter_dir`, which an HTTP caller never sent."""
    client = _Client()
    error = _error(_app(client), "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "adapters/qa"})
    assert error["param"] == "lora_path" and error["message"].startswith("lora_path must be an absolute path"), error
    assert not client.added


def test_the_unknown_model_404_names_the_base_model():
    error = _error(_app(_Client()), _COMPLETION, {"model": "no-such-task", "prompt": "hi"}, 404)
    assert error["param"] == "model" and f"`{BASE}`" in error["message"], error
    status, answer = _post(_app(_Client()), "/v1/models/nope", b"", method="GET")
    assert status == 404 and f"`{BASE}`" in json.loads(answer)["error"]["message"], answer


def test_the_metrics_port_answers_as_the_fronts_metrics():
    registry = CollectorRegistry()
    Counter("probe", "a counter", registry=registry).inc()
    server = start_metrics_server(0, "127.0.0.1", registry)

    def ask(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    try:
        status, headers, body = ask("GET", "/metrics")
        assert status == 200 and b"probe_total 1.0" in body
        head_status, head_headers, head_body = ask("HEAD", "/metrics")
        assert (head_status, head_body, head_headers["content-length"]) == (200, b"", str(len(body)))
        status, _, body = ask("GET", "/foo")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        status, headers, _ = ask("POST", "/metrics")
        assert status == 405 and headers["allow"] == "GET, HEAD"
    finally:
        server.shutdown()
        server.server_close()
    # The front: the same statuses for the same requests.
    app = _app(_Client())
    assert [_post(app, path, b"", method=method)[0] for method, path in
            (("GET", "/metrics"), ("HEAD", "/metrics"), ("GET", "/foo"), ("POST", "/metrics"))] == [200, 200, 404, 405]

