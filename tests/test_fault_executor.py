"""Executor faults against a real `inlaid serve` on loopback: an executor that closes its
socket before it exits (the lock-up of issue 13), one that hangs inside a step (step
timeout), kills at random points of a model load and of a request load, and SIGTERM while
a step hangs. Each asserts: the requests running on the lost executor get a typed error,
queued and later ones complete with the in-process engine's answer, health is answered
throughout, the dead process is reaped, and a new executor takes over.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from inlaid.client import AsyncClient, ExecutorFailedError, ShuttingDownError
from inlaid.engine.config import EngineConfig
from inlaid.protocol import BatchPlan, ChunkPlan, GenerateDone, SamplingParams
from inlaid.serve.executor import FAULT_ENV
from inlaid.serve.launcher import ServerProcess
from inlaid.serve.peers import PeerWatch
from inlaid.serve.executor_errors import ExecutorLostError
from inlaid.serve.supervisor import ExecutorSupervisor
from serving_helpers import (
    HEALTH_BOUND_S,
    PROMPTS,
    SHORT_TOKENS,
    TASKS,
    engine_settings,
    executor_pids,
    server_config,
    signal_process,
    until,
    wait_gone,
)

STEP_TIMEOUT_S = 10.0  # far above any step here (~0.1 s), even on a loaded machine
CLOSE_AFTER_PLAN = 8


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    config = server_config(model_dir, adapter_dirs, shutdown_grace_s=3.0, step_timeout_s=STEP_TIMEOUT_S)
    # The first executor answers its 8th plan, closes its socket and lingers 3 s before it
    # exits; the executors that replace it are healthy.
    fault = {"close_socket_after_plan": CLOSE_AFTER_PLAN, "exit_delay_s": 3.0, "generations": [1]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, json.dumps(fault))
        process = ServerProcess(config, workdir=tmp_path_factory.mktemp("fault-server"))
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def reference(server, serving_reference):
    return serving_reference


@pytest.fixture(scope="module")
def ready(server, reference):
    server.wait_ready(timeout_s=300)
    return server


async def _answers_match(client: AsyncClient, reference: dict) -> None:
    pairs = [(p, t) for p in PROMPTS[:2] for t in TASKS]
    results = await asyncio.gather(*(client.generate(p, task=t, max_tokens=SHORT_TOKENS) for p, t in pairs))
    for pair, result in zip(pairs, results):
        assert isinstance(result, GenerateDone) and result.token_ids == reference[(*pair, SHORT_TOKENS)], pair


async def _stat_at_least(client: AsyncClient, field: str, value: int) -> bool:
    return getattr(await client.stats(), field) >= value


async def _health_probe(client: AsyncClient, stop: asyncio.Event, latencies: list[float],
                        replies: list | None = None) -> None:
    while not stop.is_set():
        started = time.monotonic()
        reply = await client.health(timeout_s=HEALTH_BOUND_S)  # raises on no answer
        latencies.append(time.monotonic() - started)
        if replies is not None:
            replies.append((time.monotonic(), reply))
        await asyncio.sleep(0.05)


def test_an_executor_that_closes_its_socket_before_exiting_never_locks_the_coordinator(ready, reference):
    async def scenario():
        async with AsyncClient(ready.address, timeout_s=120) as client:
            await client.wait_ready(timeout_s=300)  # executor_pid is 0 while none is ready
            before = await client.stats()
            stop, latencies = asyncio.Event(), []
            probe = asyncio.create_task(_health_probe(client, stop, latencies))
            # Running when the socket closes: fails. Each step is one plan, so this one runs
            # into the fault at plan 8 whatever else happens.
            doomed = await asyncio.gather(*(client.generate(p, max_tokens=60, ignore_eos=True) for p in PROMPTS),
                                          return_exceptions=True)
            queued = [asyncio.create_task(client.generate(p, task=t, max_tokens=SHORT_TOKENS))
                      for p in PROMPTS[:2] for t in TASKS]
            await client.wait_ready(timeout_s=300)
            done = await asyncio.gather(*queued)
            stop.set()
            await probe
            return before, doomed, done, latencies, await client.stats()

    before, doomed, done, latencies, after = asyncio.run(scenario())
    assert all(isinstance(r, ExecutorFailedError) for r in doomed), doomed
    assert all(f"pid {before.executor_pid}" in str(r) for r in doomed), doomed
    assert any(cause in str(doomed[0]) for cause in ("closed its connection", "not connected", "died with")), doomed
    pairs = [(p, t) for p in PROMPTS[:2] for t in TASKS]
    assert [r.token_ids for r in done] == [reference[(*pair, SHORT_TOKENS)] for pair in pairs]
    assert latencies and max(latencies) < HEALTH_BOUND_S
    assert after.executor_restarts == before.executor_restarts + 1 and after.executor_pid != before.executor_pid
    assert wait_gone(before.executor_pid), "the lost executor was not reaped"
    assert after.kv_blocks_free == after.kv_blocks_total
    assert ready.process.poll() is None


def test_an_executor_that_hangs_in_a_step_is_killed_at_the_step_timeout(ready, reference):
    async def scenario():
        async with AsyncClient(ready.address, timeout_s=120) as client:
            await client.wait_ready(timeout_s=300)  # executor_pid is 0 while none is ready
            before = await client.stats()
            stream = await client.stream(PROMPTS[2], max_tokens=200, ignore_eos=True)
            pieces = stream.__aiter__()
            await pieces.__anext__()
            signal_process(before.executor_pid, signal.SIGSTOP)  # hung: alive, holding its socket, silent
            stop, latencies, healths = asyncio.Event(), [], []
            probe = asyncio.create_task(_health_probe(client, stop, latencies, healths))
            hung_at = time.monotonic()
            with pytest.raises(ExecutorFailedError, match="step timeout") as failed:
                async for _ in pieces:
                    pass
            waited = time.monotonic() - hung_at
            await client.wait_ready(timeout_s=300)
            await _answers_match(client, reference)
            stop.set()
            await probe
            return before, failed.value, waited, latencies, await client.stats(), healths, await client.health()

    before, error, waited, latencies, after, healths, health_after = asyncio.run(scenario())
    # health says "stalled" once the hung step has run a quarter of the step timeout (it
    # said "ok" until the kill), with how long; then "starting" while a new executor loads
    statuses = [reply.status for _, reply in healths]
    assert "stalled" in statuses, healths[-5:]
    first_stalled, first_starting = statuses.index("stalled"), statuses.index("starting")
    assert first_stalled < first_starting and "ok" not in statuses[first_stalled:first_starting], statuses
    assert (health_after.status, health_after.step_running_seconds < 1.0) == ("ok", True)
    assert health_after.executor_restarts == before.executor_restarts + 1
    assert waited < STEP_TIMEOUT_S + 30, waited  # the timeout counts from the plan, sent before the SIGSTOP
    assert f"pid {before.executor_pid}" in str(error)
    assert latencies and max(latencies) < HEALTH_BOUND_S  # the coordinator answered while the step hung
    assert wait_gone(before.executor_pid), "the hung executor was not killed and reaped"
    assert after.executor_restarts == before.executor_restarts + 1
    # ... and the log said so when health did (it used to say nothing until the kill)
    assert "a step is running long: health reads stalled" in ready.logs()


def test_executor_killed_at_random_points_of_a_request_load_and_of_its_model_load(ready, reference):
    rng = random.Random(13)

    async def scenario():
        async with AsyncClient(ready.address, timeout_s=300) as client:
            await client.wait_ready(timeout_s=300)  # executor_pid is 0 while none is ready
            before = await client.stats()
            # Under a request load, after a random number of generated tokens...
            jobs = [asyncio.create_task(client.generate(PROMPTS[i % 4], task=TASKS[i % 4], max_tokens=40,
                                                        ignore_eos=True)) for i in range(8)]
            target = before.tokens_generated + rng.randint(1, 60)
            await until(lambda: _stat_at_least(client, "tokens_generated", target))
            signal_process(before.executor_pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            # ...then its replacement, at a random moment of its model load (before its hello).
            async def replacement_started() -> bool:
                return any(pid != before.executor_pid for pid in executor_pids(ready.pid))

            await until(replacement_started, timeout_s=60)
            replacement = [pid for pid in executor_pids(ready.pid) if pid != before.executor_pid]
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            assert not (await client.health()).executor_ready
            signal_process(replacement[0], signal.SIGKILL)
            await client.wait_ready(timeout_s=300)
            await _answers_match(client, reference)
            return before, outcomes, await client.stats()

    before, outcomes, after = asyncio.run(scenario())
    # Nothing accepted is lost: each request either finished or got a typed error.
    assert all(isinstance(o, (GenerateDone, ExecutorFailedError)) for o in outcomes), outcomes
    assert any(isinstance(o, ExecutorFailedError) for o in outcomes)
    assert after.executor_restarts == before.executor_restarts + 2
    assert after.kv_blocks_free == after.kv_blocks_total


def test_an_executor_restarted_after_its_socket_file_was_removed_connects(ready, reference):
    """A /tmp cleaner (or an operator's rm) removed the coordinator's ipc directory; the running
    executor kept its connection, but its replacement could never connect: health said
    `starting` until the start timeout (600 s by default), every request held."""
    [ipc_dir] = Path(tempfile.gettempdir()).glob(f"inlaid-ipc-{ready.pid}-*")

    async def scenario():
        async with AsyncClient(ready.address, timeout_s=120) as client:
            await client.wait_ready(timeout_s=300)
            before = await client.stats()
            shutil.rmtree(ipc_dir)
            await _answers_match(client, reference)  # the live connection outlives the file
            signal_process(before.executor_pid, signal.SIGKILL)
            await client.wait_ready(timeout_s=120)  # bounded far below the start timeout
            await _answers_match(client, reference)
            return before, await client.stats()

    before, after = asyncio.run(scenario())
    assert after.executor_restarts == before.executor_restarts + 1
    assert "an ipc socket's file is gone; listening on it again" in ready.logs()
    assert list(ipc_dir.glob("executor-*.ipc"))


def test_sigterm_while_a_step_hangs_exits_in_bounded_time_and_leaves_no_process(ready):
    async def scenario():
        async with AsyncClient(ready.address, timeout_s=120) as client:
            await client.wait_ready(timeout_s=300)  # executor_pid is 0 while none is ready
            stats = await client.stats()
            jobs = [asyncio.create_task(client.generate(p, max_tokens=300, ignore_eos=True)) for p in PROMPTS]
            await until(lambda: _stat_at_least(client, "requests_running", len(PROMPTS)))
            signal_process(stats.executor_pid, signal.SIGSTOP)
            ready.process.send_signal(signal.SIGTERM)
            return stats.executor_pid, await asyncio.gather(*jobs, return_exceptions=True)

    started = time.monotonic()
    executor_pid, results = asyncio.run(scenario())
    assert all(isinstance(r, ShuttingDownError) for r in results), results
    assert ready.process.wait(60) == 0, ready.logs()[-3000:]
    assert time.monotonic() - started < 3.0 + 30  # the grace period, then the hung executor is killed
    assert wait_gone(executor_pid), "the hung executor outlived the coordinator"
    assert "executor still busy at shutdown; killing it" in ready.logs()


# ------------------------------------------------------------------ the supervisor alone
class _DeafPeerWatch(PeerWatch):
    """The socket monitor, silenced: only the send path can notice a closed executor socket."""

    def saw(self, identity_frame: object) -> None:
        pass

    async def run(self) -> None:
        await asyncio.Event().wait()


def test_a_plan_sent_into_a_closed_executor_socket_loses_the_executor_at_once(model_dir, tmp_path, monkeypatch):
    """The exact race of the lock-up: the executor has closed its socket, the coordinator has
    not seen the disconnect yet (here: its socket monitor is silenced) and sends a plan.
    ZeroMQ refuses it (EHOSTUNREACH); the supervisor must clear `ready` and fail the running
    requests before it raises, or the step loop would plan again at once, forever."""
    monkeypatch.setenv(FAULT_ENV, json.dumps({"close_socket_after_plan": 1, "exit_delay_s": 5.0}))
    monkeypatch.setattr("inlaid.serve.supervisor.PeerWatch", _DeafPeerWatch)
    lost: list[str] = []
    plan = [BatchPlan(step_id=i, chunks=[ChunkPlan(seq_id=0, token_ids=[1, 2, 3], start_pos=0, block_table=[0],
                                                   adapter_slot=-1, sample=True, sampling=SamplingParams(),
                                                   num_generated=0)]) for i in range(2)]

    async def scenario():
        supervisor = ExecutorSupervisor(EngineConfig(**engine_settings(model_dir)), f"ipc://{tmp_path}/executor.ipc",
                                        on_lost=lambda reason, restartable: lost.append(reason), on_fatal=lost.append,
                                        step_timeout_s=60)
        await supervisor.start()
        try:
            await asyncio.wait_for(supervisor.ready.wait(), 300)
            first = await supervisor.execute(plan[0])  # answered; then the executor closes its socket
            await asyncio.sleep(1.0)
            assert supervisor.ready.is_set()  # nothing has noticed yet
            process = supervisor._process
            with pytest.raises(ExecutorLostError, match="not connected"):
                await supervisor.execute(plan[1])
            cleared = not supervisor.ready.is_set()
            await asyncio.wait_for(process.wait(), 3.0)  # killed, not left to linger its 5 s
            return first, cleared, process.returncode
        finally:
            await supervisor.stop()

    first, cleared, returncode = asyncio.run(scenario())
    assert len(first.sampled) == 1 and cleared
    assert returncode == -signal.SIGKILL
    assert len(lost) == 1 and "is not connected" in lost[0]
