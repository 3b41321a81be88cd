"""Defects a third outside probe of the HTTP front found, checked on the ASGI app with a
stand-in SDK client, on a real uvicorn, and on `python -m inlaid.http` (no model):

* `inlaid http --config` refused a config whose admin_token_env was unset in its
  environment, though the front holds no token (it passes the caller's on).
* A /v1/completions request listing as many prompts as the derived limit could never be
  admitted (the front's share of server.max_pending_requests is smaller), and the 429 told
  of the request's own prompts as other traffic.
* `max_tokens: null` on /v1/completions meant 16 (OpenAI's default when omitted), so the
  context refusal's advice "give none (null)" repeated the error.
* Chat's context refusal named `max_tokens` when the request sent `max_completion_tokens`.
* A request head over 64 KiB arriving in one read was accepted.
* `/health` 503s carried no Retry-After; the unknown-model 404s of /v1/models/{id} and of
  generation differed; a port in use exited 3 with a uvicorn log line; replacing a
  configured task over HTTP did not say it replaces the config's entry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_http_probe_fixes import BASE, _app, _asgi, _exchange, _post, _StandInClient, _uvicorn
from test_http_structured import _SERVERS_429, _Overloaded  # the server's 429, with its counts

from inlaid.client import RequestTimeoutError, UnknownTaskError
from inlaid.client.errors import error_from_reply
from inlaid.http.cli import add_arguments, settings_from_args
from inlaid.http.schema import CompletionRequest
from inlaid.http.settings import HttpConfig, front_admission_share
from inlaid.http.slow_clients import MAX_HEAD_BYTES
from inlaid.http.translate import completion_call
from inlaid.protocol import (
    AdminReply, ContextOverflow, ErrorCode, ErrorReply, HealthReply, ReplacedConfigEntry,
)

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 512


def _settings(*argv: str) -> tuple[str, HttpConfig]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def _toml(tmp_path: Path, model_dir: Path, server: str = "", http: str = "") -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'[model]\ndir = "{model_dir}"\n[server]\naddress = "tcp://127.0.0.1:5599"\n{server}\n'
                    f"[http]\n{http}\n")
    return path


def _call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI app: status, headers (lower-case names), body."""
    return _asgi(app, path, body, method=method)


# ---------------------------------------------------------------- 1: no admin token needed


