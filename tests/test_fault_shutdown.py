"""SIGTERM in the phases other tests do not reach: while the first executor loads, and while
a failed executor is being replaced. (While idle: test_fuzz_server.py's teardown; under
streaming load: test_serve_server.py; while a step hangs: test_fault_executor.py.)

Each asserts exit code 0 within a bound, a typed `shutting_down` for the request that was
waiting, and no executor process left behind. The loading executor is frozen (SIGSTOP) before
the SIGTERM: the server lets in-flight requests finish for the grace period, and an executor
that finished loading inside it would rightly serve the waiting request (CI saw that once).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from inlaid.client import AsyncClient, ShuttingDownError
from inlaid.serve.launcher import ServerProcess
from serving_helpers import executor_pids, server_config, until, wait_gone

GRACE_S = 2.0
EXIT_BOUND_S = GRACE_S + 30.0


def _first_executor(server: ServerProcess, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = executor_pids(server.pid)
        if pids:
            return pids[0]
        assert server.process.poll() is None, server.logs()[-3000:]
        time.sleep(0.02)
    raise AssertionError("no executor was started")


async def _waiting(client: AsyncClient) -> bool:
    return (await client.stats()).requests_waiting >= 1


def _sigterm_with_a_waiting_request(server: ServerProcess, before_sigterm) -> object:  # type: ignore[no-untyped-def]
    """Send one generate (it waits: no executor is ready), run `before_sigterm`, SIGTERM the
    server, and return what the generate got."""

    async def scenario():
        async with AsyncClient(server.address, timeout_s=EXIT_BOUND_S) as client:
            waiting = asyncio.create_task(client.generate("hello", max_tokens=4))
            await until(lambda: _waiting(client))
            before_sigterm()
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(waiting, return_exceptions=True)

    return asyncio.run(scenario())[0]


def _assert_clean_exit(server: ServerProcess, started: float, executors: list[int]) -> None:
    assert server.process.wait(EXIT_BOUND_S) == 0, server.logs()[-3000:]
    assert time.monotonic() - started < EXIT_BOUND_S
    for pid in executors:
        assert wait_gone(pid), f"executor {pid} outlived the coordinator"
    assert not executor_pids(server.pid)


def test_sigterm_while_the_first_executor_loads(model_dir, adapter_dirs, tmp_path):
    server = ServerProcess(server_config(model_dir, adapter_dirs, shutdown_grace_s=GRACE_S), workdir=tmp_path)
    try:
        loading = _first_executor(server)
        started = time.monotonic()
        result = _sigterm_with_a_waiting_request(server, lambda: os.kill(loading, signal.SIGSTOP))
        assert isinstance(result, ShuttingDownError), result
        _assert_clean_exit(server, started, [loading])
    finally:
        server.terminate()


def test_sigterm_while_a_failed_executor_is_being_replaced(model_dir, adapter_dirs, tmp_path):
    server = ServerProcess(server_config(model_dir, adapter_dirs, shutdown_grace_s=GRACE_S), workdir=tmp_path)
    try:
        first = _first_executor(server)
        started = time.monotonic()
        seen: list[int] = []

        def kill_and_wait_for_the_replacement() -> None:
            os.kill(first, signal.SIGKILL)  # a start failure: the next one comes after a backoff
            deadline = time.monotonic() + 30
            while not seen and time.monotonic() < deadline:
                seen.extend(pid for pid in executor_pids(server.pid) if pid != first)
                time.sleep(0.02)
            for pid in seen:
                os.kill(pid, signal.SIGSTOP)  # still loading when the grace period ends

        result = _sigterm_with_a_waiting_request(server, kill_and_wait_for_the_replacement)
        assert isinstance(result, ShuttingDownError), result
        assert seen, "no replacement executor was started"
        _assert_clean_exit(server, started, [first, *seen])
    finally:
        server.terminate()



# A plug-in policy module (a server imports it at start) that slows the AddTask check the way
# a large adapter on a slow disk does, so that the SIGTERM lands while a call is being checked:
# the first check (of the caller's files; the copy's is checked again, at full speed) touches
# `marker` when it starts, then sleeps.
_SLOW_CHECKS = """
import time
from inlaid.scheduling.registry import make_policy
from inlaid.serve import task_registry

_check = task_registry.TaskRegistry.check_adapter
_first = [True]

