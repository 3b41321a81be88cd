"""The HTTP front answers from the facts the server's replies carry (ErrorReply.field,
.in_flight, .context_overflow; AdminReply.replaces_config_entry), never from the words of
their messages: those are for people and may be reworded. Checked on the ASGI app with
stand-in SDK clients that raise what the SDK makes of a server's ErrorReply; and OpenAI's
ranges of temperature and top_p, which are narrower than Inlaid's, are the front's own.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
from test_http_probe_fixes import BASE, _app, _post, _StandInClient

from inlaid.client.errors import error_from_reply
from inlaid.protocol import (
    AdminReply, ContextOverflow, ErrorCode, ErrorReply, GenerateDone, InFlightCounts, ReplacedConfigEntry,
)

# Messages in other words than the server's: the HTTP answers must not change with them.
_REWORDED = "wording that no parser of the old front would recognise"


def _server_error(code: str, message: str, **facts: Any) -> Exception:
    """What the SDK raises for this ErrorReply from the server (as it came over the wire)."""
    reply = msgspec.msgpack.decode(msgspec.msgpack.encode(ErrorReply(request_id="r", code=code, message=message,
                                                                     **facts)), type=ErrorReply)
    return error_from_reply(reply)


def _error_of(client: _StandInClient, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, answer = _post(_app(client), path, json.dumps(body).encode())
    return status, json.loads(answer)["error"]


# ---------------------------------------------------------------- 429: the admission counts


class _Overloaded(_StandInClient):
    """Holds each admitted request until all prompts are sent; refuses past `share` with the
    server's counts, in `message`'s words."""

    def __init__(self, share: int, limit: int, message: str) -> None:
        super().__init__()
        self.share, self.limit, self.message, self.in_flight = share, limit, message, 0

    async def generate(self, **kwargs: Any) -> GenerateDone:
        if self.in_flight >= self.share:
            raise _server_error(ErrorCode.OVERLOADED, self.message, in_flight=InFlightCounts(
                requests=self.in_flight, this_connection=self.in_flight, limit=self.limit))
        self.in_flight += 1
        try:
            await asyncio.sleep(0.05)
            return await super().generate(**kwargs)
        finally:
            self.in_flight -= 1


_SERVERS_429 = ("7 requests in flight, 7 of them this connection's; the last tenth of the 8 is kept for other "
                "clients; retry later")


@pytest.mark.parametrize("words", [_SERVERS_429, _REWORDED])
def test_a_429_tells_the_requests_own_prompts_apart_from_the_counts(words):
    body = {"model": BASE, "prompt": ["x"] * 8, "max_tokens": 1}
    status, error = _error_of(_Overloaded(7, 8, words), "/v1/completions", body)
    assert (status, error["code"], error["param"]) == (429, "overloaded", None), error
    assert error["message"] == (
        "prompt[7]: 7 requests in flight, 7 of them this request's own earlier prompts and 0 other requests through "
        "this front; the last tenth of the server's 8 is kept for other clients; retry later; this request's 8 "
        "prompts each need an admission slot: send fewer prompts per request"), error
    # The server full: its limit is said as such.
    status, error = _error_of(_Overloaded(3, 3, words), "/v1/completions", {**body, "prompt": ["x"] * 4})
    assert status == 429 and error["message"] == (
        "prompt[3]: 3 requests in flight, 3 of them this request's own earlier prompts and 0 other requests through "
        "this front: the server's limit; retry later; this request's 4 prompts each need an admission slot: send "
        "fewer prompts per request"), error


class _RefusedOnce(_StandInClient):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def generate(self, **kwargs: Any) -> GenerateDone:
        raise self.error


@pytest.mark.parametrize("words", [_SERVERS_429, _REWORDED])
def test_a_one_prompt_429_says_the_front_not_this_connection(words):
    """The server counts the front's one connection, every HTTP client's: "58 of them this
    connection's" read as the caller's own (an outside probe)."""
    refusal = _server_error(ErrorCode.OVERLOADED, words, in_flight=InFlightCounts(requests=58, this_connection=58,
                                                                                  limit=64))
    status, error = _error_of(_RefusedOnce(refusal), "/v1/completions", {"model": BASE, "prompt": "x"})
    assert (status, error["code"]) == (429, "overloaded"), error
    assert error["message"] == ("58 requests in flight, 58 of them through this HTTP front; the last tenth of the "
                                "server's 64 is kept for other clients; retry later"), error


def test_a_429_without_counts_keeps_the_servers_words():
    """A refusal that carries no counts (a server older than the field) is passed on with a
    note, not parsed."""

    class _NoCounts(_Overloaded):
        async def generate(self, **kwargs: Any) -> GenerateDone:
            if self.in_flight >= self.share:
                raise _server_error(ErrorCode.OVERLOADED, self.message)
            return await super().generate(**kwargs)

    status, error = _error_of(_NoCounts(2, 8, _SERVERS_429), "/v1/completions",
                              {"model": BASE, "prompt": ["x"] * 3, "max_tokens": 1})
    assert status == 429 and error["message"].startswith(f"prompt[2]: {_SERVERS_429} (2 of the requests in flight are "
                                                         "this request's own earlier prompts)"), error


# ---------------------------------------------------------------- 400: the field at fault


class _Refusing(_StandInClient):
    """Refuses every generate with the server's reply built from `facts`."""

    def __init__(self, code: str, message: str, **facts: Any) -> None:
        super().__init__()
        self.error = _server_error(code, message, **facts)

    async def generate(self, **kwargs: Any) -> GenerateDone:
        self.generated.append(kwargs)
        raise self.error


