"""The SDK's request arguments, from an outside probe: every bad one is an InvalidRequestError
naming it, before anything is sent, never a bare TypeError / KeyError / UnicodeEncodeError,
and never a silently different request.

* a str `stop` is one stop string (it was split into characters: "zs" stopped at the 's');
  None is none; a lone int for `stop_token_ids` is refused by name;
* chat messages follow the HTTP front's rule, which both now call (`chat_messages`): the
  same messages are accepted (as the same protocol messages) and refused (naming the same
  parameter);
* lone surrogates in texts and NaN timeouts are refused by name;
* `sampling=SamplingParams(...)` with sampling keywords beside it is refused (it won silently),
  and the struct's own stop / stop_token_ids get the keywords' checks.

Everything but the last test runs without a server: the checks live in `build_generate`,
which both clients share, and the clients refuse before they send. The last test runs the
real server once: a str stop gives the in-process engine's answer with that stop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import msgspec
import pytest

from inlaid.cli import main
from inlaid.client import AsyncClient, Client, InvalidRequestError
from inlaid.client.messages import _KEYWORD_DEFAULTS, build_generate
from inlaid.http.errors import ApiError, from_decode_error
from inlaid.http.schema import ChatCompletionRequest
from inlaid.http.translate import chat_call
from inlaid.protocol import ChatMessage, Generate, SamplingParams

NOBODY = "tcp://127.0.0.1:9"  # nothing listens: a request that got as far as sending would time out
DEFAULTS: dict[str, Any] = dict(prompt=None, task=None, messages=None, prompt_token_ids=None, sampling=None,
                                max_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=(),
                                stop_token_ids=(), ignore_eos=False, stream=False, deadline_s=None)


def _build(**arguments: Any) -> Generate:
    return build_generate("req-1", **{**DEFAULTS, "prompt": "Hi", **arguments})


def _refused(param: str, **arguments: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        _build(**arguments)
    assert caught.value.param == param and param in caught.value.message, caught.value
    assert caught.value.request_id == "req-1"
    return caught.value


def test_stop_and_stop_token_ids_forms():
    assert _build(stop="zs").sampling.stop == ["zs"]  # OpenAI's meaning; it was ["z", "s"]
    assert _build(stop=["zs", "\n"]).sampling.stop == ["zs", "\n"]
    assert _build(stop=("a" for _ in range(2))).sampling.stop == ["a", "a"]
    assert _build(stop=None).sampling.stop == [] and _build(stop_token_ids=None).sampling.stop_token_ids == []
    assert _build(stop_token_ids=(7, 8)).sampling.stop_token_ids == [7, 8]
    for stop in (7, b"zs", {"a": 1}, ["a", 3], [None]):
        _refused("stop", stop=stop)
    for ids in (7, "7", [1, "2"], [True], [1.0]):
        _refused("stop_token_ids", stop_token_ids=ids)
    _refused("prompt_token_ids", prompt=None, prompt_token_ids=7)
    assert _build(prompt=None, prompt_token_ids=(1, 2)).prompt_token_ids == [1, 2]


def _signature_defaults() -> dict[str, dict[str, Any]]:
    return {f"{cls.__name__}.{name}": {p: inspect.signature(getattr(cls, name)).parameters[p].default
                                       for p in _KEYWORD_DEFAULTS}
            for cls in (Client, AsyncClient) for name in ("generate", "stream")}


def test_sampling_struct_or_keywords_not_both():
    """`sampling=SamplingParams(...)` used to win silently over keywords passed beside it, and
    its own stop / stop_token_ids skipped the checks the keywords get."""
    keywords_at_default = {**DEFAULTS, "max_tokens": 64}
    struct = SamplingParams(max_tokens=9, temperature=0.5, stop="zs")  # type: ignore[arg-type]
    sent = build_generate("req-1", **{**keywords_at_default, "prompt": "Hi", "sampling": struct})
    assert sent.sampling.max_tokens == 9 and sent.sampling.temperature == 0.5
    assert sent.sampling.stop == ["zs"]  # one stop string, as the keyword form reads it
    for name, value in (("max_tokens", 8), ("temperature", 0.7), ("top_k", 5), ("top_p", 0.9), ("seed", 1),
                        ("stop", "x"), ("stop", ["x"]), ("stop_token_ids", [3]), ("ignore_eos", True)):
        with pytest.raises(InvalidRequestError) as caught:
            build_generate("req-1", **{**keywords_at_default, "prompt": "Hi", "sampling": struct, name: value})
        assert caught.value.param == "sampling" and f"{name}=" in caught.value.message, caught.value
    # The keyword defaults' empty forms are no conflict: None, [] and () all mean "no stops".
    for empty in (None, [], ()):
        build_generate("req-1", **{**keywords_at_default, "prompt": "Hi", "sampling": struct, "stop": empty,
                                   "stop_token_ids": empty})
    with pytest.raises(InvalidRequestError) as caught:
        build_generate("req-1", **{**keywords_at_default, "prompt": "Hi", "sampling": {"max_tokens": 9}})
    assert caught.value.param == "sampling" and "dict" in caught.value.message
    _refused("stop_token_ids", max_tokens=64, sampling=SamplingParams(stop_token_ids=[1, "2"]))  # type: ignore[list-item]
    _refused("stop[0]", max_tokens=64, sampling=SamplingParams(stop=["\ud800"]))
    # The conflict check compares with the clients' own defaults: they must not drift apart.
    for where, defaults in _signature_defaults().items():
        assert {p: [] if d == () else d for p, d in defaults.items()} == _KEYWORD_DEFAULTS, where


def test_lone_surrogates_are_refused_by_name():
    _refused("prompt", prompt="\ud800")
    _refused("stop[1]", stop=["ok", "a\udcff"])
    _refused("stop[0]", stop="\ud800")
    _refused("task", task="\ud800")
    _refused("messages[0].content", prompt=None, messages=[{"role": "user", "content": "x\ud800"}])
    _refused("prompt", prompt=5)  # not a str at all
    # The message shows the character escaped, so printing it (the CLI does) cannot fail too.
    assert "'\\ud800'" in _refused("prompt", prompt="\ud800").message


# Chat messages as OpenAI's API writes them: each is sent over HTTP and through the SDK.
CHATS: list[list[Any]] = [
    [{"role": "user", "content": "Say hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "Say hi"}, {"type": "text", "text": "now"}]}],
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}],
    [{"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": None}],
    [{"role": "user"}],
    [{"content": "Hi"}],
    [{"role": "wizard", "content": "Hi"}],
    [{"role": "tool", "content": "Hi", "tool_call_id": "1"}],
    [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "x", "foo": 1}]}],
    [{"role": "user", "content": ["Say hi"]}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": "Hi", "bogus": 1}],
    [{"role": "user", "content": "Hi", "name": 3}],
    [{"role": 1, "content": "Hi"}],
    ["Hi"],
    [],
]


def _over_http(messages: list[Any]) -> list[ChatMessage] | str | None:
    """The front's messages, or the param its 400 names."""
    body = json.dumps({"model": "m", "messages": messages}).encode()
    try:
        return chat_call(msgspec.json.decode(body, type=ChatCompletionRequest), "m").prompts[0]["messages"]
    except msgspec.MsgspecError as error:
        return from_decode_error(error).param
    except ApiError as error:
        assert error.status == 400
        return error.param


