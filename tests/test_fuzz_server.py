"""Fuzz tests against one real `inlaid serve` (coordinator + executor) on a loopback port.

Unauthenticated clients send random and structured-invalid frames of every message type,
extreme sampling values and disconnect mid-stream; an admin adds adapters corrupted in
every way `adapter_corruptions` knows, and one that breaks under load. Each check asserts:
a typed error to the offending client only, carrying its request id; every other request
completes with the in-process engine's answer; the server answers health throughout; the
coordinator's memory stays flat. Faults that end or restart the executor are in
test_fault_executor.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest
import zmq

from adapter_corruptions import CONFIG_CORRUPTIONS, CORRUPTIONS, copy_adapter
from inlaid.client import AdapterFailedError, AsyncClient, InvalidRequestError, UnauthorizedError
from inlaid.protocol import (
    PROTOCOL_VERSION,
    ClientRequest,
    ErrorCode,
    ErrorReply,
    GenerateDone,
    ServerReply,
    TextChunk,
)
from inlaid.serve.launcher import ServerProcess
from serving_helpers import (
    HEALTH_BOUND_S,
    LONG_PROMPT,
    LONG_TOKENS,
    MAX_MODEL_LEN,
    PROMPTS,
    SHORT_TOKENS,
    TASKS,
    rss_bytes,
    server_config,
)

ADMIN_TOKEN = "fuzz-admin-token-0123456789"


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    config = server_config(model_dir, adapter_dirs, admin_token=ADMIN_TOKEN, shutdown_grace_s=5.0)
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("fuzz-server"))
    yield process
    assert process.terminate() == 0, process.logs()[-3000:]  # SIGTERM while idle: a clean exit


@pytest.fixture(scope="module")
def reference(server, serving_reference):
    return serving_reference  # computed while the server loads


@pytest.fixture(scope="module")
def ready(server, reference):
    server.wait_ready(timeout_s=300)
    return server


def _dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


# ------------------------------------------------------------------ frames
VALID = {
    "hello": {"protocol_version": PROTOCOL_VERSION, "client": "fuzz"},
    "generate": {"prompt": "hi", "task": None, "sampling": {"max_tokens": 1}, "stream": False, "deadline_s": 30.0},
    "cancel": {},
    "list_tasks": {},
    "health": {},
    "stats": {},
    "add_task": {"name": "t", "adapter_dir": "/nonexistent", "token": ""},
    "remove_task": {"name": "t", "token": ""},
}
WRONG_VALUES = [7, -1.5, "text", [1, "x"], {"k": 1}, None, True, b"\x00\xff", 2**64 - 1, ""]
_strict = msgspec.msgpack.Decoder(ClientRequest)


def _structured_cases() -> list[tuple[dict, str]]:
    """Messages of every type, each broken one way (a field dropped, mistyped or unknown);
    with the request id each error must carry."""
    cases: list[tuple[dict, str]] = []
    for tag, fields in VALID.items():
        base = {"type": tag, "request_id": "", **fields}
        for field in [*base, "bogus_field"]:
            mutations = [("drop", None)] + [("set", value) for value in WRONG_VALUES]
            for how, value in mutations:
                if field == "type":
                    continue
                message = dict(base)
                request_id = f"{tag}-{field}-{how}-{len(cases)}"
                message["request_id"] = request_id
                if how == "drop":
                    message.pop(field, None)
                else:
                    message[field] = value
                try:
                    _strict.decode(msgspec.msgpack.encode(message))
                    continue  # still a valid message: not a malformed case
                except msgspec.ValidationError:
                    pass
                readable = message.get("request_id")
                cases.append((message, readable if isinstance(readable, str) else ""))
    return cases


def test_fuzzed_frames_of_every_type_get_typed_errors_naming_their_request(ready):
    rng = random.Random(1313)
    before = rss_bytes(ready.pid)
    sock = _dealer(ready.address)

    def exchange(frames: list[bytes]) -> ErrorReply:
        sock.send_multipart(frames)
        assert sock.poll(30_000), f"no answer to {frames[0][:60]!r}"
        reply = msgspec.msgpack.decode(sock.recv(), type=ServerReply)
        assert isinstance(reply, ErrorReply), (frames[0][:60], reply)
        return reply

    try:
        structured = _structured_cases()
        assert len(structured) > 200
        for message, request_id in structured:
            reply = exchange([msgspec.msgpack.encode(message)])
            assert (reply.code, reply.request_id) == (ErrorCode.MALFORMED, request_id), (message, reply)
        for _ in range(60):  # random bytes, and random msgpack maps that are nearly messages
            reply = exchange([rng.randbytes(rng.randint(0, 400))])
            assert reply.code in (ErrorCode.MALFORMED, ErrorCode.UNKNOWN_MESSAGE) and reply.request_id == ""
        for i in range(60):
            message = {rng.choice(["type", "request_id", "prompt", "x"]): rng.choice(WRONG_VALUES) for _ in range(3)}
            message |= {"type": rng.choice([*VALID, "shutdown", "eval"]), "request_id": f"rnd-{i}"}
            raw = msgspec.msgpack.encode(message)
            try:
                _strict.decode(raw)
                continue
            except msgspec.ValidationError:
                pass
            reply = exchange([raw])
            expected = ErrorCode.MALFORMED if message["type"] in VALID else ErrorCode.UNKNOWN_MESSAGE
            assert (reply.code, reply.request_id) == (expected, f"rnd-{i}")
        # Well-formed messages with values the server must refuse, each by its request id.
        semantic = [
            ({"type": "generate", "prompt": "hi", "sampling": {"temperature": float("inf")}}, "invalid_request"),
            ({"type": "generate", "prompt": "hi", "sampling": {"top_p": float("nan")}}, "invalid_request"),
            ({"type": "generate", "prompt": "hi", "sampling": {"top_k": -1}}, "invalid_request"),
            ({"type": "generate", "prompt": "hi", "deadline_s": float("nan")}, "invalid_request"),
            ({"type": "generate", "prompt": "hi", "deadline_s": float("inf")}, "invalid_request"),
            ({"type": "generate", "prompt_token_ids": [-1]}, "invalid_request"),
            ({"type": "generate", "prompt": ""}, "invalid_request"),
            ({"type": "generate", "messages": []}, "invalid_request"),
            ({"type": "generate", "messages": [{"role": "user", "content": "hi", "name": "x"}]}, "malformed"),
            ({"type": "generate", "prompt": "hi", "task": "no-such-task"}, "unknown_task"),
            ({"type": "generate", "prompt_token_ids": [5] * MAX_MODEL_LEN}, "context_length"),
            ({"type": "hello", "protocol_version": -1}, "protocol_version"),
            ({"type": "add_task", "name": "x", "adapter_dir": "/etc"}, "unauthorized"),
            ({"type": "remove_task", "name": "attn-r8", "token": "wrong"}, "unauthorized"),
        ]
        for i, (message, code) in enumerate(semantic):
            reply = exchange([msgspec.msgpack.encode({**message, "request_id": f"sem-{i}"})])
            assert (reply.code, reply.request_id) == (code, f"sem-{i}"), (message, reply)
        assert exchange([b"a", b"b"]).code == ErrorCode.MALFORMED
        reply = exchange([msgspec.msgpack.encode({"type": "health", "request_id": "big", "x": "y" * (2 << 20)})])
        assert (reply.code, reply.request_id) == (ErrorCode.FRAME_TOO_LARGE, "big")
    finally:
        sock.close()
    assert ready.process.poll() is None, "the coordinator died"
    assert "internal error" not in ready.logs()
    with ready.client() as client:
        assert client.health(timeout_s=HEALTH_BOUND_S).status == "ok"
    assert rss_bytes(ready.pid) - before < 32 << 20, "the coordinator's memory grew under garbage"


# ------------------------------------------------------------------ sampling
SERVED = [dict(temperature=t) for t in (1e-300, 1e-40, 5e-324, 1e-8)] + [
    dict(temperature=1.7976931348623157e308, seed=2**64 - 1), dict(temperature=1.0, top_k=2**62, seed=-(2**63)),
    dict(temperature=0.7, top_p=5e-324, seed=0), dict(temperature=1e300, top_k=1), dict(temperature=3.0, top_p=1e-300),
]
REFUSED = [dict(temperature=float("inf")), dict(temperature=float("nan")), dict(top_p=float("nan")),
           dict(top_p=float("inf")), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=0), dict(temperature=-5e-324)]


def test_sampling_extremes_are_served_or_refused_and_never_touch_others(ready, reference):
    prompt = PROMPTS[0]
    greedy = reference[(prompt, None, SHORT_TOKENS)]

    async def scenario():
        async with AsyncClient(ready.address, timeout_s=300) as client:
            long = asyncio.create_task(client.generate(LONG_PROMPT, max_tokens=LONG_TOKENS, ignore_eos=True))
            served = [client.generate(prompt, max_tokens=SHORT_TOKENS, **extreme) for extreme in SERVED]
            refused = [client.generate(prompt, **{"max_tokens": SHORT_TOKENS, **bad}) for bad in REFUSED]
            results = await asyncio.gather(*served, *refused, return_exceptions=True)
            # The sequence: a tiny temperature three times in a row, alone.
            in_a_row = [await client.generate(prompt, max_tokens=SHORT_TOKENS, temperature=1e-300) for _ in range(3)]
            return await long, results, in_a_row, await client.stats()

    with ready.client() as client:
        before = client.stats()
    long, results, in_a_row, stats = asyncio.run(scenario())
    assert long.token_ids == reference[(LONG_PROMPT, None, LONG_TOKENS)]
    served, refused = results[: len(SERVED)], results[len(SERVED) :]
    for extreme, result in zip(SERVED, served):
        assert isinstance(result, GenerateDone), (extreme, result)
        assert len(result.token_ids) >= 1 and all(0 <= t < 49152 for t in result.token_ids)
        if extreme["temperature"] < 1e-30 or extreme.get("top_k") == 1 or extreme.get("top_p", 1) < 1e-200:
            # The limit of softmax(x / T) as T -> 0 (or a nucleus of one) is the argmax.
            assert result.token_ids == greedy, extreme
    for bad, result in zip(REFUSED, refused):
        assert isinstance(result, InvalidRequestError), (bad, result)
    assert all(r.token_ids == greedy for r in in_a_row)
    assert stats.executor_restarts == before.executor_restarts and stats.requests_failed == before.requests_failed


# ------------------------------------------------------------------ adapters
def test_add_task_refuses_every_corrupted_adapter_with_a_typed_error(ready, adapter_dirs, tmp_path):
    cases = {**CORRUPTIONS, **CONFIG_CORRUPTIONS}
    with ready.client(timeout_s=60) as admin:
        for index, (what, (corrupt, phrase)) in enumerate(cases.items()):
            adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, f"case{index}")
            corrupt(adapter)
            with pytest.raises(InvalidRequestError, match=phrase):  # an answer, not a timeout
                admin.add_task(f"bad-{index}", str(adapter))
        assert not [t.name for t in admin.list_tasks() if t.name.startswith("bad-")]
        with pytest.raises(InvalidRequestError, match="directory not found"):
            admin.add_task("nowhere", str(tmp_path / "missing"))
    with ready.client(admin_token=None) as anonymous, pytest.raises(UnauthorizedError):
        anonymous.add_task("sneaky", str(adapter_dirs["attn-r8"]))
    assert "internal error" not in ready.logs()


def test_an_adapter_that_breaks_under_load_fails_only_its_own_requests(ready, reference, adapter_dirs, tmp_path):
    """Its requests share steps with a long stream and with good requests of other tasks;
    only they fail (adapter_failed), the executor stays, and the rest match the engine."""
    fragile = copy_adapter(adapter_dirs["all-r32"], tmp_path, "fragile")
    good = [(PROMPTS[i], TASKS[i]) for i in range(4)]

    async def scenario():
        async with AsyncClient(ready.address, timeout_s=300, admin_token=ADMIN_TOKEN) as client:
            before = await client.stats()
            await client.add_task("fragile", str(fragile))
            (fragile / "adapter_model.safetensors").write_bytes(os.urandom(4096))
            stream = await client.stream(LONG_PROMPT, max_tokens=LONG_TOKENS, ignore_eos=True)
            pieces = stream.__aiter__()
            first = await pieces.__anext__()  # the long request is running: the next ones join its steps
            jobs = [client.generate(p, task="fragile", max_tokens=SHORT_TOKENS) for p in PROMPTS[:3]]
            jobs += [client.generate(p, task=t, max_tokens=SHORT_TOKENS) for p, t in good]
            started = time.monotonic()
            health = await client.health(timeout_s=HEALTH_BOUND_S)
            health_s = time.monotonic() - started
            results = await asyncio.gather(*jobs, return_exceptions=True)
            rest = [chunk async for chunk in pieces]
            await client.remove_task("fragile")
            return before, first, rest, stream.result, results, health, health_s, await client.stats()

    before, first, rest, long, results, health, health_s, after = asyncio.run(scenario())
    assert health.status == "ok" and health_s < HEALTH_BOUND_S
    assert long.token_ids == reference[(LONG_PROMPT, None, LONG_TOKENS)]
    assert [t for c in [first, *rest] for t in c.token_ids] == long.token_ids
    for result in results[:3]:
        assert isinstance(result, AdapterFailedError) and "'fragile' could not be loaded" in str(result), result
    for (prompt, task), result in zip(good, results[3:]):
        assert isinstance(result, GenerateDone) and result.token_ids == reference[(prompt, task, SHORT_TOKENS)]
    assert (after.executor_pid, after.executor_restarts) == (before.executor_pid, before.executor_restarts)
    assert after.kv_blocks_free == after.kv_blocks_total


# ------------------------------------------------------------------ disconnects
def _wait_stats(client, condition, timeout_s: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        if condition(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_has_its_request_cancelled(ready):
    generate = {"type": "generate", "prompt": LONG_PROMPT, "stream": True,
                "sampling": {"max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True}}
    with ready.client() as observer:
        before = observer.stats()
        # 1. A raw socket closed after the first streamed chunk.
        sock = _dealer(ready.address)
        sock.send(msgspec.msgpack.encode({**generate, "request_id": "leaver"}))
        assert sock.poll(120_000)
        assert isinstance(msgspec.msgpack.decode(sock.recv(), type=ServerReply), TextChunk)
        sock.close()
        stats = _wait_stats(observer, lambda s: s.requests_abandoned == before.requests_abandoned + 1)
        assert stats.requests_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total
        # 2. A client process killed mid-stream (its socket never closes cleanly from its side).
        script = textwrap.dedent(f"""
            from inlaid.client import Client
            with Client({ready.address!r}) as client:
                for chunk in client.stream({LONG_PROMPT!r}, max_tokens={MAX_MODEL_LEN - 32}, ignore_eos=True):
                    print("chunk", flush=True)
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "chunk"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        stats = _wait_stats(observer, lambda s: s.requests_abandoned == before.requests_abandoned + 2)
        assert stats.requests_abandoned == before.requests_abandoned + 2
        assert stats.requests_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total
        # Nearly all of the 2 x 480 tokens they asked for were never computed.
        assert stats.tokens_generated - before.tokens_generated < MAX_MODEL_LEN - 32
    assert '"client disconnected; its requests are cancelled"' in ready.logs()
