"""The HTTP front end to end: a real `inlaid serve` with `[http]` and `[metrics]` on free
loopback ports (http_harness.py), driven with the official `openai` client and raw HTTP;
answers compared with the SDK's for the same requests; client disconnects and overload.
/metrics, the front's own process and SIGTERM: test_http_front_process.py.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from http_harness import (ADMIN_TOKEN, CHATS, MAX_MODEL_LEN, MAX_PENDING, MAX_TOKENS, PROMPTS,  # noqa: F401
                          base_model, delta, drop, error_of, http_request, open_generation, post_head_only, scrape,
                          server, wait_idle, wait_running)  # (base_model, server: the module's fixtures)

from inlaid.client import AsyncClient


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _models(base_model: str, adapter_dirs) -> list[str]:
    return [base_model, *sorted(adapter_dirs)]


def _task(model: str, base_model: str) -> str | None:
    return None if model == base_model else model


async def _sdk_and_http(server, base_model: str, jobs: list[tuple[str, dict]], http_call) -> tuple[list, list]:
    """Each job (model, SDK keyword arguments) through the SDK and through `http_call`,
    all at once (one mixed batch, as a server sees it)."""
    api = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=300)
    async with AsyncClient(server.address, timeout_s=300) as sdk:
        sdk_jobs = [sdk.generate(task=_task(model, base_model), temperature=0.0, **kwargs) for model, kwargs in jobs]
        http_jobs = [http_call(api, model, kwargs) for model, kwargs in jobs]
        results = await asyncio.gather(*sdk_jobs, *http_jobs)
    await api.close()
    return results[: len(jobs)], results[len(jobs):]


def test_models_list_the_base_and_every_task(api, base_model, adapter_dirs):
    listed = api.models.list().data
    assert [m.id for m in listed] == _models(base_model, adapter_dirs)
    assert all(m.object == "model" and m.owned_by == "inlaid" for m in listed)
    for name, path in adapter_dirs.items():
        card = api.models.retrieve(name)
        assert card.id == name and card.root == str(path) and card.parent == base_model
    assert api.models.retrieve(base_model).parent is None
    with pytest.raises(openai.NotFoundError) as caught:
        api.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


def test_completions_every_model_greedy_equals_the_sdk(server, base_model, adapter_dirs):
    jobs = [(model, {"prompt": prompt, "max_tokens": MAX_TOKENS})
            for model in _models(base_model, adapter_dirs) for prompt in PROMPTS]

    async def http_call(api, model, kwargs):
        return await api.completions.create(model=model, temperature=0, **kwargs)

    expected, answers = asyncio.run(_sdk_and_http(server, base_model, jobs, http_call))
    texts = set()
    for (model, _), sdk, http in zip(jobs, expected, answers):
        assert http.object == "text_completion" and http.model == model and len(http.choices) == 1
        choice = http.choices[0]
        assert choice.text == sdk.text, model
        assert choice.finish_reason == {"stop": "stop", "length": "length"}[sdk.finish_reason]
        assert http.usage.prompt_tokens == sdk.num_prompt_tokens
        assert http.usage.completion_tokens == len(sdk.token_ids)
        assert http.usage.total_tokens == sdk.num_prompt_tokens + len(sdk.token_ids)
        texts.add((model, choice.text))
    # The adapters really change the answers: the models are not all the base model.
    assert len({text for _, text in texts}) > len(PROMPTS)


def test_chat_completions_every_model_greedy_equals_the_sdk(server, base_model, adapter_dirs):
    jobs = [(model, {"messages": messages, "max_tokens": MAX_TOKENS})
            for model in _models(base_model, adapter_dirs) for messages in CHATS]

    async def http_call(api, model, kwargs):
        return await api.chat.completions.create(model=model, temperature=0, **kwargs)

    expected, answers = asyncio.run(_sdk_and_http(server, base_model, jobs, http_call))
    for (model, _), sdk, http in zip(jobs, expected, answers):
        assert http.object == "chat.completion" and http.model == model
        message = http.choices[0].message
        assert message.role == "assistant" and message.content == sdk.text, model
        assert http.usage.prompt_tokens == sdk.num_prompt_tokens
        assert http.usage.completion_tokens == len(sdk.token_ids)


def test_content_parts_developer_role_and_max_completion_tokens(api, server):
    as_parts = api.chat.completions.create(
        model="all-r32", temperature=0, max_completion_tokens=MAX_TOKENS,
        messages=[{"role": "developer", "content": "You answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "What is"},
                                               {"type": "text", "text": "3 + 4?"}]}],
    )  # fmt: skip
    with server.client() as client:
        sdk = client.generate(task="all-r32", max_tokens=MAX_TOKENS, messages=[
            {"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is\n3 + 4?"}])
    assert as_parts.choices[0].message.content == sdk.text
    assert as_parts.usage.prompt_tokens == sdk.num_prompt_tokens


def test_streaming_completion_and_chat_equal_the_sdk(api, server):
    with server.client() as client:
        sdk_text = client.generate(PROMPTS[1], task="mlp-r16", max_tokens=MAX_TOKENS)
        sdk_chat = client.generate(messages=CHATS[1], task="attn-r8", max_tokens=MAX_TOKENS)

    chunks = list(api.completions.create(model="mlp-r16", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2, "a streamed answer arrives in pieces"
    assert "".join(pieces) == sdk_text.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(sdk_text.token_ids)
    assert chunks[-1].usage.prompt_tokens == sdk_text.num_prompt_tokens

    chunks = list(api.chat.completions.create(model="attn-r8", messages=CHATS[1], max_tokens=MAX_TOKENS,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == sdk_chat.text
    assert chunks[-1].choices[0].finish_reason == {"stop": "stop", "length": "length"}[sdk_chat.finish_reason]
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"


def test_stop_seed_top_p_and_several_prompts_equal_the_sdk(api, server, base_model):
    with server.client() as client:
        free = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS)
        stop = free.text.strip().split()[0]  # a word the model does write: the answer ends before it
        stopped = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, stop=[stop])
        sampled = client.generate(PROMPTS[2], task="all-r32", max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.8,
                                  seed=7)
        several = [client.generate(p, task="attn-r8", max_tokens=4) for p in PROMPTS]
    http = api.completions.create(model=base_model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  stop=stop)
    assert http.choices[0].finish_reason == "stop" and stop not in http.choices[0].text
    assert http.choices[0].text == stopped.text
    for _ in range(2):  # a seed makes sampling replayable, over HTTP as through the SDK
        again = api.completions.create(model="all-r32", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0.9,
                                       top_p=0.8, seed=7)
        assert again.choices[0].text == sampled.text
    batch = api.completions.create(model="attn-r8", prompt=PROMPTS, max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [r.text for r in several]
    assert batch.usage.completion_tokens == sum(len(r.token_ids) for r in several)
    streamed = api.completions.create(model="attn-r8", prompt=PROMPTS, max_tokens=4, temperature=0, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [r.text for r in several]


# Each bad input: (request, status, the OpenAI client's exception, the error body's param).
BAD_COMPLETIONS = [
    ({"model": "no-such-task", "prompt": "x"}, 404, openai.NotFoundError, "model"),
    ({"model": "attn-r8", "prompt": "x", "n": 2}, 400, openai.BadRequestError, "n"),
    ({"model": "attn-r8", "prompt": "x", "logprobs": 2}, 400, openai.BadRequestError, "logprobs"),
    ({"model": "attn-r8", "prompt": "x", "echo": True}, 400, openai.BadRequestError, "echo"),
    ({"model": "attn-r8", "prompt": "x", "best_of": 3}, 400, openai.BadRequestError, "best_of"),
    ({"model": "attn-r8", "prompt": "x", "presence_penalty": 0.5}, 400, openai.BadRequestError, "presence_penalty"),
    ({"model": "attn-r8", "prompt": "x", "logit_bias": {"50": 1}}, 400, openai.BadRequestError, "logit_bias"),
    ({"model": "attn-r8", "prompt": "x", "extra_body": {"bogus": 1}}, 400, openai.BadRequestError, "bogus"),
    ({"model": "attn-r8", "prompt": "x", "temperature": -1}, 400, openai.BadRequestError, "temperature"),
    ({"model": "attn-r8", "prompt": "x", "top_p": 0}, 400, openai.BadRequestError, "top_p"),
    ({"model": "attn-r8", "prompt": "x", "max_tokens": 0}, 400, openai.BadRequestError, "max_tokens"),
    ({"model": "attn-r8", "prompt": "x", "max_tokens": "many"}, 400, openai.BadRequestError, "max_tokens"),
    ({"model": "attn-r8", "prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400, openai.BadRequestError, "stop"),
    ({"model": "attn-r8", "prompt": [1, "x"]}, 400, openai.BadRequestError, "prompt"),
    ({"model": "attn-r8", "prompt": [7] * (MAX_MODEL_LEN + 5)}, 400, openai.BadRequestError, "prompt"),
    ({"model": "attn-r8", "prompt": "x", "stream_options": {"include_usage": True}}, 400, openai.BadRequestError,
     "stream_options"),
    ({"model": "attn-r8", "prompt": "x", "stream": True, "temperature": -1}, 400, openai.BadRequestError,
     "temperature"),
    ({"model": "no-such-task", "prompt": "x", "stream": True}, 404, openai.NotFoundError, "model"),
    ({"model": "attn-r8", "prompt": ["x"] * 13}, 400, openai.BadRequestError, "prompt"),  # http.max_prompts_per_request
    ({"model": "attn-r8", "prompt": "x", "max_tokens": 2**64}, 400, openai.BadRequestError, "max_tokens"),
    ({"model": "attn-r8", "prompt": [1, 2**64]}, 400, openai.BadRequestError, "prompt[1]"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 5)}]}, "messages"),  # past the context
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"}, "reasoning_effort"),
]


def test_bad_requests_get_openai_errors_with_the_right_status(api, server):
    for request, status, kind, param in BAD_COMPLETIONS:
        request = dict(request)
        extra = request.pop("extra_body", None)
        with pytest.raises(kind) as caught:
            result = api.completions.create(**request, extra_body=extra)
            if request.get("stream"):
                list(result)
        error = caught.value
        assert error.status_code == status, request
        assert error.body["param"] == param and error.body["type"] == "invalid_request_error", (request, error.body)
        if "prompt" in request and request["prompt"] == [7] * (MAX_MODEL_LEN + 5):
            assert error.body["code"] == "context_length_exceeded"
    for request, param in BAD_CHATS:
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model="attn-r8", **request)
        assert caught.value.body["param"] == param, request
    # What a client library would not send: broken JSON, no body, too large, wrong routes.
    for raw, status in [(b"{not json", 400), (b"", 400), (b"[1, 2]", 400),
                        (b'{"model": "attn-r8", "prompt": "\xff\xfe"}', 400)]:  # not UTF-8
        code, _, body = http_request(server, "POST", "/v1/completions", raw=raw, headers={"Content-Type": "application/json"})
        assert code == status and error_of(body)["type"] == "invalid_request_error", raw[:20]
    # Too large: the front answers 413 from the declared length and closes, without reading
    # the body (a client still sending 2 MiB would see a broken pipe, so only the head goes).
    code, body = post_head_only(server, "/v1/completions", content_length=2 << 20)
    assert code == 413 and error_of(body)["code"] == "request_too_large"
    code, _, body = http_request(server, "GET", "/v1/nothing-here")
    assert code == 404 and error_of(body)["code"] == "not_found"
    code, headers, body = http_request(server, "GET", "/v1/completions")
    assert code == 405 and "POST" in headers.get("allow", headers.get("Allow", "")) and error_of(body)
    # The server keeps serving; OpenAI's bookkeeping arguments are accepted.
    assert api.completions.create(model="attn-r8", prompt="Hi", max_tokens=2, temperature=0).choices
    assert api.chat.completions.create(model="attn-r8", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       temperature=0, store=False, metadata={"run": "1"}).choices


def test_admin_endpoints_need_the_admin_token(server, api, adapter_dirs, base_model):
    load = {"lora_name": "extra", "lora_path": str(adapter_dirs["attn-r8"])}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ADMIN_TOKEN}):
        code, response_headers, body = http_request(server, "POST", "/v1/load_lora_adapter", load, headers)
        assert code == 401 and error_of(body)["type"] == "authentication_error"
        assert response_headers.get("www-authenticate", response_headers.get("WWW-Authenticate")) == "Bearer"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    code, _, body = http_request(server, "POST", "/v1/load_lora_adapter", load, admin)
    assert (code, body) == (200, b"Success: LoRA adapter 'extra' added successfully.")
    assert "extra" in [m.id for m in api.models.list().data]
    # The new model is the same adapter as attn-r8: the same greedy answer.
    same = [api.completions.create(model=m, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
            for m in ("extra", "attn-r8")]
    assert same[0] == same[1]
    bad = [  # (request, status, the error's param)
        ({"lora_name": "broken", "lora_path": "/no/such/adapter"}, 400, "lora_path"),
        ({"lora_name": base_model, "lora_path": str(adapter_dirs["attn-r8"])}, 400, "lora_name"),
        ({"lora_name": "bad name!", "lora_path": str(adapter_dirs["attn-r8"])}, 400, "lora_name"),
        ({"lora_name": "__x__", "lora_path": str(adapter_dirs["attn-r8"])}, 400, "lora_name"),
        ({"lora_name": "x"}, 400, "lora_path"),
    ]
    for request, status, param in bad:
        code, _, body = http_request(server, "POST", "/v1/load_lora_adapter", request, admin)
        assert code == status and error_of(body)["param"] == param, (request, body)
    code, _, body = http_request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "extra"}, admin)
    assert (code, body) == (200, b"Success: LoRA adapter 'extra' removed successfully.")
    code, _, body = http_request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "extra"}, admin)
    assert code == 404 and error_of(body)["code"] == "model_not_found"
    code, _, _ = http_request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "attn-r8"}, {})
    assert code == 401
    assert "extra" not in [m.id for m in api.models.list().data]
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="extra", prompt="x", max_tokens=1)
    # A task of the server's config: the answer says what the SDK's says, that a restart serves it again
    code, _, body = http_request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "all-r32"}, admin)
    assert code == 200 and body.decode() == (
        "Success: LoRA adapter 'all-r32' removed successfully. Note: it is in the server config's [tasks]: the next "
        f"restart serves it again ({adapter_dirs['all-r32']}).")
    restore = {"lora_name": "all-r32", "lora_path": str(adapter_dirs["all-r32"])}
    assert http_request(server, "POST", "/v1/load_lora_adapter", restore, admin)[0] == 200


def test_client_disconnect_cancels_the_request_and_frees_its_kv_blocks(server):
    long = {"model": "mlp-r16", "prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    for stream in (True, False):
        before = scrape(server)
        connection = open_generation(server, {**long, "stream": stream})
        if stream:
            reader = connection.makefile("rb")
            while not reader.readline().startswith(b"data: {"):  # the headers, then a first token
                pass
        busy = wait_running(server, 1)
        assert busy.kv_blocks_free < busy.kv_blocks_total
        drop(connection)
        idle = wait_idle(server)
        assert idle.requests_running == 0 and idle.kv_blocks_free == idle.kv_blocks_total, stream
        after = scrape(server)
        assert delta(before, after, "inlaid_requests_total", task="mlp-r16", outcome="cancelled") == 1
        assert delta(before, after, "inlaid_generation_tokens_total", task="mlp-r16") < 400
        assert delta(before, after, "inlaid_http_requests_total", route="/v1/completions", status="499") == 1


def test_overload_answers_429_and_loses_no_accepted_request(server):
    """Long requests through the front (one connection to the server) fill all but the last
    tenth of max_pending_requests, which the server keeps for other clients; each one more
    is refused at once (429, Retry-After) while an SDK client is still admitted; dropping the
    connections cancels the accepted ones."""
    long = {"model": "attn-r8", "prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    front_share = MAX_PENDING - max(1, MAX_PENDING // 10)
    accepted = [open_generation(server, long) for _ in range(front_share)]
    try:
        wait_running(server, 1)
        with server.client() as client:  # every accepted request is in the server before the excess comes
            deadline = time.monotonic() + 60
            while (s := client.stats()).requests_running + s.requests_waiting < front_share:
                assert time.monotonic() < deadline, s
                time.sleep(0.05)
            refusals = [http_request(server, "POST", "/v1/completions", long) for _ in range(3)]
            for code, headers, body in refusals:
                assert code == 429 and error_of(body)["code"] == "overloaded"
                assert error_of(body)["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
                assert "kept for other clients" in error_of(body)["message"]
            assert client.generate("Hi", max_tokens=1).token_ids  # another client is served meanwhile
    finally:
        for connection in accepted:
            drop(connection)
    idle = wait_idle(server)
    assert idle.kv_blocks_free == idle.kv_blocks_total