def _over_sdk(messages: list[Any]) -> list[ChatMessage] | str | None:
    try:
        return _build(prompt=None, messages=messages).messages
    except InvalidRequestError as error:
        return error.param


def test_chat_messages_accepted_and_refused_as_over_http():
    # Each: the same protocol messages, or a refusal naming the same parameter.
    differ = [(m, _over_http(m), _over_sdk(m)) for m in CHATS if _over_http(m) != _over_sdk(m)]
    assert not differ, "\n".join(f"{m}: HTTP {h!r}, SDK {s!r}" for m, h, s in differ)
    for messages in CHATS:  # what the front sends on (ChatMessage lists) takes the same road unchanged
        if isinstance(accepted := _over_sdk(messages), list):
            assert _build(prompt=None, messages=accepted).messages == accepted


def test_chat_messages_beyond_json():
    """What only Python can pass: the protocol's ChatMessage (whose constructor checks no
    types), a single dict instead of a list, a string instead of a list."""
    assert _build(prompt=None, messages=[ChatMessage("user", "Hi")]).messages == [ChatMessage("user", "Hi")]
    _refused("messages[0].role", prompt=None, messages=[ChatMessage("wizard", "Hi")])
    _refused("messages[0].content", prompt=None, messages=[ChatMessage("user", None)])  # type: ignore[arg-type]
    _refused("messages", prompt=None, messages={"role": "user", "content": "Hi"})
    _refused("messages", prompt=None, messages="Hi")


