"""The front's parts without a server: the `[http]`/`[metrics]` config sections, OpenAI
requests -> SDK arguments (OpenAI's defaults, what is refused and why), error bodies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import msgspec
import pytest

from inlaid.client import ContextLengthError, OverloadedError, RequestTimeoutError, UnknownTaskError
from inlaid.http.errors import ApiError, from_decode_error, from_inlaid
from inlaid.http.front_metrics import route_label
from inlaid.http.schema import ChatCompletionRequest, CompletionRequest
from inlaid.http.settings import DEFAULT_MAX_BODY_BYTES, HttpConfig
from inlaid.http.translate import chat_call, completion_call
from inlaid.protocol import ChatMessage
from inlaid.serve.config import ConfigError, config_from_dict

BASE = "SmolLM2-135M-Instruct"


def _config(model_dir, **sections):
    return config_from_dict({"model": {"dir": str(model_dir)}, **sections})


def test_the_front_under_inlaid_serve_gets_every_setting_it_uses():
    """`inlaid serve` starts its front with a command line: read back by the front's own
    argument parser, it gives the server's [http] settings, each one (client_send_timeout_s
    was left off: the front ran at its 30-s default whatever the config said)."""
    import argparse
    import dataclasses

    from inlaid.http.cli import add_arguments, settings_from_args
    from inlaid.http.process import HttpFrontProcess

    config = HttpConfig(port=8123, request_timeout_s=12.5, max_body_bytes=54321, client_send_timeout_s=2.5,
                        max_prompts_per_request=5, front_liveness_s=9.0)
    assert all(getattr(config, f.name) != f.default for f in dataclasses.fields(HttpConfig) if f.name != "host")
    command = HttpFrontProcess("tcp://127.0.0.1:5599", config, "INFO", "json").command(fd=7)
    assert command[1:3] == ["-m", "inlaid.http"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    address, read_back = settings_from_args(parser.parse_args(command[3:]))
    assert address == "tcp://127.0.0.1:5599"
    # front_liveness_s is the supervisor's own (how long it waits for the front's answers)
    assert dataclasses.replace(read_back, front_liveness_s=config.front_liveness_s) == config


def test_http_and_metrics_sections(model_dir):
    assert _config(model_dir).http is None and _config(model_dir).metrics is None
    config = _config(model_dir, http={}, metrics={"port": 9464})
    # The defaults, resolved against the server's limits (pending requests, frame size).
    assert config.http == HttpConfig(max_prompts_per_request=16, max_body_bytes=DEFAULT_MAX_BODY_BYTES)
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9464)
    # A server admitting fewer requests than the default list length: the default shrinks to
    # what it admits from the front's one connection, 7 of 8 (the last tenth is kept for other
    # clients; configs written before the setting keep loading); an explicit larger value is refused.
    small = _config(model_dir, http={}, server={"max_pending_requests": 8})
    assert small.http.max_prompts_per_request == 7 and HttpConfig().prompts_per_request_limit == 16
    config = _config(model_dir, http={"port": 8080, "request_timeout_s": 30, "max_body_bytes": 4096})
    assert (config.http.port, config.http.request_timeout_s, config.http.max_body_bytes) == (8080, 30, 4096)
    public = _config(model_dir, http={"host": "0.0.0.0"}, server={"allow_public_bind": True})
    assert public.http.host == "0.0.0.0"
    bad = [
        ({"http": {"port": 0}}, "http.port"),
        ({"http": {"port": "8000"}}, "http.port"),
        ({"http": {"host": "0.0.0.0"}}, "not a loopback address"),
        ({"http": {"request_timeout_s": 0}}, "request_timeout_s"),
        ({"http": {"max_body_bytes": 10}}, "max_body_bytes"),
        ({"http": {"max_prompts_per_request": 0}}, "max_prompts_per_request"),
        ({"http": {"max_prompts_per_request": 8}, "server": {"max_pending_requests": 8}}, "could never be admitted"),
        ({"http": {"prot": 8000}}, "unknown keys"),
        ({"metrics": {}}, "needs a port"),
        ({"metrics": {"port": 8000}, "http": {"port": 8000}}, r"metrics.port and http.port cannot share port 8000: "
                                                              r"the server listens on both \(the front serves"),
        # server.address's own port: "cannot listen on server.address ...: Address already in use" at start
        ({"server": {"address": "tcp://127.0.0.1:8001"}, "http": {"port": 8001}},
         "http.port and server.address cannot share port 8001"),
        ({"server": {"address": "tcp://127.0.0.1:8001", "allow_public_bind": True},
          "metrics": {"port": 8001, "host": "0.0.0.0"}},  # every host: 127.0.0.1's port too
         "metrics.port and server.address cannot share port 8001"),
        ({"server": {"executor_address": "tcp://127.0.0.1:8002"}, "http": {"port": 8002}},
         "http.port and server.executor_address cannot share port 8002"),
        ({"server": {"address": "tcp://localhost:8003"}, "http": {"port": 8003}},
         "http.port and server.address cannot share port 8003"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
        ({"tasks": {"__base__": str(model_dir)}}, "reserved"),
    ]
    for sections, message in bad:
        with pytest.raises(ConfigError, match=message):
            _config(model_dir, **sections)


def _completion(**fields) -> CompletionRequest:
    return msgspec.json.decode(json.dumps({"model": "qa", "prompt": "Hi", **fields}), type=CompletionRequest)


def _chat(**fields) -> ChatCompletionRequest:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


def test_openai_defaults_and_sampling_options():
    call = completion_call(_completion(), BASE)
    assert call.task == "qa" and call.prompts == [{"prompt": "Hi"}] and not call.stream
    # OpenAI's defaults: 16 tokens for completions, temperature 1, top_p 1.
    assert call.options == {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": [],
                            "stop_token_ids": [], "ignore_eos": False}
    call = completion_call(_completion(max_tokens=5, temperature=0, top_p=0.5, seed=3, stop="\n", top_k=4,
                                       ignore_eos=True, stop_token_ids=[2], stream=True,
                                       stream_options={"include_usage": True}), BASE)
    assert call.options == {"max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 4, "seed": 3, "stop": ["\n"],
                            "stop_token_ids": [2], "ignore_eos": True}
    assert call.stream and call.include_usage
    # Chat: the base model's id means no task; no limit means "until the context is full".
    chat = chat_call(_chat(), BASE)
    assert chat.task is None and chat.options["max_tokens"] is None
    assert chat_call(_chat(max_tokens=9), BASE).options["max_tokens"] == 9
    assert chat_call(_chat(max_tokens=9, max_completion_tokens=4), BASE).options["max_tokens"] == 4
    assert completion_call(_completion(max_tokens=0), BASE).options["max_tokens"] == 0  # the server refuses it
    assert completion_call(_completion(top_k=-1), BASE).options["top_k"] == 0  # vLLM's "off"


def test_prompt_forms_and_chat_messages():
    assert completion_call(_completion(prompt=[1, 2, 3]), BASE).prompts == [{"prompt_token_ids": [1, 2, 3]}]
    assert completion_call(_completion(prompt=["a", "b"]), BASE).prompts == [{"prompt": "a"}, {"prompt": "b"}]
    assert completion_call(_completion(prompt=[[1], [2, 3]]), BASE).prompts == [
        {"prompt_token_ids": [1]}, {"prompt_token_ids": [2, 3]}]
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None},
                {"role": "user", "content": "c", "name": "ann"}]
    call = chat_call(_chat(messages=messages), BASE)
    assert call.prompts == [{"messages": [ChatMessage("system", "Be brief."), ChatMessage("user", "a\nb"),
                                          ChatMessage("assistant", "ok"), ChatMessage("user", "c")]}]


REFUSED = [
    (lambda: completion_call(_completion(n=2), BASE), "n"),
    (lambda: completion_call(_completion(best_of=2), BASE), "best_of"),
    (lambda: completion_call(_completion(echo=True), BASE), "echo"),
    (lambda: completion_call(_completion(suffix="x"), BASE), "suffix"),
    (lambda: completion_call(_completion(logprobs=1), BASE), "logprobs"),
    (lambda: completion_call(_completion(frequency_penalty=1), BASE), "frequency_penalty"),
    (lambda: completion_call(_completion(logit_bias={"1": 2}), BASE), "logit_bias"),
    (lambda: completion_call(_completion(prompt=[]), BASE), "prompt"),
    (lambda: completion_call(_completion(prompt=["a", 1]), BASE), "prompt"),
    (lambda: completion_call(_completion(stream_options={"include_usage": True}), BASE), "stream_options"),
    (lambda: chat_call(_chat(messages=[]), BASE), "messages"),
    (lambda: chat_call(_chat(messages=[{"role": "tool", "content": "x"}]), BASE), "messages[0].role"),
    (lambda: chat_call(_chat(messages=[{"role": "assistant", "tool_calls": [{"id": "1"}]}]), BASE), "messages[0]"),
    (lambda: chat_call(_chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), BASE),
     "messages[0].content"),
    (lambda: chat_call(_chat(tools=[{"type": "function"}]), BASE), "tools"),
    (lambda: chat_call(_chat(tool_choice="auto"), BASE), "tool_choice"),
    (lambda: chat_call(_chat(response_format={"type": "json_object"}), BASE), "response_format"),
    (lambda: chat_call(_chat(top_logprobs=2), BASE), "top_logprobs"),
    (lambda: chat_call(_chat(modalities=["text", "audio"]), BASE), "modalities"),
    (lambda: chat_call(_chat(audio={"voice": "alloy", "format": "wav"}), BASE), "audio"),
    (lambda: chat_call(_chat(reasoning_effort="low"), BASE), "reasoning_effort"),
    (lambda: chat_call(_chat(prediction={"type": "content", "content": "x"}), BASE), "prediction"),
    (lambda: chat_call(_chat(web_search_options={}), BASE), "web_search_options"),
    (lambda: completion_call(_completion(prompt=["a"] * 17), BASE), "prompt"),  # the default cap: 16
    (lambda: completion_call(_completion(prompt=[[1]] * 3), BASE, max_prompts=2), "prompt"),
]


def test_what_inlaid_cannot_do_is_refused_by_name():
    for call, param in REFUSED:
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 400 and caught.value.param == param
    # Neutral values of those options are accepted.
    completion_call(_completion(n=1, best_of=1, echo=False, presence_penalty=0, logit_bias={}), BASE)
    chat_call(_chat(tool_choice="none", response_format={"type": "text"}, logprobs=False), BASE)
    # OpenAI's bookkeeping arguments (stored completions, billing tier) are accepted and not used.
    call = chat_call(_chat(store=False, metadata={"run": "7"}, service_tier="auto", modalities=["text"]), BASE)
    assert call.options == chat_call(_chat(), BASE).options
    assert len(completion_call(_completion(prompt=["a"] * 16), BASE).prompts) == 16
    with pytest.raises(ApiError, match="^the prompt is empty$"):  # as the server says it for "" and [[]]
        completion_call(_completion(prompt=[]), BASE)
    assert len(completion_call(_completion(prompt=[[1]] * 3), BASE, max_prompts=3).prompts) == 3


def test_integers_beyond_64_bits_are_refused_by_field():
    """msgpack, which carries requests to the coordinator, holds 64-bit integers; a larger
    one is the caller's error, named like any other bad value (it was a 500 before)."""
    for body, field in [({"max_tokens": 2**64}, "max_tokens"), ({"seed": -(2**63) - 1}, "seed"),
                        ({"prompt": [1, 2**64]}, "prompt[1]"), ({"prompt": [[1], [2, 2**63]]}, "prompt[1][1]"),
                        ({"stop_token_ids": [2**70]}, "stop_token_ids[0]"), ({"top_k": 2**63}, "top_k")]:
        raw = json.dumps({"model": "m", "prompt": "x", **body}).encode()
        with pytest.raises(msgspec.ValidationError) as caught:
            msgspec.json.decode(raw, type=CompletionRequest)
        error = from_decode_error(caught.value)
        assert error.status == 400 and error.param == field, (body, error.param)
    limits = {"max_tokens": 2**63 - 1, "seed": -(2**63), "prompt": [2**63 - 1]}
    assert msgspec.json.decode(json.dumps({"model": "m", **limits}), type=CompletionRequest).max_tokens == 2**63 - 1


