"""The supervisors' own tasks never die silently. A respawn that could not even create the
process (the coordinator out of file descriptors when its executor died) ended the watch
task with "Task exception was never retrieved": no restart ever again, health "starting"
forever, every generate unanswered (a review's probe). Such a start now counts as a failed
start, tried again with the back-off, and stops the server at MAX_START_FAILURES unless
other executors serve; a supervision task ending in an exception stops the server, saying
why; a raising layer-swap callback no longer ends the receive loop. A requantizer that
cannot be spawned is tried again (no loss charged to its job); so is an HTTP front
(its supervising task ended, and with it the front, for good). Real child processes:
/bin/false for an executor that dies at once, and a small script that speaks the
executor's first messages."""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

from inlaid.engine.config import EngineConfig
from inlaid.serve import supervisor as supervisor_module
from inlaid.serve.supervisor import MAX_START_FAILURES, ExecutorSupervisor

_real_exec = asyncio.create_subprocess_exec


def _supervisor(tmp_path: Path, fatal: list[str], **options) -> ExecutorSupervisor:
    return ExecutorSupervisor(EngineConfig(model_dir=str(tmp_path)), f"ipc://{tmp_path}/executor.ipc",
                              on_lost=lambda reason, restartable: None, on_fatal=fatal.append, **options)


def _spawns_failing_after_the_first(tmp_path: Path, others_serving: bool, monkeypatch) -> tuple[list[str], int]:
    """(fatal reasons, spawn attempts): the first executor dies at once, every later spawn
    raises EMFILE."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    monkeypatch.setattr(supervisor_module, "_RESTART_BACKOFF_S", (0.01,))
    monkeypatch.setattr(supervisor_module, "HELD_DOWN_RETRY_S", 0.05)
    monkeypatch.setattr(supervisor_module, "_START_ERROR_WAIT_S", 0.05)
    attempts = 0

    async def spawn(*command, **options):  # type: ignore[no-untyped-def]
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return await _real_exec(*command, **options)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    fatal: list[str] = []

    async def scenario() -> None:
        supervisor = _supervisor(tmp_path, fatal, others_serving=lambda: others_serving)
        await supervisor.start()
        try:
            for _ in range(200):  # until fatal, or well past MAX_START_FAILURES tries
                await asyncio.sleep(0.05)
                if fatal or attempts > MAX_START_FAILURES + 3:
                    break
        finally:
            await supervisor.stop()

    asyncio.run(scenario())
    return fatal, attempts


def test_a_respawn_that_cannot_create_the_process_counts_as_a_failed_start(tmp_path, monkeypatch) -> None:
    fatal, attempts = _spawns_failing_after_the_first(tmp_path, others_serving=False, monkeypatch=monkeypatch)
    assert attempts == MAX_START_FAILURES
    assert fatal == [f"the executor failed to start {MAX_START_FAILURES} times in a row; last: the executor "
                     "process could not be started: OSError: [Errno 24] Too many open files"]


def test_a_respawn_that_cannot_create_the_process_is_retried_while_others_serve(tmp_path, monkeypatch) -> None:
    fatal, attempts = _spawns_failing_after_the_first(tmp_path, others_serving=True, monkeypatch=monkeypatch)
    assert fatal == [] and attempts > MAX_START_FAILURES + 3


def test_a_supervision_task_that_raises_stops_the_server_saying_why(tmp_path) -> None:
    fatal: list[str] = []

    async def broken() -> None:
        raise RuntimeError("a bug")

    async def scenario() -> None:
        supervisor = _supervisor(tmp_path, fatal, index=3)
        supervisor._spawn_task(broken())
        await asyncio.sleep(0.05)
        assert not supervisor._tasks  # (done tasks are still let go)

    asyncio.run(scenario())
    assert fatal == ["the supervision of executor 3 failed: RuntimeError: a bug"]


_FAKE_EXECUTOR = """
import os, sys, msgspec, zmq
from inlaid.protocol import PROTOCOL_VERSION, ExecutorHello, LayerSwapResult
arguments = sys.argv[sys.argv.index("--address"):]
address, generation = arguments[1], int(arguments[arguments.index("--generation") + 1])
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.IDENTITY, f"executor-{generation}".encode())
sock.connect(address)
encode = msgspec.msgpack.encode
sock.send(encode(LayerSwapResult(layer=4, version=2, ok=True)))
sock.send(encode(ExecutorHello(protocol_version=PROTOCOL_VERSION, generation=generation, pid=os.getpid(),
                               device="cpu", num_kv_blocks=16, load_seconds=0.0)))