def _slow_check(self, name, adapter_dir):
    if _first[0]:
        _first[0] = False
        open({marker!r}, "w").close()
        time.sleep({seconds})
    return _check(self, name, adapter_dir)

task_registry.TaskRegistry.check_adapter = _slow_check

def fifo():
    return make_policy("fifo", {{}})
"""


@pytest.mark.parametrize("check_s", [0.5, GRACE_S + 2.0])
def test_sigterm_while_an_add_task_is_being_checked_answers_it(model_dir, adapter_dirs, tmp_path, monkeypatch,
                                                               check_s):
    """The AddTask still being checked (a worker thread reading and copying the adapter) was
    cancelled at shutdown without a word: its client read a lost connection and could not
    tell whether the task was added (an outside probe, SIGTERM 0-0.05 s after the call).
    Now the drain waits for it within the grace period, as for a generate: a check done
    within it is answered and its task is in the state directory's registry; one that is not
    is refused with `shutting_down`, saying the task was not added."""
    from inlaid.protocol import AdminReply

    marker = tmp_path / "checking"
    (tmp_path / "slow_checks.py").write_text(_SLOW_CHECKS.format(seconds=check_s, marker=str(marker)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    token = "t" * 16
    state = tmp_path / "state"
    config = server_config(model_dir, {}, shutdown_grace_s=GRACE_S, state_dir=str(state), admin_token=token,
                           policy="slow_checks:fifo")
    server = ServerProcess(config, workdir=tmp_path)

    async def scenario() -> object:
        async with AsyncClient(server.address, timeout_s=EXIT_BOUND_S, admin_token=token) as client:
            adding = asyncio.create_task(client.add_task_reply("late", adapter_dirs["attn-r8"]))
            for _ in range(3000):  # received, and being checked
                if marker.exists():
                    break
                await asyncio.sleep(0.01)
            assert marker.exists(), server.logs()[-3000:]
            server.process.send_signal(signal.SIGTERM)
            return (await asyncio.gather(adding, return_exceptions=True))[0]

    try:
        server.wait_ready()
        started = time.monotonic()
        reply = asyncio.run(scenario())
        if check_s < GRACE_S:
            assert isinstance(reply, AdminReply), reply
            assert "late" in json.loads((state / "registry.json").read_text())["tasks"]
        else:
            assert isinstance(reply, ShuttingDownError) and "it was not added" in str(reply), reply
            assert "late" not in json.loads((state / "registry.json").read_text()).get("tasks", {})
        _assert_clean_exit(server, started, [])
    finally:
        server.terminate()


def test_a_second_signal_ends_the_grace_period_at_once(model_dir, adapter_dirs, tmp_path):
    """Ctrl-C twice: the second was ignored in silence, and the server waited out the whole
    grace period (30 s by default) for its streams to finish (an outside probe)."""
    long_grace_s = 120.0
    server = ServerProcess(server_config(model_dir, adapter_dirs, shutdown_grace_s=long_grace_s), workdir=tmp_path)
    try:
        server.wait_ready(timeout_s=300)

        async def scenario():
            async with AsyncClient(server.address, timeout_s=long_grace_s) as client:
                await client.wait_ready(timeout_s=300)
                executor = (await client.stats()).executor_pid
                jobs = [asyncio.create_task(client.generate("hello", max_tokens=400, ignore_eos=True))
                        for _ in range(2)]
                await until(lambda: _running(client, 2))
                os.kill(executor, signal.SIGSTOP)  # frozen mid-stream: only the second signal can end the wait
                server.process.send_signal(signal.SIGINT)
                await asyncio.sleep(1.0)
                assert server.process.poll() is None  # the first signal: the grace period runs
                started = time.monotonic()
                server.process.send_signal(signal.SIGINT)
                results = await asyncio.gather(*jobs, return_exceptions=True)
                return executor, started, results

        executor, started, results = asyncio.run(scenario())
        assert all(isinstance(r, ShuttingDownError) for r in results), results
        assert server.process.wait(30) == 0, server.logs()[-3000:]
        assert time.monotonic() - started < 30  # not the 120 s grace period
        assert wait_gone(executor)
        assert "second signal: stopping now" in server.logs()
    finally:
        server.terminate()


async def _running(client: AsyncClient, count: int) -> bool:
    return (await client.stats()).requests_running >= count
