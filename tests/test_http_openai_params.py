"""Every parameter the official `openai` client can send to /v1/chat/completions and
/v1/completions is read by the front: used, accepted and not used (it cannot change the
answer), or refused as not supported, naming it. None is answered 400 "Unrecognized request
argument supplied", which docs/http.md keeps for arguments OpenAI does not define (an outside
probe found `prompt_cache_key`, `safety_identifier`, `verbosity` and
`stream_options.include_obfuscation` refused so).

The parameters come from the installed client's signatures, so a newer client's are covered:
one no table below knows is sent as null, which the front calls unrecognized unless
`inlaid/http/schema.py` declares it. Driven through the official client over the ASGI app,
with a stand-in SDK client (no server, no model): fast.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from test_http_probe_fixes import BASE, _app
from test_http_probe_fixes2 import _Client, _Stream

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")  # the transport the installed openai client is built on

# Not request-body parameters: the client's own transport options, or the request's core.
_NOT_BODY = {"self", "extra_headers", "extra_query", "extra_body", "timeout", "messages", "model", "prompt"}


class _Recording(_Client):
    """The stand-in, recording what the front asks of the SDK on both paths (whole and stream)."""

    async def stream(self, **kwargs: Any) -> _Stream:
        self.generated.append(kwargs)
        return await super().stream(**kwargs)


# Values a client sends that cannot change the answer: accepted, and the SDK call is the one
# the request without them makes.
CHAT_IGNORED: dict[str, list[Any]] = {
    "user": ["end-user-1"],
    "safety_identifier": ["end-user-1"],
    "prompt_cache_key": ["conversation-7"],
    "prompt_cache_options": [{"mode": "implicit", "ttl": "30m"}],
    "prompt_cache_retention": ["in_memory", "24h"],
    "service_tier": ["auto", "default"],
    "store": [False, True],  # nothing is stored either way: there is no stored-completions API here
    "metadata": [{"team": "search"}],
    "parallel_tool_calls": [True, False],  # there are no tools to call in parallel
    "verbosity": ["medium"],  # OpenAI's default
    "modalities": [["text"]],
    "response_format": [{"type": "text"}],
    "tool_choice": ["none"],
    "function_call": ["none"],
    "n": [1],
    "presence_penalty": [0],
    "frequency_penalty": [0],
    "logit_bias": [{}],
    "logprobs": [False],
    "top_logprobs": [0],
}
# Values that would change the answer in a way Inlaid cannot give: 400 naming the parameter.
CHAT_REFUSED: dict[str, list[Any]] = {
    "audio": [{"voice": "alloy", "format": "wav"}],
    "frequency_penalty": [0.5],
    "presence_penalty": [0.5],
    "function_call": ["auto"],
    "functions": [[{"name": "lookup", "parameters": {"type": "object"}}]],
    "logit_bias": [{"50256": -100}],
    "logprobs": [True],
    "top_logprobs": [2],
    "modalities": [["text", "audio"]],
    "moderation": [{"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}],
    "n": [2],
    "prediction": [{"type": "content", "content": "draft"}],
    "reasoning_effort": ["low"],
    "response_format": [{"type": "json_object"}],
    "tool_choice": ["auto"],
    "tools": [[{"type": "function", "function": {"name": "lookup"}}]],
    "verbosity": ["low", "high"],
    "web_search_options": [{}],
}
# Honoured: they shape the SDK call (tested in test_http_units.py and test_http_server.py).
CHAT_USED: dict[str, list[Any]] = {
    "max_tokens": [5], "max_completion_tokens": [5], "seed": [1], "stop": [["\n"]], "temperature": [0.5],
    "top_p": [0.9], "stream": [True], "stream_options": [{"include_usage": True}],
}
COMPLETION_IGNORED: dict[str, list[Any]] = {
    "user": ["end-user-1"], "n": [1], "best_of": [1], "presence_penalty": [0], "frequency_penalty": [0],
    "logit_bias": [{}], "echo": [False],
}
COMPLETION_REFUSED: dict[str, list[Any]] = {
    "n": [2], "best_of": [2], "echo": [True], "suffix": ["tail"], "logprobs": [2], "presence_penalty": [0.5],
    "frequency_penalty": [0.5], "logit_bias": [{"50256": -100}],
}
COMPLETION_USED: dict[str, list[Any]] = {
    "max_tokens": [5], "seed": [1], "stop": [["\n"]], "temperature": [0.5], "top_p": [0.9], "stream": [True],
    "stream_options": [{"include_usage": True}],
}


def _body_parameters(create: Any) -> list[str]:
    return [name for name in inspect.signature(create).parameters if name not in _NOT_BODY]


CHAT_PARAMETERS = _body_parameters(openai.resources.chat.completions.completions.Completions.create)
COMPLETION_PARAMETERS = _body_parameters(openai.resources.completions.Completions.create)


def _create(client: _Recording, chat: bool, **arguments: Any) -> Any:
    """One request through the official client; its answer (a stream read to the end: its
    chunks), or the client's exception."""

    async def run() -> Any:
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=_app(client))) as http:
            api = openai.AsyncOpenAI(base_url="http://front/v1", api_key="unused", max_retries=0, http_client=http)
            if arguments.get("stream_options") is not None:
                arguments.setdefault("stream", True)  # only allowed with a stream, as OpenAI's rule
            try:
                if chat:
                    answer = await api.chat.completions.create(
                        model=BASE, messages=[{"role": "user", "content": "Hi"}], **arguments)
                else:
                    answer = await api.completions.create(model=BASE, prompt="Hi", **arguments)
                if arguments.get("stream"):
                    return [chunk async for chunk in answer]
                return answer
            except openai.APIStatusError as error:
                return error

    return asyncio.run(run())


