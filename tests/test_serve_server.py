"""The server end to end: a real `inlaid serve` process (coordinator + executor) on a free
loopback port, driven through the SDK and through raw sockets.

Every answer is compared with the in-process engine's greedy answer for the same prompt
and task (serve_harness.py). One server serves the whole module; the tests that change its
state (back pressure, executor kill, SIGTERM) are in test_serve_server_faults.py, on a
server of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from inlaid.client import (
    AdapterFailedError,
    AsyncClient,
    ContextLengthError,
    DeadlineExceededError,
    FrameTooLargeError,
    InvalidRequestError,
    UnauthorizedError,
    UnknownTaskError,
)
from inlaid.protocol import PROTOCOL_VERSION, ErrorReply, Hello, ServerReply
from serve_harness import (MAX_MODEL_LEN, MAX_TOKENS, PROMPTS, TASKS, _assert_matches,  # noqa: F401
                           ready_server, reference, server)  # (ready_server, reference, server: the module's fixtures)


def test_200_concurrent_mixed_task_requests_match_the_engine(ready_server, reference):
    jobs = [(PROMPTS[i % len(PROMPTS)], TASKS[(i // len(PROMPTS) + i) % len(TASKS)]) for i in range(200)]

    async def run_all():
        async with AsyncClient(ready_server.address, timeout_s=600) as client:
            return await asyncio.gather(*(client.generate(p, task=t, max_tokens=MAX_TOKENS) for p, t in jobs))

    started = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - started
    for (prompt, task), result in zip(jobs, results):
        _assert_matches(result, reference[(prompt, task)], f"{prompt!r} / {task}")
    assert len({(p, t) for p, t in jobs}) == len(PROMPTS) * len(TASKS)  # every pair was exercised
    with ready_server.client() as client:
        stats = client.stats()
    assert stats.requests_running == 0 and stats.requests_waiting == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    print(f"200 requests in {elapsed:.1f} s, mean step {stats.mean_step_seconds * 1e3:.1f} ms")


def test_streaming_sync_and_async(ready_server, reference):
    prompt, task = PROMPTS[1], "all-r32"
    expected = reference[(prompt, task)]
    with ready_server.client() as client:
        stream = client.stream(prompt, task=task, max_tokens=MAX_TOKENS)
        chunks = list(stream)
    assert len(chunks) >= 2, "a streamed answer arrives in pieces"
    assert "".join(c.text for c in chunks) == stream.result.text
    assert [t for c in chunks for t in c.token_ids] == stream.result.token_ids
    _assert_matches(stream.result, expected, "sync stream")

    async def run_async():
        async with AsyncClient(ready_server.address) as client:
            stream = await client.stream(prompt, task=task, max_tokens=MAX_TOKENS)
            pieces = [chunk async for chunk in stream]
            return pieces, stream.result

    pieces, result = asyncio.run(run_async())
    assert "".join(c.text for c in pieces) == result.text
    _assert_matches(result, expected, "async stream")


def test_cancellation_frees_kv_blocks(ready_server):
    with ready_server.client() as client:
        stream = client.stream("Tell me a very long story about the sea.", task="mlp-r16", max_tokens=200,
                               ignore_eos=True)
        chunks = iter(stream)
        next(chunks)
        busy = client.stats()
        assert busy.requests_running == 1 and busy.kv_blocks_free < busy.kv_blocks_total
        stream.cancel()
        rest = list(chunks)
        assert stream.result.finish_reason == "cancelled"
        assert len(stream.result.token_ids) < 200
        assert len(rest) < 200
        idle = client.stats()
        assert idle.requests_running == 0 and idle.kv_blocks_free == idle.kv_blocks_total

    async def cancel_by_task_cancellation():
        async with AsyncClient(ready_server.address) as client:
            task = asyncio.create_task(client.generate("Count to one thousand:", max_tokens=200, ignore_eos=True))
            for _ in range(400):
                if (await client.stats()).requests_running == 1:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                stats = await client.stats()
                if stats.requests_running == 0:
                    return stats
                await asyncio.sleep(0.05)
            return stats

    stats = asyncio.run(cancel_by_task_cancellation())
    assert stats.requests_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_bad_requests_get_typed_errors_and_the_server_keeps_serving(ready_server, reference):
    with ready_server.client() as client:
        with pytest.raises(UnknownTaskError):
            client.generate("hi", task="no-such-task")
        with pytest.raises(ContextLengthError):
            client.generate(prompt_token_ids=[42] * (MAX_MODEL_LEN + 10))
        for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 0}, {"top_k": -2},
                    {"temperature": float("nan")}, {"stop": [""]}):
            with pytest.raises(InvalidRequestError):
                client.generate("hi", **bad)
        with pytest.raises(InvalidRequestError):
            client.generate()  # no prompt at all
        with pytest.raises(InvalidRequestError):
            client.generate("hi", messages=[{"role": "user", "content": "hi"}])  # two prompts
        with pytest.raises(InvalidRequestError):
            client.generate(prompt_token_ids=[10**9])
        for stop_ids in ([-5], [10**9]):  # a stop rule that could never fire was accepted silently
            with pytest.raises(InvalidRequestError, match=r"stop_token_ids must be integers in \[0, "):
                client.generate("hi", stop_token_ids=stop_ids)
        with pytest.raises(InvalidRequestError):
            client.generate("hi", deadline_s=-1)
        with pytest.raises(FrameTooLargeError):
            client.generate("word " * 300_000)  # 1.5 MB: over the 1 MiB frame limit
        with pytest.raises(DeadlineExceededError):
            client.generate("Write an essay.", max_tokens=200, ignore_eos=True, deadline_s=0.5)
        # Chat messages work, and a good request right after all that is answered correctly.
        assert client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=2).token_ids
        _assert_matches(client.generate(PROMPTS[0], task="attn-r8", max_tokens=MAX_TOKENS),
                        reference[(PROMPTS[0], "attn-r8")], "after bad requests")
        stats = client.stats()
        assert stats.kv_blocks_free == stats.kv_blocks_total


def _raw_reply(sock: zmq.Socket, payload: list[bytes]) -> ErrorReply:
    sock.send_multipart(payload)
    assert sock.poll(30_000), "the coordinator did not answer"
    reply = msgspec.msgpack.decode(sock.recv(), type=ServerReply)
    assert isinstance(reply, ErrorReply), reply
    return reply


def test_garbage_never_kills_the_coordinator(ready_server, reference):
    host, port = ready_server.address[len("tcp://"):].rsplit(":", 1)
    # Not even ZeroMQ: raw bytes on the TCP port.
    for garbage in (b"\x00\xff" * 500, os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(garbage)
    encode = msgspec.msgpack.encode
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ready_server.address)
    try:
        cases = [
            ([b"\xc1\xc1 not msgpack"], "malformed", ""),
            ([b""], "malformed", ""),
            ([encode([1, 2, 3])], "malformed", ""),
            ([encode({"type": "launch_missiles", "request_id": "x1"})], "unknown_message_type", "x1"),
            ([encode({"type": "generate", "request_id": "x2", "sampling": "hot"})], "malformed", "x2"),
            ([encode({"type": "generate", "request_id": 7, "prompt": "hi"})], "malformed", ""),
            ([encode({"type": "cancel"})], "malformed", ""),
            ([b"a", b"b"], "malformed", ""),
            ([b"\x81\xa4type\xa1\x9a"], "malformed", ""),  # invalid UTF-8 inside
            ([b"\x81\x91\x01\x01"], "malformed", ""),  # a map keyed by an array
            ([b"\x91" * 200_000], "malformed", ""),  # nested too deep
            ([b"\xff" * 100], "malformed", ""),
            ([b"\x92" + b"\x00" * (2 << 20)], "frame_too_large", ""),
            ([encode(Hello(request_id="x3", protocol_version=PROTOCOL_VERSION + 1))], "protocol_version", "x3"),
        ]
        for frames, code, request_id in cases:
            reply = _raw_reply(sock, frames)
            assert (reply.code, reply.request_id) == (code, request_id), (frames[0][:40], reply)
    finally:
        sock.close()
    assert ready_server.process.poll() is None, "the coordinator died"
    assert "internal error" not in ready_server.logs(), "garbage must be classified, not crash a handler"
    with ready_server.client() as client:
        assert client.health().status == "ok"
        _assert_matches(client.generate(PROMPTS[3], task="mlp-r16", max_tokens=MAX_TOKENS),
                        reference[(PROMPTS[3], "mlp-r16")], "after garbage")


def test_admin_calls_need_the_token(ready_server, reference, adapter_dirs, tmp_path):
    with ready_server.client(admin_token=None) as anonymous:
        with pytest.raises(UnauthorizedError):
            anonymous.add_task("extra", str(adapter_dirs["attn-r8"]))
        with pytest.raises(UnauthorizedError):
            anonymous.remove_task("attn-r8")
    with ready_server.client(admin_token="wrong-token-wrong-token") as impostor:
        with pytest.raises(UnauthorizedError):
            impostor.add_task("extra", str(adapter_dirs["attn-r8"]))
    with ready_server.client() as admin:
        assert "extra" not in {t.name for t in admin.list_tasks()}
        with pytest.raises(InvalidRequestError):
            admin.add_task("broken", str(tmp_path))  # not a PEFT adapter directory
        admin.add_task("extra", str(adapter_dirs["attn-r8"]))
        assert "extra" in {t.name for t in admin.list_tasks()}
        _assert_matches(admin.generate(PROMPTS[5], task="extra", max_tokens=MAX_TOKENS),
                        reference[(PROMPTS[5], "attn-r8")], "task added at run time")
        admin.remove_task("extra")
        with pytest.raises(UnknownTaskError):
            admin.generate("hi", task="extra")


def test_an_adapter_that_breaks_after_it_was_added_fails_its_requests_only(ready_server, reference, adapter_dirs,
                                                                          tmp_path):
    """An adapter that passes AddTask but cannot be loaded later (weights file corrupted
    afterwards): its request gets a typed error, the executor stays, others are served."""
    fragile = tmp_path / "fragile"
    shutil.copytree(adapter_dirs["attn-r8"], fragile)
    with ready_server.client() as admin:
        before = admin.stats()
        added = admin.add_task_reply("fragile", str(fragile))
        assert "'fragile'" in added.message and added.replaces_config_entry is None
        # the config's own path again: nothing read again, and said so (no "replaces the config's entry")
        again = admin.add_task_reply("attn-r8", adapter_dirs["attn-r8"])
        assert again.already_served and again.replaces_config_entry is None, again
        # the same weights from another path under a config task's name: the reply names the entry it overrides
        shutil.copytree(adapter_dirs["attn-r8"], tmp_path / "attn-copy")
        replaced = admin.add_task_reply("attn-r8", str(tmp_path / "attn-copy")).replaces_config_entry
        assert replaced is not None and replaced.adapter_dir == str(adapter_dirs["attn-r8"]), replaced
        assert not replaced.kept_across_restarts  # no state_dir
        (fragile / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        with pytest.raises(AdapterFailedError, match="'fragile' could not be loaded"):
            admin.generate(PROMPTS[0], task="fragile", max_tokens=4)
        deadline, failed = time.monotonic() + 30, []
        while not failed and time.monotonic() < deadline:  # the log line is written after the reply is sent
            failed = [json.loads(line) for line in ready_server.logs().splitlines()
                      if '"request failed"' in line and "adapter_failed" in line]
            time.sleep(0.1)
        assert failed and failed[-1]["level"] == "warning" and failed[-1]["task"] == "fragile", failed
        admin.remove_task("fragile")
        _assert_matches(admin.generate(PROMPTS[2], task="attn-r8", max_tokens=MAX_TOKENS),
                        reference[(PROMPTS[2], "attn-r8")], "after a failed adapter load")
        after = admin.stats()
    assert after.executor_restarts == before.executor_restarts and after.executor_pid == before.executor_pid
    assert after.kv_blocks_free == after.kv_blocks_total


def test_client_cli(ready_server, reference):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inlaid.cli", "client", "--address", ready_server.address, *args],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "INLAID_ADMIN_TOKEN": ""})

    done = cli("generate", PROMPTS[4], "--task", "mlp-r16", "--max-tokens", str(MAX_TOKENS), "--stream")
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference[(PROMPTS[4], "mlp-r16")].text + "\n"
    # --json --stream: a JSON line per chunk, then the result's (it printed the result alone, at the end)
    done = cli("--json", "generate", PROMPTS[4], "--task", "mlp-r16", "--max-tokens", str(MAX_TOKENS), "--stream")
    *chunks, result = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and len(chunks) > 1 and {chunk["type"] for chunk in chunks} == {"chunk"}
    assert "".join(chunk["text"] for chunk in chunks) == result["text"] == reference[(PROMPTS[4], "mlp-r16")].text
    done = cli("--json", "health")
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "ok"
    done = cli("health")  # readable lines, not a dataclass's repr
    assert done.returncode == 0 and "status: ok" in done.stdout.splitlines() and "HealthReply(" not in done.stdout
    assert "requantizer: unavailable" in done.stdout.splitlines()  # a float base: nothing to re-quantize
    done = cli("--json", "stats")
    requantizer = json.loads(done.stdout)["requantizer"]
    assert done.returncode == 0 and requantizer["state"] == "unavailable" and requantizer["pid"] == 0
    assert requantizer["unavailable_because"].startswith("the server serves a full-precision base")
    done = cli("tasks")
    assert done.returncode == 0 and "attn-r8" in done.stdout
    done = cli("generate", "hi", "--task", "missing")
    assert done.returncode == 1 and "unknown_task" in done.stderr
    done = cli("add-task", "x", "/tmp")
    assert done.returncode == 1 and "unauthorized" in done.stderr
    assert "INLAID_ADMIN_TOKEN is empty" in done.stderr  # the env above sets it empty
