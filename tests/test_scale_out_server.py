"""Two CPU executors under one coordinator (`[executors] count = 2`), real processes on loopback.

A mixed-task load (hot, warm and rare tasks and the base model) is answered exactly as the
in-process engine answers it, both executors serve, each one's tasks, moves and adapter
hits are reported, and no task is starved. Then one executor is SIGKILLed while both run
full batches and more requests wait: only requests running on it fail (`executor_failed`;
one that had produced no token yet is queued again instead), every other accepted request
-- running on the survivor or waiting -- completes with the engine's answer, and the killed
executor is restarted and serves again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal

import pytest

from inlaid.client import AdapterFailedError, AsyncClient, ExecutorFailedError, GenerateResult
from inlaid.serve.launcher import ServerProcess

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "List three fruits:"]
# Zipf-like popularity: one hot task, a warm one, a rare one, and the base model.
MIX = ["attn-r8"] * 6 + ["mlp-r16"] * 3 + ["all-r32"] * 1 + [None] * 2
SHORT, LONG = 6, 40
SEATS = 4  # max_num_seqs per executor
ADMIN_TOKEN = "scale-out-admin-token-0123456789"


def _settings(model_dir) -> dict:  # type: ignore[no-untyped-def]
    return dict(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=SEATS, num_kv_blocks=256,
                block_size=16, max_lora_slots=2, max_lora_rank=32, max_model_len=512)


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):  # type: ignore[no-untyped-def]
    executor = {k: v for k, v in _settings(model_dir).items() if k != "model_dir"}
    config = {"model": {"dir": str(model_dir)}, "executor": executor, "executors": {"count": 2},
              "server": {"shutdown_grace_s": 5.0, "admin_token": ADMIN_TOKEN},
              "tasks": {name: str(path) for name, path in adapter_dirs.items()}}
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("scale-out"))
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def reference(model_dir, adapter_dirs):  # type: ignore[no-untyped-def]
    """The in-process engine's greedy answers, computed while the executors load."""
    from inlaid.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.local(EngineConfig(**{**_settings(model_dir), "max_num_seqs": 64, "max_lora_slots": 4}))
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, str(path))
    answers = {}
    for tokens, ignore_eos in ((SHORT, False), (LONG, True)):
        pairs = [(p, t) for p in PROMPTS for t in sorted(set(MIX), key=str)]
        outputs = engine.generate([p for p, _ in pairs], SamplingParams(max_tokens=tokens, ignore_eos=ignore_eos),
                                  [t for _, t in pairs])
        answers.update({(p, t, tokens): o.token_ids for (p, t), o in zip(pairs, outputs)})
    return answers


def _check(result: GenerateResult, reference: dict, prompt: str, task: str | None, tokens: int) -> None:
    assert isinstance(result, GenerateResult), result
    assert result.token_ids == reference[(prompt, task, tokens)], (prompt, task, tokens)