def _refusal(answer: Any) -> tuple[str | None, str]:
    """The 400's `param` and message, or (None, "") for an answer."""
    if not isinstance(answer, openai.APIStatusError):
        return None, ""
    assert answer.status_code == 400, answer
    error = answer.body if isinstance(answer.body, dict) else {}
    return error.get("param"), str(error.get("message", answer.message))


def _cases(parameters: list[str], *tables: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    """Each parameter with each value the tables give it, or null when none knows it."""
    cases = []
    for name in parameters:
        values = [value for table in tables for value in table.get(name, [])]
        cases += [(name, value) for value in values or [None]]
    return cases


@pytest.mark.parametrize(("name", "value"), _cases(CHAT_PARAMETERS, CHAT_IGNORED, CHAT_REFUSED, CHAT_USED))
def test_no_chat_parameter_the_openai_client_defines_is_unrecognized(name: str, value: Any) -> None:
    param, message = _refusal(_create(_Recording(), True, **{name: value}))
    assert "Unrecognized" not in message, (name, value, message)
    assert param in (None, name), (name, value, param, message)  # a refusal names the parameter sent


@pytest.mark.parametrize(("name", "value"),
                         _cases(COMPLETION_PARAMETERS, COMPLETION_IGNORED, COMPLETION_REFUSED, COMPLETION_USED))
def test_no_completion_parameter_the_openai_client_defines_is_unrecognized(name: str, value: Any) -> None:
    param, message = _refusal(_create(_Recording(), False, **{name: value}))
    assert "Unrecognized" not in message, (name, value, message)
    assert param in (None, name), (name, value, param, message)


@pytest.mark.parametrize(("chat", "name", "value"),
                         [(True, name, value) for name, value in _cases(list(CHAT_IGNORED), CHAT_IGNORED)]
                         + [(False, name, value)
                            for name, value in _cases(list(COMPLETION_IGNORED), COMPLETION_IGNORED)])
def test_parameters_that_cannot_change_the_answer_are_accepted_and_not_used(chat: bool, name: str, value: Any) -> None:
    plain, with_parameter = _Recording(), _Recording()
    _create(plain, chat)
    answer = _create(with_parameter, chat, **{name: value})
    assert not isinstance(answer, openai.APIStatusError), (name, value, answer)
    assert answer.choices[0].finish_reason == "length"
    assert with_parameter.generated == plain.generated, name  # the server is asked exactly the same


@pytest.mark.parametrize(("chat", "name", "value"),
                         [(True, name, value) for name, value in _cases(list(CHAT_REFUSED), CHAT_REFUSED)]
                         + [(False, name, value)
                            for name, value in _cases(list(COMPLETION_REFUSED), COMPLETION_REFUSED)])
def test_parameters_inlaid_cannot_honour_are_refused_by_name(chat: bool, name: str, value: Any) -> None:
    client = _Recording()
    param, message = _refusal(_create(client, chat, **{name: value}))
    assert param == name, (name, value, param, message)
    assert "supported" in message or "must be" in message, message
    assert not client.generated  # refused by the front: nothing reached the server


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_obfuscation", [True, False])
def test_stream_obfuscation_is_accepted_and_never_sent(chat: bool, include_obfuscation: bool) -> None:
    plain, obfuscated = _Recording(), _Recording()
    _create(plain, chat, stream_options={"include_usage": True})
    chunks = _create(obfuscated, chat,
                     stream_options={"include_usage": True, "include_obfuscation": include_obfuscation})
    assert not isinstance(chunks, openai.APIStatusError), chunks
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1  # include_usage still works
    # The front pads nothing: no chunk carries OpenAI's `obfuscation` field, whichever was asked.
    assert all("obfuscation" not in chunk.model_dump(exclude_unset=True) for chunk in chunks)
    assert obfuscated.generated == plain.generated


def test_verbosity_refusal_says_which_value_is_accepted() -> None:
    param, message = _refusal(_create(_Recording(), True, verbosity="high"))
    assert param == "verbosity" and "'high'" in message and "'medium'" in message, message