def test_error_bodies():
    def body(error: ApiError) -> dict:
        return json.loads(error.body())["error"]

    for raw, message, param in [(b'{"model": "m", "prompt": "x", "bogus": 1}', "Unrecognized request argument "
                                 "supplied: bogus", "bogus"),
                                (b'{"model": "m", "prompt": "x", "max_tokens": "x"}', "Expected", "max_tokens"),
                                (b'{"prompt": "x"}', "missing required field `model`", "model"),
                                (b'{"model": "m", "prompt": "x", "stream_options": {"x": 1}}', "argument supplied: "
                                 "stream_options.x", "stream_options.x"),
                                (b"{oops", "not valid JSON", None)]:
        with pytest.raises(msgspec.MsgspecError) as caught:
            msgspec.json.decode(raw, type=CompletionRequest)
        error = from_decode_error(caught.value)
        assert error.status == 400 and message in error.message and error.param == param, raw
    unknown = from_inlaid(UnknownTaskError("[unknown_task] unknown task 'x'", "r1"), model="x")
    assert (unknown.status, body(unknown)["code"], body(unknown)["param"]) == (404, "model_not_found", "model")
    assert "The model `x` does not exist" in unknown.message and "[unknown_task]" not in unknown.message
    busy = from_inlaid(OverloadedError("[overloaded] full", "r1"))
    assert (busy.status, body(busy)["type"], busy.headers()) == (429, "rate_limit_error", {"Retry-After": "1"})
    assert from_inlaid(ContextLengthError("[context_length] long", "r")).code == "context_length_exceeded"
    assert from_inlaid(RequestTimeoutError("no answer")).status == 504


