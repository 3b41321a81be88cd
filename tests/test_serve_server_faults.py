"""The server end to end under faults, on its own server: a client's flood, an executor killed under load, SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from inlaid.client import AsyncClient, DeadlineExceededError, ExecutorFailedError, OverloadedError, ShuttingDownError
from inlaid.protocol import GenerateDone
from serve_harness import (MAX_MODEL_LEN, MAX_PENDING, MAX_TOKENS, PROMPTS, TASKS, _assert_matches,  # noqa: F401
                           ready_server, reference, server)  # (ready_server, reference, server: the module's fixtures)
from serving_helpers import signal_process


def test_back_pressure_answers_overloaded(ready_server):
    """A burst beyond max_pending_requests from one client: it is admitted up to the last
    tenth of the limit, which the server keeps for other clients, and the rest of it gets
    'overloaded'; another client's request is then admitted and answered, and a third
    client's too, up to the limit itself. The admitted ones cannot finish while the burst
    arrives (they ask for more tokens than the deadline lets them produce), so the counts do
    not depend on speed. Before, one client's flood turned everyone else away."""
    excess = 40
    flood_share = MAX_PENDING - max(1, MAX_PENDING // 10)

    async def run_burst():
        async with AsyncClient(ready_server.address, timeout_s=600) as flooder, \
                AsyncClient(ready_server.address, timeout_s=600) as other, \
                AsyncClient(ready_server.address, timeout_s=600) as third:
            burst = [asyncio.create_task(flooder.generate("Hi", max_tokens=MAX_MODEL_LEN - 16, ignore_eos=True,
                                                          deadline_s=8.0))
                     for _ in range(MAX_PENDING + excess)]
            while (stats := await other.stats()).requests_running + stats.requests_waiting < flood_share:
                await asyncio.sleep(0.01)
            others = [asyncio.create_task(client.generate("Hi", max_tokens=2)) for client in (other, third)]
            results = await asyncio.gather(*burst, return_exceptions=True)
            return results, await asyncio.gather(*others), await flooder.generate("Hi", max_tokens=2)

    results, others, after = asyncio.run(run_burst())
    overloaded = [r for r in results if isinstance(r, OverloadedError)]
    admitted = [r for r in results if isinstance(r, DeadlineExceededError)]
    assert len(overloaded) == MAX_PENDING + excess - flood_share and len(admitted) == flood_share, [
        r for r in results if not isinstance(r, (OverloadedError, DeadlineExceededError))][:3]
    assert all(f"the last tenth of the {MAX_PENDING} (server.max_pending_requests) is kept for other clients"
               in r.message for r in overloaded)
    assert all(isinstance(done, GenerateDone) and done.token_ids for done in others)
    assert isinstance(after, GenerateDone) and len(after.token_ids) >= 1  # and the server serves on


def test_executor_killed_under_load_then_new_requests_succeed(ready_server, reference):
    async def scenario():
        async with AsyncClient(ready_server.address, timeout_s=300) as client:
            await client.wait_ready(timeout_s=300)  # executor_pid is 0 while none is ready
            before = await client.stats()
            inflight = [asyncio.create_task(client.generate(PROMPTS[i], task=TASKS[i % 4], max_tokens=100,
                                                            ignore_eos=True)) for i in range(12)]
            for _ in range(1200):
                await client.wait_ready(timeout_s=300)  # executor_pid is 0 while none is ready
                stats = await client.stats()
                if stats.tokens_generated >= before.tokens_generated + 12:
                    break
                await asyncio.sleep(0.05)
            signal_process(stats.executor_pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*inflight, return_exceptions=True)
            await client.wait_ready(timeout_s=300)
            after = [await client.generate(PROMPTS[i], task=TASKS[i % 4], max_tokens=MAX_TOKENS) for i in range(4)]
            return before, outcomes, after, await client.stats()

    before, outcomes, after, stats = asyncio.run(scenario())
    failed = [o for o in outcomes if isinstance(o, ExecutorFailedError)]
    assert failed, outcomes
    assert all(isinstance(o, (ExecutorFailedError, GenerateDone)) for o in outcomes), outcomes
    assert "executor" in str(failed[0]) and "died" in str(failed[0])
    for i, result in enumerate(after):
        _assert_matches(result, reference[(PROMPTS[i], TASKS[i % 4])], "after the executor restart")
    assert stats.executor_restarts == before.executor_restarts + 1
    assert stats.executor_pid != before.executor_pid
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_sigterm_finishes_short_requests_fails_long_ones_and_exits_0(ready_server):
    async def scenario():
        async with AsyncClient(ready_server.address, timeout_s=120) as client:
            # Short: at most 2 more steps once running; long: ~400 steps, far beyond the 5 s grace.
            short = [asyncio.create_task(client.generate(PROMPTS[i], max_tokens=2, ignore_eos=True)) for i in range(3)]
            long = [asyncio.create_task(client.generate(PROMPTS[i], max_tokens=400, ignore_eos=True))
                    for i in range(3, 5)]
            for _ in range(600):
                if (await client.stats()).requests_running == 5:
                    break
                await asyncio.sleep(0.02)
            ready_server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:
                late = await client.generate("too late", max_tokens=2, timeout_s=5)
            except Exception as error:  # noqa: BLE001 - the type is the assertion
                late = error
            return (await asyncio.gather(*short, return_exceptions=True),
                    await asyncio.gather(*long, return_exceptions=True), late)

    short, long, late = asyncio.run(scenario())
    assert all(isinstance(r, GenerateDone) for r in short), short
    assert all(isinstance(r, ShuttingDownError) for r in long), long
    assert isinstance(late, ShuttingDownError), late
    # A hung shutdown ends by the coordinator's watchdog (exit 1, every thread's stack logged).
    assert ready_server.process.wait(60) == 0, ready_server.logs()[-6000:]
    assert '"coordinator stopped"' in ready_server.logs()