def test_the_front_alone_reads_a_config_without_its_admin_token(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("INLAID_PROBE_UNSET_TOKEN", raising=False)
    for server in ('admin_token_env = "INLAID_PROBE_UNSET_TOKEN"', 'admin_token_file = "missing-token-file"'):
        address, config = _settings("--config", str(_toml(tmp_path, model_dir, server)))
        assert address == "tcp://127.0.0.1:5599" and config.port == 8000
    # Everything else is still checked.
    with pytest.raises(ValueError, match="http.port"):
        _settings("--config", str(_toml(tmp_path, model_dir, 'admin_token_env = "X"', "port = 0")))


# ---------------------------------------------------------------- 2: prompts per request


def test_the_prompt_limit_fits_the_fronts_admission_share(model_dir, tmp_path):
    # The coordinator keeps the last tenth (at least one) from a connection holding its share.
    assert [front_admission_share(n) for n in (1, 2, 8, 10, 32, 1024)] == [1, 1, 7, 9, 29, 922]
    for name in ("small", "default", "eight"):  # a config each: _toml writes server.toml in its directory
        (tmp_path / name).mkdir()
    small = _toml(tmp_path / "small", model_dir, "max_pending_requests = 8")
    assert _settings("--config", str(small))[1].prompts_per_request_limit == 7  # was 8: never admitted
    assert _settings("--config", str(_toml(tmp_path / "default", model_dir)))[1].prompts_per_request_limit == 16
    with pytest.raises(ValueError, match=r"max_prompts_per_request \(8\) exceeds the 7 .*could never be admitted"):
        _settings("--config", str(_toml(tmp_path / "eight", model_dir, "max_pending_requests = 8",
                                        "max_prompts_per_request = 8")))
    with pytest.raises(ValueError, match="could never be admitted"):
        _settings("--config", str(small), "--max-prompts", "8")
    assert _settings("--config", str(small), "--max-prompts", "7")[1].prompts_per_request_limit == 7
    config = HttpConfig()
    config.fit_to_pending_requests(1024)
    assert config.max_prompts_per_request == 16


def test_a_429_does_not_count_the_requests_own_prompts_as_other_traffic():
    body = json.dumps({"model": BASE, "prompt": ["x"] * 8, "max_tokens": 1}).encode()
    status, answer = _post(_app(_Overloaded(7, 8, _SERVERS_429)), "/v1/completions", body)
    error = json.loads(answer)["error"]
    assert (status, error["code"], error["param"]) == (429, "overloaded", None), answer
    message = error["message"]
    assert message.startswith("prompt[7]: 7 requests in flight, 7 of them this request's own earlier prompts and 0 "
                              "other requests through this front"), message
    assert "send fewer prompts per request" in message and "7 of them this connection's" not in message
    # Its first prompt refused: other traffic holds the slots, so no advice to send fewer prompts.
    status, answer = _post(_app(_Overloaded(0, 8, _SERVERS_429)), "/v1/completions",
                           json.dumps({"model": BASE, "prompt": ["x"] * 2, "max_tokens": 1}).encode())
    message = json.loads(answer)["error"]["message"]
    assert status == 429 and message.startswith("prompt[0]: ") and "send fewer prompts" not in message, message
    # Within the share, the same request is served.
    status, answer = _post(_app(_Overloaded(7, 8, _SERVERS_429)), "/v1/completions",
                           json.dumps({"model": BASE, "prompt": ["x"] * 7, "max_tokens": 1}).encode())
    assert status == 200 and len(json.loads(answer)["choices"]) == 7


# ---------------------------------------------------------------- 3, 4: max_tokens


class _Context(_StandInClient):
    """Refuses a max_tokens the context cannot hold with the coordinator's message."""

    async def generate(self, **kwargs: Any) -> Any:
        self.generated.append(kwargs)
        prompt, max_tokens = 10, kwargs["max_tokens"]
        if max_tokens is not None and max_tokens > MAX_MODEL_LEN - prompt:
            raise error_from_reply(ErrorReply(
                request_id="r", code=ErrorCode.CONTEXT_LENGTH,
                message=f"the context length is {MAX_MODEL_LEN} tokens, but {prompt + max_tokens} were requested "
                        f"({prompt} in the prompt, max_tokens {max_tokens}): lower max_tokens to at most "
                        f"{MAX_MODEL_LEN - prompt}, or give none (null) to generate until the context is full",
                field="max_tokens", context_overflow=ContextOverflow(context_length=MAX_MODEL_LEN, prompt_tokens=prompt,
                                                                     max_tokens=max_tokens)))
        return await super().generate(**kwargs)


def test_an_explicit_null_max_tokens_means_until_the_context_is_full():
    def decoded(raw: str) -> CompletionRequest:
        return msgspec.json.decode(raw, type=CompletionRequest)

    assert completion_call(decoded('{"model": "m", "prompt": "x"}'), BASE).options["max_tokens"] == 16  # OpenAI's
    assert completion_call(decoded('{"model": "m", "prompt": "x", "max_tokens": null}'), BASE).options[
        "max_tokens"] is None
    assert completion_call(decoded('{"model": "m", "prompt": "x", "max_tokens": 3}'), BASE).options["max_tokens"] == 3
    # The refusal's advice works: the same request with null is served.
    client = _Context()
    status, answer = _post(_app(client), "/v1/completions", b'{"model": "%s", "prompt": "x", "max_tokens": 600}'
                           % BASE.encode())
    assert status == 400 and "give none (null)" in json.loads(answer)["error"]["message"], answer
    status, answer = _post(_app(client), "/v1/completions", b'{"model": "%s", "prompt": "x", "max_tokens": null}'
                           % BASE.encode())
    assert status == 200 and client.generated[-1]["max_tokens"] is None, answer


def test_a_context_refusal_names_the_field_the_chat_request_sent():
    client = _Context()
    chat = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}]}
    status, answer = _post(_app(client), "/v1/chat/completions",
                           json.dumps({**chat, "max_completion_tokens": 600}).encode())
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (400, "context_length_exceeded"), answer
    assert "max_completion_tokens 600" in error["message"] and "lower max_completion_tokens to at most 502" in \
        error["message"] and "max_tokens" not in error["message"], error
    status, answer = _post(_app(client), "/v1/chat/completions", json.dumps({**chat, "max_tokens": 600}).encode())
    assert "lower max_tokens to at most 502" in json.loads(answer)["error"]["message"], answer


# ---------------------------------------------------------------- 5: request heads


def _head(size: int, body: bytes) -> bytes:
    """A whole POST head of exactly `size` bytes (request line, headers, blank line)."""
    start = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    end = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    pad = size - len(start) - len(end) - len(b"X-Pad: \r\n")
    return start + b"X-Pad: " + b"p" * pad + b"\r\n" + end


def test_a_whole_head_over_64_kib_in_one_write_is_refused(caplog):
    body = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1}).encode()
    with _uvicorn(head_timeout_s=120) as port:
        assert _exchange(port, _head(MAX_HEAD_BYTES, body) + body).startswith(b"HTTP/1.1 200")
        for size in (MAX_HEAD_BYTES + 1, 100_000, 131_000):
            reply = _exchange(port, _head(size, body) + body)
            head, _, answer = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 431"), (size, reply[:200])
            assert json.loads(answer)["error"]["code"] == "request_header_fields_too_large"
        # An Upgrade header in a refused head starts no websocket handshake (the request's scope
        # was never built: the handshake raised in data_received and the connection was aborted).
        upgrade = _head(100_000, body).replace(b"Connection: close", b"Connection: Upgrade\r\nUpgrade: websocket", 1)
        with caplog.at_level(logging.ERROR):
            reply = _exchange(port, upgrade + body)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
        assert _exchange(port, _head(200, body) + body).startswith(b"HTTP/1.1 200")  # the front still serves