def test_the_front_imports_no_torch_and_no_engine():
    check = ("import sys, inlaid.http.app, inlaid.http.cli, inlaid.http.process; "
             "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'inlaid.engine') if m in sys.modules]; "
             "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", check], check=True)


def test_a_port_in_use_fails_the_start_with_its_reason(model_dir, tmp_path):
    from inlaid.serve.launcher import ServerProcess

    for section in ("http", "metrics"):
        (tmp_path / section).mkdir()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = ServerProcess({"model": {"dir": str(model_dir)}, "server": {"log_format": "text"},
                                    section: {"port": port}}, workdir=tmp_path / section)
            assert server.process.wait(120) == 2
            assert "cannot listen" in server.logs() and "Address already in use" in server.logs()
            # one line besides the log's record (there was only the record)
            said = f"inlaid serve: cannot listen on [{section}] 127.0.0.1:{port}: Address already in use"
            assert said in server.logs()
            server.terminate()


def test_route_labels_are_bounded():
    assert route_label("/v1/completions") == "/v1/completions"
    assert route_label("/v1/models/some-task") == "/v1/models/{model}"
    assert {route_label(f"/random/{i}") for i in range(100)} == {"other"}


def test_routes_under_a_mount_prefix_keep_their_labels():
    """Behind Ray Serve's route_prefix the ASGI path carries the prefix (root_path): every
    request was counted route="other" (an outside probe of the Ray ingress)."""
    import asyncio

    from inlaid.http.front_metrics import HttpMetrics

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message) -> None:  # type: ignore[no-untyped-def]
        pass

    metrics = HttpMetrics(app)
    for path in ("/inlaid/v1/chat/completions", "/inlaid/v1/models/qa", "/inlaid/health", "/inlaid/elsewhere"):
        asyncio.run(metrics({"type": "http", "path": path, "root_path": "/inlaid"}, ignore, ignore))
    counted = metrics.exposition()
    for route in ("/v1/chat/completions", "/v1/models/{model}", "/health", "other"):
        assert f'inlaid_http_requests_total{{route="{route}",status="200"}} 1.0' in counted, counted
    assert route_label("/inlaid", "/inlaid") == "other" and route_label("/v1/models", "/inlaid") == "/v1/models"