def test_clients_refuse_before_sending():
    """Both clients, through every entry point that takes the argument: the typed error comes
    at once (a request that was sent would wait for its timeout here: nobody listens)."""
    bad_calls: list[tuple[dict[str, Any], str]] = [
        (dict(prompt="Hi", stop_token_ids=7), "stop_token_ids"),
        (dict(prompt="\ud800"), "prompt"),
        (dict(messages=[{"role": "user"}]), "messages[0].content"),
        (dict(prompt="Hi", timeout_s=float("nan")), "timeout_s"),
        (dict(prompt="Hi", timeout_s=0), "timeout_s"),  # it meant "the client's default"
    ]
    with Client(NOBODY, timeout_s=30) as client:
        for arguments, param in bad_calls:
            for call in (client.generate, client.stream):
                with pytest.raises(InvalidRequestError) as caught:
                    call(**arguments)
                assert caught.value.param == param, (call, arguments)
        for call in (client.health, client.stats, client.handshake):
            with pytest.raises(InvalidRequestError, match="timeout_s"):
                call(timeout_s=float("nan"))
        with pytest.raises(InvalidRequestError, match="timeout_s"):
            client.wait_ready(timeout_s=float("nan"))  # looped for ever: every comparison with NaN is false
        with pytest.raises(InvalidRequestError, match="poll_s"):
            client.wait_task("t", poll_s=float("nan"))
        # Any other message: what msgpack cannot carry is refused as a whole (no field to name).
        with pytest.raises(InvalidRequestError, match="not valid text"):
            client.add_task("\ud800", "/adapters/x")
        with pytest.raises(InvalidRequestError, match="^seed must be an integer or None, got <object") as caught:
            client.generate("Hi", seed=object())  # type: ignore[arg-type]  (was "cannot be sent": no name)
        assert caught.value.param == "seed"

    async def async_calls() -> None:
        async with AsyncClient(NOBODY, timeout_s=30) as client:
            for arguments, param in bad_calls:
                for call in (client.generate, client.stream):
                    with pytest.raises(InvalidRequestError) as caught:
                        await call(**arguments)
                    assert caught.value.param == param, (call, arguments)
            with pytest.raises(InvalidRequestError, match="timeout_s"):
                await client.health(timeout_s=float("inf"))

    asyncio.run(asyncio.wait_for(async_calls(), 20))
    for client_class in (Client, AsyncClient):
        for timeout in (float("nan"), float("inf"), -1, 0, "5", True):
            with pytest.raises(InvalidRequestError, match="timeout_s"):
                client_class(NOBODY, timeout_s=timeout)
        # Ports no server listens on (ZeroMQ wraps 99999, refuses 0): they waited the whole timeout.
        for address in ("tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "tcp://127.0.0.1:²"):
            with pytest.raises(ValueError, match=r"must be tcp://HOST:PORT with a port in 1-65535"):
                client_class(address)
        with pytest.raises(ValueError, match="IPv6 addresses are not supported"):
            client_class("tcp://[::1]:5555")
        # A server's listening wildcard: ZeroMQ's raw "Invalid argument" (ZMQError, not ValueError)
        with pytest.raises(ValueError, match=r"tcp://\*:PORT is how a server listens on every interface"):
            client_class("tcp://*:5555")


def test_cli_refuses_a_nan_timeout(capsys: pytest.CaptureFixture) -> None:
    for value in ("nan", "inf"):
        assert main(["client", "--address", NOBODY, "--timeout", value, "health"]) == 2
        err = capsys.readouterr().err
        assert "--timeout must be > 0" in err and "ValueError" not in err, err
    assert main(["client", "--address", NOBODY, "add-task", "t", ".", "--wait-timeout", "nan"]) == 2
    assert "--wait-timeout must be > 0" in capsys.readouterr().err


# ------------------------------------------------------------------ against a real server

PROMPT, MAX_TOKENS, STOP = "The capital of France is", 4, "zs"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    from inlaid.serve.launcher import ServerProcess
    from serving_helpers import server_config

    process = ServerProcess(server_config(model_dir, {}), workdir=tmp_path_factory.mktemp("server"))
    yield process
    process.terminate()


def test_a_string_stop_is_one_stop_string_end_to_end(server, model_dir):
    from inlaid.engine import Engine, EngineConfig, SamplingParams
    from serving_helpers import engine_settings

    engine = Engine.local(EngineConfig(**engine_settings(model_dir)))  # loads while the server starts

    def engine_text(stop: list[str]) -> str:
        (output,) = engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, stop=stop))
        return output.text

    expected = engine_text([STOP])
    # The greedy answer holds one of the characters (what the old SDK stopped at) but not the string.
    assert expected != engine_text(list(STOP)), "the prompt no longer tells the two readings apart"
    server.wait_ready(timeout_s=300)
    with server.client(timeout_s=120) as client:
        as_str = client.generate(PROMPT, max_tokens=MAX_TOKENS, stop=STOP)
        as_list = client.generate(PROMPT, max_tokens=MAX_TOKENS, stop=[STOP])
        streamed = client.stream(PROMPT, max_tokens=MAX_TOKENS, stop=STOP)
        streamed_text = "".join(chunk.text for chunk in streamed)

    async def async_generate() -> str:
        async with AsyncClient(server.address, timeout_s=120) as client:
            return (await client.generate(PROMPT, max_tokens=MAX_TOKENS, stop=STOP)).text

    assert as_str.text == as_list.text == streamed_text == asyncio.run(async_generate()) == expected
    assert as_str.finish_reason == as_list.finish_reason == "length"