# ---------------------------------------------------------------- 6: /health


class _Health(_StandInClient):
    def __init__(self, status: str | None, requantizer: str = "") -> None:
        super().__init__()
        self.status = status
        self.requantizer = requantizer

    async def health(self, timeout_s: float | None = None) -> HealthReply:
        if self.status is None:
            raise RequestTimeoutError("no answer")
        return HealthReply(request_id="h", status=self.status, executor_ready=self.status == "ok", uptime_seconds=1.0,
                           requantizer=self.requantizer)


def test_health_503s_carry_retry_after():
    for status in ("starting", "shutting_down", None):
        code, headers, body = _call(_app(_Health(status)), "GET", "/health")
        assert (code, headers.get("retry-after")) == (503, "1"), (status, headers, body)
        assert json.loads(body)["status"] == (status or "unreachable")
    code, headers, body = _call(_app(_Health("ok")), "GET", "/health")
    assert code == 200 and "retry-after" not in headers and "requantizer" not in json.loads(body)  # an older server


def test_health_says_what_the_requantizer_does_without_failing_for_it():
    code, _, body = _call(_app(_Health("ok", requantizer="starting")), "GET", "/health")
    assert code == 200 and json.loads(body)["requantizer"] == "starting"


# ---------------------------------------------------------------- 7: model_not_found


class _Tasks(_StandInClient):
    async def list_tasks(self, timeout_s: float | None = None) -> list[Any]:
        return [argparse.Namespace(name="qa", adapter_dir="/a/qa"), argparse.Namespace(name="code", adapter_dir="/a/c")]

    async def generate(self, **kwargs: Any) -> Any:
        raise UnknownTaskError(f"[unknown_task] unknown task {kwargs['task']!r}; this server has: code, qa", "r")


def test_unknown_model_404s_have_one_wording():
    status, _, answer = _call(_app(_Tasks()), "GET", "/v1/models/nope")
    by_card = json.loads(answer)["error"]
    status2, _, answer = _call(_app(_Tasks()), "POST", "/v1/completions",
                               b'{"model": "nope", "prompt": "hi", "max_tokens": 1}')
    by_generation = json.loads(answer)["error"]
    assert status == status2 == 404 and by_card == by_generation, (by_card, by_generation)
    assert by_card["message"] == (f"The model `nope` does not exist; this server has: `{BASE}` (the base model), "
                                  "`code`, `qa`."), by_card


# ---------------------------------------------------------------- 10: replacing a configured task


class _Replacing(_StandInClient):
    async def add_task_reply(self, name: str, adapter_dir: str, timeout_s: float | None = None) -> AdminReply:
        return AdminReply(
            request_id="a", message=f"task {name!r} added: {adapter_dir}; it replaces the config's [tasks] entry "
            f"(/srv/{name}) until it is removed, restarts included (the state directory keeps it); not re-quantized: "
            "no calibration", replaces_config_entry=ReplacedConfigEntry(adapter_dir=f"/srv/{name}",
                                                                         kept_across_restarts=True))


def test_replacing_a_configured_task_says_so():
    status, _, answer = _call(_app(_Replacing()), "POST", "/v1/load_lora_adapter",
                              b'{"lora_name": "qa", "lora_path": "/new/qa"}')
    assert status == 200 and answer.decode() == (
        "Success: LoRA adapter 'qa' added successfully. Note: it replaces the config's [tasks] entry (/srv/qa) until "
        "it is removed, restarts included (the state directory keeps it)."), answer


# ---------------------------------------------------------------- 1 and 8: the process


def _front(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inlaid.http", "--log-format", "text", *argv], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_front_alone_starts_without_the_token_and_a_port_in_use_exits_2(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "INLAID_PROBE_UNSET_TOKEN"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        front = _front("--address", "tcp://127.0.0.1:1", "--port", str(port), env=env)
        out, err = front.communicate(timeout=60)
        assert front.returncode == 2, (front.returncode, out, err)
        assert err.strip() == f"inlaid http: cannot listen on 127.0.0.1:{port}: Address already in use", err
    config = _toml(tmp_path, model_dir, 'admin_token_env = "INLAID_PROBE_UNSET_TOKEN"', f"port = {port}")
    front = _front("--config", str(config), env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and front.poll() is None:
            try:
                reply = _exchange(port, b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5)
            except OSError:
                time.sleep(0.1)
                continue
            assert reply.startswith(b"HTTP/1.1 200"), reply
            break
        else:
            pytest.fail(f"the front did not start (exit {front.poll()})")
    finally:
        front.terminate()
        front.communicate(timeout=30)
    assert front.returncode == 0


def test_a_public_host_without_a_config_names_the_switch_that_allows_it(tmp_path: Path) -> None:
    """`inlaid http --host 0.0.0.0` (no config) was told to set a config key it has no file for."""
    with pytest.raises(ValueError, match="not a loopback address; pass --allow-public-bind to listen"):
        _settings("--host", "0.0.0.0")
    assert _settings("--host", "0.0.0.0", "--allow-public-bind")[1].host == "0.0.0.0"