def test_a_body_that_is_not_utf8_is_a_bad_request():
    """msgspec raises UnicodeDecodeError, not one of its own errors, for such bytes: it was
    a 500 "internal error in the HTTP front"."""
    import asyncio

    from starlette.requests import Request

    from inlaid.http.app import Front
    from inlaid.http.bodies import read_json

    async def read(body: bytes):
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        return await read_json(Request(scope, receive), CompletionRequest, Front("tcp://127.0.0.1:9", HttpConfig()))

    with pytest.raises(ApiError) as caught:
        asyncio.run(read(b'{"model": "m", "prompt": "\xff\xfe"}'))
    assert caught.value.status == 400 and "not UTF-8" in caught.value.message
    assert asyncio.run(read('{"model": "m", "prompt": "é"}'.encode())).prompt == "é"


def test_reachability_tells_a_refused_address_from_a_listening_one(tmp_path):
    """What the front asks before waiting for a hello: refused (no listener, no socket file,
    a stale socket file of a dead server) is proven unreachable; a listener, or an address
    the check cannot read, proves nothing."""
    import asyncio

    from inlaid.http.reachability import refuses_connections

    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        stale = tmp_path / "stale.ipc"
        with socket.socket(socket.AF_UNIX) as unix:
            unix.bind(str(stale))  # the file stays after close, as a SIGKILLed server's does
        answers = asyncio.run(_reachability(refuses_connections, [
            f"tcp://127.0.0.1:{listening.getsockname()[1]}", f"tcp://127.0.0.1:{closed.getsockname()[1]}",
            f"tcp://localhost:{closed.getsockname()[1]}", f"ipc://{stale}", f"ipc://{tmp_path / 'missing.ipc'}",
            "ray-serve", "tcp://127.0.0.1:notaport"]))
    assert answers == [False, True, True, True, True, False, False]


