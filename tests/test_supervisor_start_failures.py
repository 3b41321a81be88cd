"""An executor that keeps failing to start stopped the whole server after MAX_START_FAILURES
tries, also with other executors serving: the healthy executor was killed and its running
requests failed naming the other one (an outside scale-out probe, kill -9 of each
replacement while it loaded). It now stops the server only when no other executor is up;
else it is tried again every HELD_DOWN_RETRY_S. Real child processes that die before their
hello stand for the failing starts (`sys.executable` is /bin/false here)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from inlaid.engine.config import EngineConfig
from inlaid.serve import supervisor as supervisor_module
from inlaid.serve.executor_pool import ExecutorPool, ExecutorShard
from inlaid.serve.supervisor import MAX_START_FAILURES, ExecutorSupervisor


def _starts(tmp_path: Path, others_serving: bool, monkeypatch) -> tuple[list[str], int]:
    """(fatal reasons, start attempts) of a supervisor whose every executor dies at once."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    monkeypatch.setattr(supervisor_module, "_RESTART_BACKOFF_S", (0.01,))
    monkeypatch.setattr(supervisor_module, "HELD_DOWN_RETRY_S", 0.05)
    monkeypatch.setattr(supervisor_module, "_START_ERROR_WAIT_S", 0.05)  # /bin/false says nothing before it exits
    fatal: list[str] = []

    async def scenario() -> int:
        supervisor = ExecutorSupervisor(EngineConfig(model_dir=str(tmp_path)), f"ipc://{tmp_path}/executor.ipc",
                                        on_lost=lambda reason, restartable: None, on_fatal=fatal.append,
                                        others_serving=lambda: others_serving)
        await supervisor.start()
        try:
            for _ in range(200):  # until fatal, or well past MAX_START_FAILURES tries
                await asyncio.sleep(0.05)
                if fatal or supervisor.generation > MAX_START_FAILURES + 3:
                    break
            return supervisor.generation
        finally:
            await supervisor.stop()

    return fatal, asyncio.run(scenario())


def test_a_lone_executor_that_cannot_start_stops_the_server(tmp_path, monkeypatch) -> None:
    fatal, starts = _starts(tmp_path, others_serving=False, monkeypatch=monkeypatch)
    assert starts == MAX_START_FAILURES
    assert len(fatal) == 1 and fatal[0].startswith(f"the executor failed to start {MAX_START_FAILURES} times in a "
                                                   "row; last: executor (pid ")


def test_one_executor_of_several_that_cannot_start_is_retried_while_the_others_serve(tmp_path, monkeypatch) -> None:
    fatal, starts = _starts(tmp_path, others_serving=True, monkeypatch=monkeypatch)
    assert fatal == [] and starts > MAX_START_FAILURES + 3


def test_the_pool_says_whether_another_executor_is_up(tmp_path) -> None:
    """The coordinator's others_serving for each shard: another's supervisor ready, not its own."""
    supervisors = [ExecutorSupervisor(EngineConfig(model_dir=str(tmp_path)), f"ipc://{tmp_path}/{index}.ipc",
                                      on_lost=lambda reason, restartable: None, on_fatal=print) for index in (0, 1)]
    pool = ExecutorPool.__new__(ExecutorPool)  # the shards alone: no engines are needed here
    pool.shards = [ExecutorShard(index, None, supervisor)  # type: ignore[arg-type]
                   for index, supervisor in enumerate(supervisors)]
    supervisors[0].ready.set()  # shard 0 serves, shard 1 is down
    assert not pool.others_ready(pool.shards[0])
    assert pool.others_ready(pool.shards[1])
    supervisors[0].ready.clear()
    assert not pool.others_ready(pool.shards[1])


def test_the_reason_an_executor_cannot_start_reaches_the_fatal_line(model_dir: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """A model the executor cannot load (its config.json says another width than its weights):
    the server's last line said only "died with exit code 1" (the cause was an uncaught
    traceback on stderr, three times). The executor now says why before it exits, and the
    fatal reason carries it. Real executor processes, the real model loader."""
    import json

    broken = tmp_path / "model"
    broken.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (broken / item.name).symlink_to(item)
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(supervisor_module, "_RESTART_BACKOFF_S", (0.01,))
    fatal: list[str] = []

    async def scenario() -> None:
        supervisor = ExecutorSupervisor(EngineConfig(model_dir=str(broken), threads=1, num_kv_blocks=16),
                                        f"ipc://{tmp_path}/executor.ipc", on_lost=lambda reason, restartable: None,
                                        on_fatal=fatal.append, others_serving=lambda: False)
        await supervisor.start()
        try:
            for _ in range(1200):
                await asyncio.sleep(0.1)
                if fatal:
                    break
        finally:
            await supervisor.stop()

    asyncio.run(scenario())
    assert len(fatal) == 1, fatal
    width = config["hidden_size"]
    assert fatal[0].startswith(f"the executor failed to start {MAX_START_FAILURES} times in a row; last: executor")
    assert (f"died with exit code 1: ModelLoadError: model.embed_tokens.weight: shape (49152, {width // 2}), "
            f"config expects (49152, {width})") in fatal[0], fatal[0]