sock.recv()  # until the supervisor's shutdown
"""


def test_a_raising_layer_swap_callback_does_not_end_the_receive_loop(tmp_path, monkeypatch) -> None:
    """The swap result arrives first; with the loop ended, the hello after it went unread and
    the executor never became ready (every step would then run into the step timeout)."""
    script = tmp_path / "fake_executor.py"
    script.write_text(_FAKE_EXECUTOR)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    fatal: list[str] = []
    swaps: list[int] = []

    def on_swap_result(result) -> None:  # type: ignore[no-untyped-def]
        swaps.append(result.layer)
        raise KeyError("a bug in the swap bookkeeping")

    async def scenario() -> bool:
        supervisor = _supervisor(tmp_path, fatal, on_swap_result=on_swap_result)
        await supervisor.start()
        try:
            await asyncio.wait_for(supervisor.ready.wait(), 60)
            return supervisor.ready.is_set()
        finally:
            await supervisor.stop(timeout_s=2)

    assert asyncio.run(scenario())
    assert swaps == [4] and fatal == []


def test_a_requantizer_that_cannot_be_spawned_is_tried_again_without_charging_the_job(tmp_path, monkeypatch) -> None:
    """The spawn's OSError went up into the job dispatch (or ended the watch task after a
    loss): the job sat queued until the next addition dispatched again. It is tried again
    after the back-off, one retry at a time however often a dispatch asks, and is no loss:
    the job is not charged for a process that never ran."""
    from inlaid.serve import requantizer_supervisor as requantizer_module
    from inlaid.serve.config_sections import RequantizerSettings

    monkeypatch.setattr(requantizer_module, "_RESTART_BACKOFF_S", (0.05,))
    attempts: list[float] = []

    async def refuse(*command, **options):  # type: ignore[no-untyped-def]
        attempts.append(0.0)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    lost: list[str] = []

    async def scenario() -> int:
        supervisor = requantizer_module.RequantizerSupervisor(
            RequantizerSettings(), f"ipc://{tmp_path}/requantizer.ipc", on_message=lambda message: None,
            on_ready=lambda hello: None, on_lost=lost.append, wanted=lambda: len(attempts) < 4)
        for _ in range(3):  # three dispatches at once: one retry chain
            await supervisor.ensure_running()
        assert len(attempts) == 3
        for _ in range(200):
            await asyncio.sleep(0.02)
            if len(attempts) >= 4:
                break
        await asyncio.sleep(0.3)  # no more tries: no work is wanted any more
        await supervisor.stop()
        return supervisor.losses

    assert asyncio.run(scenario()) == 0
    assert len(attempts) == 4 and lost == []


def test_an_http_front_that_cannot_be_spawned_is_tried_again(monkeypatch) -> None:
    from inlaid.http import process as front_module
    from inlaid.http.settings import HttpConfig

    monkeypatch.setattr(front_module, "_RESTART_BACKOFF_S", (0.01,))
    attempts: list[int] = []

    async def spawn(*command, **options):  # type: ignore[no-untyped-def]
        attempts.append(len(attempts))
        if len(attempts) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return await _real_exec("sleep", "30", stdin=asyncio.subprocess.DEVNULL)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)

    async def scenario() -> bool:
        front = front_module.HttpFrontProcess("tcp://127.0.0.1:5599", HttpConfig(port=0), "INFO", "json")
        front.bind()
        front.start()
        try:
            for _ in range(200):
                await asyncio.sleep(0.02)
                if front._process is not None:
                    break
            return front._process is not None and front._process.returncode is None
        finally:
            await front.stop(timeout_s=2)

    assert asyncio.run(scenario()) and len(attempts) == 2