_SERVERS_CONTEXT = ("the context length is 512 tokens, but 610 were requested (10 in the prompt, max_tokens 600): "
                    "lower max_tokens to at most 502, or give none (null) to generate until the context is full")
_CHAT = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("words", [_SERVERS_CONTEXT, _REWORDED])
def test_a_context_refusal_is_said_in_the_clients_terms_from_the_overflow(words):
    overflow = ContextOverflow(context_length=512, prompt_tokens=10, max_tokens=600)
    client = _Refusing(ErrorCode.CONTEXT_LENGTH, words, field="max_tokens", context_overflow=overflow)
    status, error = _error_of(client, "/v1/chat/completions", {**_CHAT, "max_completion_tokens": 600})
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "messages"), error
    assert error["message"] == (
        "the context length is 512 tokens, but 610 were requested (10 in the prompt, max_completion_tokens 600): lower "
        "max_completion_tokens to at most 502, or give none (null) to generate until the context is full"), error
    status, error = _error_of(client, "/v1/chat/completions", {**_CHAT, "max_tokens": 600})
    assert status == 400 and error["message"] == _SERVERS_CONTEXT, error
    status, error = _error_of(client, "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 600})
    assert (status, error["param"], error["message"]) == (400, "prompt", _SERVERS_CONTEXT), error


@pytest.mark.parametrize("field, body, param", [
    ("temperature", {"temperature": 0.5}, "temperature"),
    ("top_k", {"top_k": 5}, "top_k"),
    ("stop", {"stop": ["x"]}, "stop"),
    ("prompt_token_ids", {"prompt": [1, 2]}, "prompt"),
    ("max_tokens", {"max_tokens": 5}, "max_tokens"),
    ("deadline_s", {}, None),  # the front's own field: nothing the client sent
])
def test_an_invalid_request_names_the_param_from_the_servers_field(field, body, param):
    client = _Refusing(ErrorCode.INVALID_REQUEST, _REWORDED, field=field)
    status, error = _error_of(client, "/v1/completions", {"model": BASE, "prompt": "x", **body})
    assert (status, error["code"], error["param"], error["message"]) == (400, "invalid_request", param, _REWORDED)
    status, error = _error_of(client, "/v1/completions", {"model": BASE, **body, "prompt": ["x", "y"]})
    if param == "prompt":  # one of several prompts: the one refused (the first, here) is named
        assert error["param"] == "prompt[0]" and error["message"] == f"prompt[0]: {_REWORDED}", error


def test_chat_names_max_completion_tokens_from_the_field():
    client = _Refusing(ErrorCode.INVALID_REQUEST, "max_tokens must be at most 4096", field="max_tokens")
    status, error = _error_of(client, "/v1/chat/completions", {**_CHAT, "max_completion_tokens": 9000})
    assert (status, error["param"]) == (400, "max_completion_tokens"), error


# ---------------------------------------------------------------- load_lora_adapter


class _Adding(_StandInClient):
    def __init__(self, message: str, replaced: ReplacedConfigEntry | None, hessians_dropped: bool = False,
                 already_served: bool = False) -> None:
        super().__init__()
        self.message, self.replaced = message, replaced
        self.hessians_dropped, self.already_served = hessians_dropped, already_served

    async def add_task_reply(self, name: str, adapter_dir: str, timeout_s: float | None = None) -> AdminReply:
        return AdminReply(request_id="a", message=self.message, replaces_config_entry=self.replaced,
                          hessians_dropped=self.hessians_dropped, already_served=self.already_served)


_SERVERS_ADDED = ("task 'qa' added: /new/qa; it replaces the config's [tasks] entry (/srv/qa) until it is removed, "
                  "restarts included (the state directory keeps it); not re-quantized: no calibration")


@pytest.mark.parametrize("words", [_SERVERS_ADDED, _REWORDED])
def test_replacing_a_configured_task_is_noted_from_the_replies_field(words):
    body = b'{"lora_name": "qa", "lora_path": "/new/qa"}'
    kept = ReplacedConfigEntry(adapter_dir="/srv/qa", kept_across_restarts=True)
    status, answer = _post(_app(_Adding(words, kept)), "/v1/load_lora_adapter", body)
    assert status == 200 and answer.decode() == (
        "Success: LoRA adapter 'qa' added successfully. Note: it replaces the config's [tasks] entry (/srv/qa) until "
        "it is removed, restarts included (the state directory keeps it)."), answer
    until_restart = ReplacedConfigEntry(adapter_dir="/srv/qa", kept_across_restarts=False)
    status, answer = _post(_app(_Adding(words, until_restart)), "/v1/load_lora_adapter", body)
    assert answer.decode().endswith("entry (/srv/qa) until the server restarts (no server.state_dir)."), answer
    # No field, no note, whatever the words say.
    status, answer = _post(_app(_Adding(words, None)), "/v1/load_lora_adapter", body)
    assert status == 200 and answer.decode() == "Success: LoRA adapter 'qa' added successfully.", answer
    # Files it served already: nothing was loaded again (it said "added successfully" and nothing else).
    status, answer = _post(_app(_Adding(words, None, already_served=True)), "/v1/load_lora_adapter", body)
    assert status == 200 and answer.decode().endswith(" Note: it already served these files; nothing was loaded "
                                                      "again."), answer
    # The stored Hessians of the adapter it replaced leave the aggregate: said too (HTTP callers were never told).
    status, answer = _post(_app(_Adding(words, kept, hessians_dropped=True)), "/v1/load_lora_adapter", body)
    assert status == 200 and "(the state directory keeps it). Note: the Hessians stored for this name were " \
        "computed with the adapter it replaces" in answer.decode(), answer


# ---------------------------------------------------------------- OpenAI's sampling ranges


@pytest.mark.parametrize("path, base", [("/v1/completions", {"model": BASE, "prompt": "x"}),
                                        ("/v1/chat/completions", _CHAT)])
@pytest.mark.parametrize("param, value", [("temperature", 2.5), ("temperature", -1), ("top_p", 1.5),
                                          ("top_p", -0.1)])
def test_openais_ranges_of_temperature_and_top_p_are_refused_naming_the_param(path, base, param, value):
    client = _StandInClient()
    status, answer = _post(_app(client), path, json.dumps({**base, param: value}).encode())
    error = json.loads(answer)["error"]
    assert (status, error["type"], error["code"], error["param"]) == (400, "invalid_request_error", "invalid_request",
                                                                      param), answer
    assert error["message"].startswith(f"{param} must be between 0 and "), error
    assert not client.generated  # refused by the front: the server never ran it with another meaning


@pytest.mark.parametrize("param, value", [("temperature", 2), ("temperature", 0), ("top_p", 1), ("top_p", 0.5)])
def test_the_bounds_of_openais_ranges_are_served(param, value):
    client = _StandInClient()
    status, answer = _post(_app(client), "/v1/completions", json.dumps({"model": BASE, "prompt": "x",
                                                                        param: value}).encode())
    assert status == 200 and client.generated[-1][param] == value, answer


def test_a_bearer_token_longer_than_any_admin_token_is_a_401():
    """It travelled inside the call's frame: a 20 KB token got 413 "send a shorter prompt"."""
    client = _Adding("task 'zz' added", None)
    for path, body in (("/v1/unload_lora_adapter", b'{"lora_name": "zz"}'),
                       ("/v1/load_lora_adapter", b'{"lora_name": "zz", "lora_path": "/a/zz"}')):
        status, answer = _post(_app(client), path, body, headers=((b"authorization", b"Bearer " + b"x" * 20_000),))
        error = json.loads(answer)["error"]
        assert (status, error["type"], error["code"]) == (401, "authentication_error", "unauthorized"), answer
        assert error["message"] == "the Bearer token has 20000 characters; an admin token has at most 1024"


def test_a_lora_name_longer_than_any_task_name_is_refused_by_name():
    """A 20 KB lora_name got the frame's 413 "send a shorter prompt" with no param."""
    client = _Adding("task 'zz' added", None)
    for path, body in (("/v1/unload_lora_adapter", {"lora_name": "x" * 20_000}),
                       ("/v1/load_lora_adapter", {"lora_name": "x" * 129, "lora_path": "/a/zz"})):
        status, answer = _post(_app(client), path, json.dumps(body).encode())
        error = json.loads(answer)["error"]
        assert (status, error["param"]) == (400, "lora_name"), answer
        assert "length <= 128" in error["message"], answer


_INBOX_429 = ("more than 1024 messages (or 67108864 bytes) from this connection wait to be handled: this one is "
              "dropped; send fewer at once")


@pytest.mark.parametrize("words", [_INBOX_429, _REWORDED])
def test_a_429_of_the_servers_inbox_speaks_of_the_front_not_of_this_connection(words):
    """The coordinator's inbox bound (`queued_messages`): its "this connection ... send fewer at
    once" is the front's connection, every HTTP client's; the caller may have sent one request,
    and a request of several prompts was told of in-flight counts that do not apply (an outside
    probe)."""
    refusal = _server_error(ErrorCode.OVERLOADED, words, queued_messages=1024)
    status, error = _error_of(_RefusedOnce(refusal), "/v1/completions", {"model": BASE, "prompt": "x"})
    assert (status, error["code"]) == (429, "overloaded"), error
    assert error["message"] == ("the server's queue of messages from this HTTP front (every client's requests) is "
                                "full (1024 waiting): this request was not taken; retry later"), error
    status, error = _error_of(_RefusedOnce(refusal), "/v1/completions", {"model": BASE, "prompt": ["x", "y"]})
    assert status == 429 and error["message"].startswith("prompt[0]: the server's queue of messages"), error
    assert "admission slot" not in error["message"] and "send fewer" not in error["message"]
