"""A Ray replica's handling of Ray's multiplexer, against a real `inlaid serve` (no Ray cluster:
Ray's eviction is its call of the loaded task's unload, made here as Ray makes it).

* A task Ray evicts while a request of it runs stays on the server until that request ends;
  a request for it meanwhile is served (it was 409 `task_busy` once the load's retries ran
  out, and its seat stayed empty: an outside probe). Evicted with nothing running, it is
  removed at once; evicted and never loaded again, it is removed when its last request ends.
* A server that runs but does not answer (SIGSTOP) fails the replica's health check, so Ray
  replaces the replica (it passed: requests waited on the server until their timeout).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inlaid.client import AsyncClient
from inlaid.serve.launcher import ServerProcess

with warnings.catch_warnings():  # Ray 2.60 declares pydantic fields in a deprecated style; not ours
    warnings.simplefilter("ignore", DeprecationWarning)
    import inlaid.integrations.ray as ray_replica
    from inlaid.integrations.ray_holds import TaskHolds

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
CATALOG = {name: str(ADAPTERS / name) for name in ("qa", "sentiment", "math")}
ADMIN_TOKEN = "holds-admin-token-0123456789"
REQUESTED_TASK: contextvars.ContextVar[str] = contextvars.ContextVar("requested_task", default="")


class RunningServer(ServerProcess):
    """The real server, with the `alive` and `stop` the replica asks of its ChildServer."""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        self.terminate()


class ReplicaWithoutRay(ray_replica.ReplicaBase):
    """ReplicaBase as is, but for the Ray-bound constructor; `load_task` is `_load` itself
    (Ray's multiplexer around it decides only what to evict, which the tests do by hand)."""

    def __init__(self, server: RunningServer) -> None:
        self.catalog = dict(CATALOG)
        self.replica_id = "replica-without-ray"
        self.server = server  # type: ignore[assignment]
        self._client: AsyncClient | None = None
        self.loaded: list[str] = []
        self._holds = TaskHolds()
        self._check_task = lambda task: None  # type: ignore[method-assign]  # the catalog's adapters are good
        self.handles: dict[str, Any] = {}

    async def load_task(self, task: str) -> Any:
        if task not in self.loaded:
            self.handles[task] = await self._load(task)
        return self.handles[task]

    async def evict(self, task: str) -> None:
        """What Ray's multiplexer does to its LRU task: drop its handle, whose release unloads it."""
        self.handles.pop(task)._released = True
        await self._unload(task)

    async def request(self, task: str, max_tokens: int) -> Any:
        REQUESTED_TASK.set(task)
        return await self.generate({"prompt": "Tell me a long story about a ship.", "max_tokens": max_tokens,
                                    "ignore_eos": True})

    def __del__(self) -> None:
        pass


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    config = {"model": {"dir": str(model_dir)},
              "executor": {"dtype": "float32", "threads": 1, "max_num_seqs": 8, "num_kv_blocks": 256,
                           "max_lora_slots": 2, "max_lora_rank": 32},
              "server": {"admin_token": ADMIN_TOKEN, "shutdown_grace_s": 2.0}}
    process = RunningServer(config, workdir=tmp_path_factory.mktemp("holds"))
    process.wait_ready()
    yield process
    process.terminate()


@pytest.fixture()
def replica(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> ReplicaWithoutRay:
    monkeypatch.setattr(ray_replica.serve, "get_multiplexed_model_id", REQUESTED_TASK.get)
    monkeypatch.setattr(ray_replica, "_TASK_BUSY_RETRIES", 3)  # 0.3 s of retries: the long request runs longer
    return ReplicaWithoutRay(server)


def _run_closing_the_client(replica: ReplicaWithoutRay, scenario: Any) -> None:
    """`scenario()` on a loop of its own, the replica's SDK client (made on that loop) closed after."""
    async def closing() -> None:
        try:
            await scenario()
        finally:
            if replica._client is not None:
                await replica._client.close()

    asyncio.run(closing())


async def _server_tasks(replica: ReplicaWithoutRay) -> list[str]:
    return sorted(task.name for task in await replica._sdk().list_tasks())


def test_a_task_evicted_while_its_request_runs_is_served_again_and_removed_when_unheld(replica) -> None:
    async def scenario() -> None:
        long_request = asyncio.ensure_future(replica.request("sentiment", max_tokens=60))
        while "sentiment" not in replica.loaded:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # decoding
        await replica.evict("sentiment")  # Ray loads two others past the cap of one, say
        assert not long_request.done() and await _server_tasks(replica) == ["sentiment"]
        short = await replica.request("sentiment", max_tokens=2)  # was 409 task_busy after the retries
        assert short.error is None, short.error
        assert replica.loaded == ["sentiment"] and await _server_tasks(replica) == ["sentiment"]
        assert (await long_request).error is None
        assert await _server_tasks(replica) == ["sentiment"]  # held again: stays

        await replica.evict("sentiment")  # nothing of it running: removed at once
        assert await _server_tasks(replica) == [] and replica.loaded == []

        long_request = asyncio.ensure_future(replica.request("qa", max_tokens=40))
        while "qa" not in replica.loaded:
            await asyncio.sleep(0.05)
        await replica.evict("qa")
        assert await _server_tasks(replica) == ["qa"]  # its request still runs
        assert (await long_request).error is None
        deadline = time.monotonic() + 10
        while await _server_tasks(replica) != []:  # removed once that request ended
            assert time.monotonic() < deadline, "an evicted task outlived its last request"
            await asyncio.sleep(0.1)

    _run_closing_the_client(replica, scenario)


def test_a_server_that_does_not_answer_fails_the_health_check(replica, server, monkeypatch) -> None:
    monkeypatch.setattr(ray_replica, "_HEALTH_ANSWER_S", 1.0, raising=False)  # (absent before the fix)

    async def check() -> None:
        outcome = replica.check_health()
        if asyncio.iscoroutine(outcome):
            await outcome

    async def scenario() -> None:
        await check()  # answers: healthy
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RuntimeError, match=rf"server \(pid {server.pid}\) runs but did not answer a "
                                                   r"health check within 1 s"):
                await check()
            assert time.monotonic() - started < 5
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await check()  # answers again

    _run_closing_the_client(replica, scenario)


def test_a_removal_a_new_request_put_off_is_made_when_that_request_ends(replica) -> None:
    """The deferred removal finds a request begun since (not loaded yet): it waits for that one
    too. It skipped for good, and a request failing before its load left the task on the
    server, held by no one (a reviewer)."""
    async def scenario() -> None:
        await replica.load_task("qa")
        replica._holds.begin("qa")  # a request of it runs
        await replica.evict("qa")
        replica._end("qa")  # it ends: the removal is scheduled...
        replica._holds.begin("qa")  # ...and another request begins before it runs
        await asyncio.sleep(0.2)
        assert await _server_tasks(replica) == ["qa"]  # put off again
        replica._end("qa")  # that request failed before its load
        deadline = time.monotonic() + 10
        while await _server_tasks(replica) != []:
            assert time.monotonic() < deadline, "the task stayed on the server, held by no one"
            await asyncio.sleep(0.1)

    _run_closing_the_client(replica, scenario)


def test_a_stream_opened_as_its_caller_went_away_is_closed_and_its_hold_ended(replica) -> None:
    """The open finished in the very tick its caller was cancelled: the stream and its task's
    hold were dropped with the answer, and the task could never be removed (a reviewer)."""
    class OpenedStream:
        closed = False

        async def aclose(self) -> None:
            OpenedStream.closed = True

    async def scenario() -> None:
        replica._holds.begin("qa")  # as _open_stream's _task() does

        async def opens_as_the_caller_leaves() -> tuple[str, OpenedStream]:
            caller.cancel()
            return "qa", OpenedStream()

        caller = asyncio.ensure_future(replica._while_server_runs(opens_as_the_caller_leaves(), replica._drop_stream))
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)
        assert OpenedStream.closed and not replica._holds.running("qa")

    asyncio.run(scenario())
