"""The HTTP front end to end: a real `inlaid serve` with `[http]` and `[metrics]` on free
loopback ports, driven with the official `openai` client and raw HTTP; answers compared
with the SDK's for the same requests; `/metrics` parsed with `prometheus_client.parser`.

One server serves the module; the SIGTERM test comes last because it stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inlaid.client import AsyncClient, Client, UnknownTaskError
from inlaid.serve.launcher import ServerProcess, free_tcp_port

ADMIN_TOKEN = "http-test-admin-token-0123456789"
MAX_MODEL_LEN = 512
MAX_PENDING = 24
MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "def add(a, b):", "List three fruits:"]
CHATS = [
    [{"role": "user", "content": "Name a planet."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 3 + 4?"}],
]


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    config = {
        "model": {"dir": str(model_dir)},
        "executor": {"dtype": "float32", "threads": 1, "max_num_seqs": 64, "num_kv_blocks": 1024, "block_size": 16,
                     "max_lora_slots": 4, "max_lora_rank": 32, "max_model_len": MAX_MODEL_LEN},
        "server": {"admin_token": ADMIN_TOKEN, "max_pending_requests": MAX_PENDING, "shutdown_grace_s": 3.0},
        "tasks": {name: str(path) for name, path in adapter_dirs.items()},
        "http": {"max_prompts_per_request": 12},  # not the default: the setting must reach the front's process
        "metrics": {"port": free_tcp_port()},
    }
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("http-server"))
    process.wait_ready(timeout_s=300)
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def base_model(server) -> str:
    with server.client() as client:
        return client.handshake().model


def _models(base_model: str, adapter_dirs) -> list[str]:
    return [base_model, *sorted(adapter_dirs)]


def _task(model: str, base_model: str) -> str | None:
    return None if model == base_model else model


def _http(server, method: str, path: str, body: object = None, headers: dict | None = None,
          raw: bytes | None = None) -> tuple[int, dict, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"{server.http_url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _post_head_only(server, path: str, content_length: int) -> tuple[int, bytes]:
    """POST a request head that declares `content_length` body bytes and send none of them."""
    host, port = server.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _error_of(body: bytes) -> dict:
    document = json.loads(body)
    assert set(document) == {"error"}, document
    assert set(document["error"]) == {"message", "type", "param", "code"}, document
    assert document["error"]["message"], document
    return document["error"]


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
    ({"model": "attn-r8", "prompt": "x", "temperature": -1}, 400, openai.BadRequestError, None),
    ({"model": "attn-r8", "prompt": "x", "top_p": 0}, 400, openai.BadRequestError, None),
    ({"model": "attn-r8", "prompt": "x", "max_tokens": 0}, 400, openai.BadRequestError, None),
    ({"model": "attn-r8", "prompt": "x", "max_tokens": "many"}, 400, openai.BadRequestError, "max_tokens"),
    ({"model": "attn-r8", "prompt": [1, "x"]}, 400, openai.BadRequestError, "prompt"),
    ({"model": "attn-r8", "prompt": [7] * (MAX_MODEL_LEN + 5)}, 400, openai.BadRequestError, None),
    ({"model": "attn-r8", "prompt": "x", "stream_options": {"include_usage": True}}, 400, openai.BadRequestError,
     "stream_options"),
    ({"model": "attn-r8", "prompt": "x", "stream": True, "temperature": -1}, 400, openai.BadRequestError, None),
    ({"model": "no-such-task", "prompt": "x", "stream": True}, 404, openai.NotFoundError, "model"),
    ({"model": "attn-r8", "prompt": ["x"] * 13}, 400, openai.BadRequestError, "prompt"),  # http.max_prompts_per_request
    ({"model": "attn-r8", "prompt": "x", "max_tokens": 2**64}, 400, openai.BadRequestError, "max_tokens"),
    ({"model": "attn-r8", "prompt": [1, 2**64]}, 400, openai.BadRequestError, "prompt[1]"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
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
        code, _, body = _http(server, "POST", "/v1/completions", raw=raw, headers={"Content-Type": "application/json"})
        assert code == status and _error_of(body)["type"] == "invalid_request_error", raw[:20]
    # Too large: the front answers 413 from the declared length and closes, without reading
    # the body (a client still sending 2 MiB would see a broken pipe, so only the head goes).
    code, body = _post_head_only(server, "/v1/completions", content_length=2 << 20)
    assert code == 413 and _error_of(body)["code"] == "request_too_large"
    code, _, body = _http(server, "GET", "/v1/nothing-here")
    assert code == 404 and _error_of(body)["code"] == "not_found"
    code, headers, body = _http(server, "GET", "/v1/completions")
    assert code == 405 and "POST" in headers.get("allow", headers.get("Allow", "")) and _error_of(body)
    # The server keeps serving; OpenAI's bookkeeping arguments are accepted.
    assert api.completions.create(model="attn-r8", prompt="Hi", max_tokens=2, temperature=0).choices
    assert api.chat.completions.create(model="attn-r8", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       temperature=0, store=False, metadata={"run": "1"}).choices


def test_admin_endpoints_need_the_admin_token(server, api, adapter_dirs, base_model):
    load = {"lora_name": "extra", "lora_path": str(adapter_dirs["attn-r8"])}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ADMIN_TOKEN}):
        code, response_headers, body = _http(server, "POST", "/v1/load_lora_adapter", load, headers)
        assert code == 401 and _error_of(body)["type"] == "authentication_error"
        assert response_headers.get("www-authenticate", response_headers.get("WWW-Authenticate")) == "Bearer"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    code, _, body = _http(server, "POST", "/v1/load_lora_adapter", load, admin)
    assert (code, body) == (200, b"Success: LoRA adapter 'extra' added successfully.")
    assert "extra" in [m.id for m in api.models.list().data]
    # The new model is the same adapter as attn-r8: the same greedy answer.
    same = [api.completions.create(model=m, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
            for m in ("extra", "attn-r8")]
    assert same[0] == same[1]
    bad = [
        ({"lora_name": "broken", "lora_path": "/no/such/adapter"}, 400),
        ({"lora_name": base_model, "lora_path": str(adapter_dirs["attn-r8"])}, 400),
        ({"lora_name": "bad name!", "lora_path": str(adapter_dirs["attn-r8"])}, 400),
        ({"lora_name": "x"}, 400),
    ]
    for request, status in bad:
        code, _, body = _http(server, "POST", "/v1/load_lora_adapter", request, admin)
        assert code == status and _error_of(body), request
    code, _, body = _http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "extra"}, admin)
    assert (code, body) == (200, b"Success: LoRA adapter 'extra' removed successfully.")
    code, _, body = _http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "extra"}, admin)
    assert code == 404 and _error_of(body)["code"] == "model_not_found"
    code, _, _ = _http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "attn-r8"}, {})
    assert code == 401
    assert "extra" not in [m.id for m in api.models.list().data]
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="extra", prompt="x", max_tokens=1)


def _open_generation(server, body: dict) -> socket.socket:
    """A request on a raw connection, so that the test can drop the connection itself."""
    payload = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", int(server.http_url.rsplit(":", 1)[1])), timeout=60)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return connection


def _drop(connection: socket.socket) -> None:
    """Close the connection for good (a file made from it would keep it open otherwise)."""
    connection.shutdown(socket.SHUT_RDWR)
    connection.close()


def _wait_idle(server, timeout_s: float = 30.0):
    with server.client() as client:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = client.stats()
            if stats.requests_running == stats.requests_waiting == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


def _wait_running(server, count: int, timeout_s: float = 60.0):
    with server.client() as client:
        deadline = time.monotonic() + timeout_s
        while (stats := client.stats()).requests_running < count and time.monotonic() < deadline:
            time.sleep(0.05)
    assert stats.requests_running >= count, stats
    return stats


def test_client_disconnect_cancels_the_request_and_frees_its_kv_blocks(server):
    long = {"model": "mlp-r16", "prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    for stream in (True, False):
        before = _scrape(server)
        connection = _open_generation(server, {**long, "stream": stream})
        if stream:
            reader = connection.makefile("rb")
            while not reader.readline().startswith(b"data: {"):  # the headers, then a first token
                pass
        busy = _wait_running(server, 1)
        assert busy.kv_blocks_free < busy.kv_blocks_total
        _drop(connection)
        idle = _wait_idle(server)
        assert idle.requests_running == 0 and idle.kv_blocks_free == idle.kv_blocks_total, stream
        after = _scrape(server)
        assert _delta(before, after, "inlaid_requests_total", task="mlp-r16", outcome="cancelled") == 1
        assert _delta(before, after, "inlaid_generation_tokens_total", task="mlp-r16") < 400
        assert _delta(before, after, "inlaid_http_requests_total", route="/v1/completions", status="499") == 1


def test_overload_answers_429_and_loses_no_accepted_request(server):
    """MAX_PENDING long requests fill the server; each one more is refused at once (429,
    Retry-After); dropping the connections cancels the accepted ones."""
    long = {"model": "attn-r8", "prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    accepted = [_open_generation(server, long) for _ in range(MAX_PENDING)]
    try:
        _wait_running(server, 1)
        with server.client() as client:  # every accepted request is in the server before the excess comes
            deadline = time.monotonic() + 60
            while (s := client.stats()).requests_running + s.requests_waiting < MAX_PENDING:
                assert time.monotonic() < deadline, s
                time.sleep(0.05)
        refusals = [_http(server, "POST", "/v1/completions", long) for _ in range(3)]
        for code, headers, body in refusals:
            assert code == 429 and _error_of(body)["code"] == "overloaded"
            assert _error_of(body)["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
    finally:
        for connection in accepted:
            _drop(connection)
    idle = _wait_idle(server)
    assert idle.kv_blocks_free == idle.kv_blocks_total


def _scrape(server, url: str | None = None) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url or f"{server.http_url}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_metrics_after_a_known_workload(server, base_model):
    """Counters and histogram counts move by exactly the requests and tokens sent."""
    _wait_idle(server)
    jobs = [(task, prompt) for task in (None, "attn-r8", "all-r32") for prompt in PROMPTS] + [("mlp-r16", PROMPTS[0])]
    with server.client() as client:
        # Steps run one after another: once this request is done, no step of earlier
        # (cancelled) work can still be in flight.
        client.generate("barrier", max_tokens=1)
        steps_before = client.stats().steps
        before = _scrape(server)
        results = asyncio.run(_generate_all(server, jobs))
        with pytest.raises(UnknownTaskError):
            client.generate("x", task="no-such-task")
        steps = client.stats().steps - steps_before
    after = _scrape(server)
    by_task: dict[str, list] = {}
    for (task, _), result in zip(jobs, results):
        by_task.setdefault(task or "__base__", []).append(result)
    for label, done in by_task.items():
        outcomes = Counter(r.finish_reason for r in done)
        for outcome, count in outcomes.items():
            assert _delta(before, after, "inlaid_requests_total", task=label, outcome=outcome) == count
        assert _delta(before, after, "inlaid_prompt_tokens_total", task=label) == sum(r.num_prompt_tokens for r in done)
        generated = sum(len(r.token_ids) for r in done)
        assert _delta(before, after, "inlaid_generation_tokens_total", task=label) == generated
        for histogram in ("inlaid_request_duration_seconds", "inlaid_request_queue_seconds",
                          "inlaid_time_to_first_token_seconds"):
            assert _delta(before, after, f"{histogram}_count", task=label) == len(done), (label, histogram)
            assert _delta(before, after, f"{histogram}_bucket", task=label, le="+Inf") == len(done)
        assert _delta(before, after, "inlaid_time_per_output_token_seconds_count", task=label) == sum(
            len(r.token_ids) >= 2 for r in done)
        # Latencies are positive and no larger than the client saw.
        total = _delta(before, after, "inlaid_request_duration_seconds_sum", task=label)
        assert 0 < total <= sum(r.total_seconds for r in done) + 0.05 * len(done)
    assert _delta(before, after, "inlaid_requests_total", task="__unknown__", outcome="unknown_task") == 1
    # Per step: one observation per step; every sequence-step is one generated token (each
    # prompt fits one step), every computed token a prompt token or a fed-back sample.
    everything = [r for done in by_task.values() for r in done]
    assert _delta(before, after, "inlaid_step_duration_seconds_count") == steps
    assert _delta(before, after, "inlaid_step_batch_size_count") == steps
    assert _delta(before, after, "inlaid_step_batch_size_sum") == sum(len(r.token_ids) for r in everything)
    assert _delta(before, after, "inlaid_computed_tokens_total") == sum(
        r.num_prompt_tokens + len(r.token_ids) - 1 for r in everything)
    adapter_requests = sum(len(done) for label, done in by_task.items() if label != "__base__")
    assert (_delta(before, after, "inlaid_adapter_loads_total") + _delta(before, after, "inlaid_adapter_hits_total")
            == adapter_requests)
    assert _delta(before, after, "inlaid_step_tasks_count") == steps
    assert 1 <= _delta(before, after, "inlaid_step_tasks_sum") <= 3 * steps
    # Gauges: idle again, nothing lost, the executor never restarted.
    assert _value(after, "inlaid_requests_running") == _value(after, "inlaid_requests_waiting") == 0
    assert _value(after, "inlaid_kv_blocks_used") == 0 and _value(after, "inlaid_kv_blocks_total") == 1024
    assert _value(after, "inlaid_executor_up") == 1 and _value(after, "inlaid_executor_restarts_total") == 0
    assert _value(after, "inlaid_tasks") == 3 and _value(after, "inlaid_executor_rss_bytes") > 0
    assert _value(after, "inlaid_server_info", model=base_model, version="0.1.0") == 1
    # The front counted its own scrape of /metrics, and nothing of the SDK's traffic.
    assert _delta(before, after, "inlaid_http_requests_total", route="/metrics", status="200") == 1
    assert _delta(before, after, "inlaid_http_requests_total", route="/v1/completions", status="200") == 0
    # The coordinator's own metrics port serves the same server families.
    own = _scrape(server, f"http://127.0.0.1:{_metrics_port(server)}/metrics")
    assert _value(own, "inlaid_generation_tokens_total", task="attn-r8") == _value(
        after, "inlaid_generation_tokens_total", task="attn-r8")
    assert not any(name.startswith("inlaid_http_") for name, _ in own)


async def _generate_all(server, jobs):
    async with AsyncClient(server.address, timeout_s=300) as client:
        return await asyncio.gather(*(client.generate(p, task=t, max_tokens=MAX_TOKENS) for t, p in jobs))


def _metrics_port(server) -> int:
    import tomllib

    return int(tomllib.loads(server.config_path.read_text())["metrics"]["port"])


def _front_pids(server) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.pid and b"inlaid.http" in command:
            pids.append(int(entry))
    return pids


def test_a_lost_front_is_restarted_on_the_same_socket(server):
    """Killing the front loses no new connection: the server holds the listening socket,
    so a request on a new connection waits in its backlog for the next front (connections
    the dead front had accepted are reset; clients reconnect)."""
    (first,) = _front_pids(server)
    os.kill(first, signal.SIGKILL)
    code, _, body = _http(server, "POST", "/v1/completions", {"model": "attn-r8", "prompt": "Hi", "max_tokens": 2})
    assert code == 200 and json.loads(body)["choices"][0]["text"]
    (second,) = _front_pids(server)
    assert second != first


def test_the_front_runs_alone_in_front_of_a_running_server(server):
    port = free_tcp_port()
    front = subprocess.Popen([sys.executable, "-m", "inlaid.cli", "http", "--address", server.address,
                              "--port", str(port), "--log-format", "text"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert front.poll() is None and time.monotonic() < deadline, front.stdout.read().decode()
                time.sleep(0.1)
        alone = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        answer = alone.completions.create(model="mlp-r16", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        with server.client() as client:
            assert answer.choices[0].text == client.generate(PROMPTS[0], task="mlp-r16", max_tokens=4).text
    finally:
        front.send_signal(signal.SIGTERM)
        assert front.wait(30) == 0


def test_health_and_sigterm_drain(server):
    """Last: SIGTERM. Health turns 503, new requests get 503 shutting_down, a long stream
    ends with OpenAI's error event, and the server (front included) exits 0."""
    # A new client: the module's may hold a connection the killed front had accepted.
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=300)
    code, _, body = _http(server, "GET", "/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    stream = api.completions.create(model="all-r32", prompt="Count to a thousand:", max_tokens=400,
                                    extra_body={"ignore_eos": True}, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (reply := _http(server, "GET", "/health"))[0] == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert reply[0] == 503 and json.loads(reply[2])["status"] == "shutting_down"
    with pytest.raises(openai.InternalServerError) as caught:
        api.completions.create(model="attn-r8", prompt="x", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "shutting_down"
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "shut down" in str(caught.value)
    assert server.process.wait(60) == 0
    with Client(server.address, timeout_s=1) as client, pytest.raises(TimeoutError):
        client.health()