def test_two_executors_serve_a_mixed_load_and_survive_one_executor_kill(server, reference) -> None:
    server.wait_ready(timeout_s=300)  # both executors up (health's executor_ready needs all)

    async def scenario():  # type: ignore[no-untyped-def]
        async with AsyncClient(server.address, timeout_s=300) as client:
            # 1. A mixed-task load of 48 requests, all at once.
            jobs = [(PROMPTS[i % 4], MIX[i % len(MIX)]) for i in range(48)]
            mixed = await asyncio.gather(*(client.generate(p, task=t, max_tokens=SHORT) for p, t in jobs))
            stats = await client.stats()
            for (prompt, task), result in zip(jobs, mixed):
                _check(result, reference, prompt, task, SHORT)

            # 2. Both executors full (SEATS long requests each), four more waiting; then one dies.
            long_jobs = [(PROMPTS[i % 4], MIX[i % len(MIX)]) for i in range(2 * SEATS + 4)]
            tasks = [asyncio.create_task(client.generate(p, task=t, max_tokens=LONG, ignore_eos=True))
                     for p, t in long_jobs]
            for _ in range(3000):
                snapshot = await client.stats()
                # 3 tokens a request on average: with 1 a request, all could be the other executor's
                # (a clean-clone run killed an executor whose requests had no token yet: none failed)
                if [e.requests_running for e in snapshot.executors] == [SEATS, SEATS] and \
                        snapshot.tokens_generated >= stats.tokens_generated + 3 * 2 * SEATS:
                    break
                await asyncio.sleep(0.02)
            victim = snapshot.executors[1]
            os.kill(victim.pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            await client.wait_ready(timeout_s=300)
            # 3. Recovered: a new batch is served by both executors again.
            after = await asyncio.gather(*(client.generate(p, task=t, max_tokens=SHORT) for p, t in jobs[:16]))
            return stats, snapshot, outcomes, after, await client.stats()

    stats, snapshot, outcomes, after, final = asyncio.run(scenario())

    # The mixed load: both executors served, the figures are reported, no task starved.
    assert len(stats.executors) == 2
    served = [e.tasks_served for e in stats.executors]
    assert all(sum(s.values()) > 0 for s in served), served
    assert sum(sum(s.values()) for s in served) == 48
    assert {"attn-r8", "mlp-r16", "all-r32", "__base__"} == set().union(*served)
    admissions = sum(e.adapter_admissions for e in stats.executors)
    hits = sum(e.adapter_hits for e in stats.executors)
    assert admissions >= 40 and 0 < hits <= admissions  # 40 adapter requests, admitted at least once

    # The kill: only requests running on the killed executor failed -- those with output; one
    # it had just admitted, with no token yet, is computed again and answers like the rest.
    victim = snapshot.executors[1]
    assert [e.requests_running for e in snapshot.executors] == [SEATS, SEATS]
    assert snapshot.requests_waiting == 4
    failed = [o for o in outcomes if isinstance(o, ExecutorFailedError)]
    # at most its SEATS running ones; none when none had a token yet (all computed again: checked below)
    assert len(failed) <= SEATS, outcomes
    assert all(f"pid {victim.pid}" in str(f) for f in failed)
    for (prompt, task), outcome in zip([(PROMPTS[i % 4], MIX[i % len(MIX)]) for i in range(2 * SEATS + 4)], outcomes):
        if not isinstance(outcome, ExecutorFailedError):
            _check(outcome, reference, prompt, task, LONG)

    # Recovered: executor 1 restarted (a new process) and serves again; nothing is left over.
    for i, result in enumerate(after):
        _check(result, reference, PROMPTS[i % 4], MIX[i % len(MIX)], SHORT)
    restarted = final.executors[1]
    assert restarted.ready and restarted.restarts == 1 and restarted.pid not in (0, victim.pid)
    # it ended more requests than it had before the kill plus the ones that failed on it
    assert sum(restarted.tasks_served.values()) > sum(victim.tasks_served.values()) + len(failed)
    assert final.executors[0].restarts == 0
    assert final.requests_running == final.requests_waiting == 0
    assert final.kv_blocks_free == final.kv_blocks_total

    # Every log line about an executor names which one: two executors' lines read alike (an
    # outside probe counted "layer swapped" lines to tell that both had swapped a layer).
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    assert [line["executor"] for line in lines if line["msg"] == "executor lost"] == [1]
    ready = [(line["executor"], line["pid"]) for line in lines if line["msg"] == "executor ready"]
    assert sorted(ready) == sorted([(0, final.executors[0].pid), (1, victim.pid), (1, restarted.pid)]), ready


def test_an_executor_that_cannot_load_an_adapter_stops_drawing_its_work(server, reference, adapter_dirs,
                                                                       tmp_path) -> None:
    """A task's weights damaged after executor 0 loaded them (it keeps a host copy): executor 1
    fails each load. It drew the task's spill all the same, again and again (an outside probe:
    16 of 24 requests failed, twice, while executor 0 served the task). After its first failure
    it takes no more of that task's work while executor 0 can: the next rounds all succeed."""
    server.wait_ready(timeout_s=300)
    fragile = tmp_path / "fragile"
    shutil.copytree(adapter_dirs["attn-r8"], fragile)

    async def scenario():  # type: ignore[no-untyped-def]
        async with AsyncClient(server.address, timeout_s=300, admin_token=ADMIN_TOKEN) as client:
            await client.add_task("fragile", str(fragile))
            first = await client.generate(PROMPTS[0], task="fragile", max_tokens=SHORT)  # executor 0 (pack)
            (fragile / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
            rounds = []
            for _ in range(3):  # twice the seats at once: the spill reaches executor 1 while it may
                rounds.append(await asyncio.gather(*(
                    client.generate(PROMPTS[i % 4], task="fragile", max_tokens=SHORT) for i in range(2 * SEATS)),
                    return_exceptions=True))
            await client.remove_task("fragile")
            return first, rounds

    first, rounds = asyncio.run(scenario())
    _check(first, reference, PROMPTS[0], "attn-r8", SHORT)
    failures = [[isinstance(o, AdapterFailedError) for o in outcomes] for outcomes in rounds]
    assert all(isinstance(o, (AdapterFailedError, GenerateResult)) for r in rounds for o in r), rounds
    # executor 1's first load fails its requests of that round at most; later rounds run on executor 0
    assert sum(failures[0]) <= SEATS and not any(failures[1]) and not any(failures[2]), failures
    for outcomes in rounds:
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, GenerateResult):
                _check(outcome, reference, PROMPTS[i % 4], "attn-r8", SHORT)