async def _reachability(check, addresses):  # noqa: ANN001, ANN202
    return [await check(address) for address in addresses]


def test_the_fronts_admission_share_is_what_the_server_admits_from_one_connection():
    """`front_admission_share` (the default prompt limit's bound) against the coordinator's own
    admission rule, `InFlight._overloaded`, for a lone connection on an otherwise idle server."""
    from collections import defaultdict
    from types import SimpleNamespace

    from inlaid.http.settings import front_admission_share
    from inlaid.serve.in_flight import InFlight

    for limit in (1, 2, 3, 7, 8, 9, 10, 11, 16, 20, 64, 1000):
        state = SimpleNamespace(limits=SimpleNamespace(max_pending_requests=limit), requests=[],
                                per_client=defaultdict(int))
        while InFlight._overloaded(state, b"front") is None:  # admit until refused
            state.requests.append(object())
            state.per_client[b"front"] += 1
        assert len(state.requests) == front_admission_share(limit), limit


def test_reachability_of_an_abstract_ipc_address_under_uvloop():
    """The front runs on uvloop, whose open_unix_connection refuses abstract names (`@name`)
    with EINVAL: the check must still tell a listener from nobody."""
    uvloop = pytest.importorskip("uvloop")  # the `serve` extra

    from inlaid.http.reachability import refuses_connections

    name = f"inlaid-reachability-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("\0" + name)
        listener.listen()
        assert uvloop.run(refuses_connections(f"ipc://@{name}")) is False
    assert uvloop.run(refuses_connections(f"ipc://@{name}")) is True


def test_the_front_alone_listens_on_every_address_its_host_resolves_to():
    """`inlaid http --host localhost` binds as uvicorn did before it bound its own socket:
    each address the name resolves to (127.0.0.1, and ::1 where the machine has it); a port
    in use fails the start (OSError, exit 2 in the CLI)."""
    from inlaid.http.process import listening_sockets

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolved = {info[4][0] for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
    sockets = listening_sockets("localhost", port)
    try:
        bound = {sock.getsockname()[0] for sock in sockets}
        # Every IPv4 address; ::1 too unless the machine has IPv6 off (then skipped, not fatal).
        assert {address for address in resolved if ":" not in address} <= bound <= resolved
        assert {sock.getsockname()[1] for sock in sockets} == {port}
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port)
    finally:
        for sock in sockets:
            sock.close()
