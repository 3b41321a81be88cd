"""Inlaid on Ray Serve: replicas each run an Inlaid server; an OpenAI ingress routes every
request to a replica that holds its task's adapter (Ray Serve model multiplexing).

```
 HTTP ──▶ Serve proxy ──▶ InlaidIngress (the inlaid.http front over RayTaskClient)
                              │ handle.options(multiplexed_model_id=task)
                              ▼
          InlaidReplica × N (one per GPU/node): `inlaid serve` (coordinator + executors)
          load_task = @serve.multiplexed(max_num_models_per_replica=N): AddTask / RemoveTask
```

Each replica starts `inlaid serve` as its child (the config's [model], [executor], [server]
sections; no task preloaded) and talks to it over a private ipc socket with the SDK. The
first request for a task on a replica loads its adapter (`AddTask`); past the per-replica cap
Ray evicts the least recently used task, which `RemoveTask`s it. The server dies with its
replica (PR_SET_PDEATHSIG), and a replica whose server died fails its health check, so Ray
replaces it; until then it answers every call `connection_lost` (HTTP 503) at once.
`python -m inlaid.integrations.ray --config FILE` deploys on a running cluster
(inlaid/integrations/ray_deploy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import zmq.asyncio
from ray import serve

from inlaid.client import AsyncClient, ConnectionLostError, InlaidError, InvalidRequestError, TaskBusyError
from inlaid.engine.adapter_config import AdapterError
from inlaid.engine.adapter_weights import check_servable_adapter
from inlaid.engine.config import ModelConfig
from inlaid.http.app import create_app
from inlaid.http.settings import HttpConfig
from inlaid.integrations.ray_child import ChildServer
from inlaid.integrations.ray_client import RayTaskClient, ReplicaAnswer, ReplicaInfo, unknown_task_error
from inlaid.integrations.ray_config import RayDeploymentConfig
from inlaid.integrations.ray_holds import TaskHolds
from inlaid.protocol import ErrorReply, HealthReply, HelloReply
from inlaid.serve.config import config_from_dict

_TASK_BUSY_RETRIES = 50  # a task being removed (its last requests finishing) before it loads again
_TASK_BUSY_PAUSE_S = 0.1
_UNLOAD_TIMEOUT_S = 30.0  # RemoveTask answers at once (a busy task is unregistered when its requests end)
# How often a call waiting on the server checks that the server still runs: a dead server
# never answers, and the SDK would wait its whole timeout (600 s) on its socket.
_SERVER_WATCH_S = 0.2
# A replica whose server died ends its own process this long after, once the calls waiting on
# the server have been answered: Ray's health check would take three failed periods (~30 s)
# to replace it, and routes requests to it meanwhile; a dead actor it replaces at once.
_END_AFTER_SERVER_EXIT_S = 1.0
# How long `check_health` waits for the server's answer: its coordinator answers health from
# its event loop in milliseconds, busy executors or not; Ray's own limit is 30 s a check.
_HEALTH_ANSWER_S = 10.0
Answer = TypeVar("Answer")


def _error_reply(error: InlaidError) -> ErrorReply:
    if error.reply is not None:  # the server's own, with its facts (the front answers from them)
        return error.reply
    prefix = f"[{error.code}] "
    message = error.message[len(prefix):] if error.message.startswith(prefix) else error.message
    return ErrorReply(request_id=error.request_id, code=error.code, message=message)


class LoadedTask:
    """A task's adapter registered on this replica's server, as Ray's multiplexer holds it.
    Ray calls `__del__` (in a worker thread) when it evicts the task: unregister it then."""

    def __init__(self, name: str, unload: Callable[[str], Awaitable[None]], loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._unload = unload
        self._loop = loop
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._loop.is_running():
            return  # the replica is shutting down, and its server with it
        future = asyncio.run_coroutine_threadsafe(self._unload(self.name), self._loop)
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                return  # collected on the loop itself: the unload runs after this returns
        with contextlib.suppress(Exception):
            future.result(timeout=_UNLOAD_TIMEOUT_S)


class ReplicaBase:
    """One Inlaid server on this node. The deployment class adds the multiplexed loader."""

    def __init__(self, server: dict[str, dict[str, Any]], catalog: dict[str, str], start_timeout_s: float) -> None:
        self.catalog = dict(catalog)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # What the server checks an adapter against (model shapes, max_lora_rank), so that
        # the replica can refuse a bad task before Ray's multiplexer evicts a good one.
        engine = config_from_dict({**server, "server": {"address": "ipc:///tmp/inlaid-check.ipc"}}).engine
        self._model_config = ModelConfig.from_dir(engine.model_dir)
        self._max_lora_rank = engine.max_lora_rank
        self.server = ChildServer(server, start_timeout_s, on_exit=self._server_exited)
        self._client: AsyncClient | None = None
        self.loaded: list[str] = []  # tasks Ray holds on this replica, oldest load first
        self._holds = TaskHolds()

    def _sdk(self) -> AsyncClient:
        if self._client is None:  # created on the replica's event loop, where every call runs
            self._client = AsyncClient(self.server.address, timeout_s=600.0, admin_token=self.server.admin_token,
                                       client_name="inlaid-ray-replica")
        return self._client

    async def load_task(self, task: str) -> LoadedTask:  # replaced by the multiplexed loader
        raise NotImplementedError

    def _server_exited(self, returncode: int) -> None:
        """The server died under a ready replica (from the server's thread): end the replica
        so that Ray replaces it now, not after its health check has failed three times."""
        logs = self.server.logs()[-2000:] if hasattr(self, "server") else ""  # died as the constructor returned
        print(f"inlaid ray replica: the Inlaid server exited (exit code {returncode}); ending this replica so that "
              f"Ray Serve replaces it:\n{logs}", file=sys.stderr, flush=True)
        time.sleep(_END_AFTER_SERVER_EXIT_S)
        self._end_replica_process()

    def _end_replica_process(self) -> None:
        self.server.stop(timeout_s=1.0)  # removes its folder (the server is gone already)
        os._exit(1)  # as a killed replica: Ray Serve starts another

    def _server_lost(self) -> ConnectionLostError:
        process = self.server.process
        pid, code = (process.pid, process.poll()) if process is not None else (None, None)
        return ConnectionLostError(f"[connection_lost] this replica's Inlaid server exited (pid {pid}, exit code "
                                   f"{code}); Ray Serve replaces the replica: retry this request")

    async def _while_server_runs(self, call: Awaitable[Answer],
                                 dropped: Callable[[Answer], None] | None = None) -> Answer:
        """`call`'s answer, or `connection_lost` at once when the server is dead or dies while
        it waits: Ray's health check finds a dead server only at its next period, and then
        waits out the replica's ongoing requests before it replaces the replica. `dropped`
        gets an answer that came as our caller went away (what it holds must be released)."""
        if not self.server.alive:
            if inspect.iscoroutine(call):
                call.close()  # never awaited: no "coroutine was never awaited" warning
            raise self._server_lost()
        waiting = asyncio.ensure_future(call)
        returned = False
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=_SERVER_WATCH_S)
                if done:
                    returned = True
                    return waiting.result()
                if not self.server.alive:
                    raise self._server_lost()
        finally:
            if not waiting.done():  # the server died, or our caller went away
                waiting.cancel()
            elif not returned and dropped is not None and not waiting.cancelled() and waiting.exception() is None:
                dropped(waiting.result())  # done in the very tick our caller was cancelled

    async def _load(self, task: str) -> LoadedTask:
        if task not in self.catalog:
            raise unknown_task_error(task, self.catalog)
        if self._holds.keep(task):  # evicted while its requests ran: still registered, held again
            self.loaded.append(task)
            return LoadedTask(task, self._unload, asyncio.get_running_loop())
        for _ in range(_TASK_BUSY_RETRIES):
            try:
                await self._sdk().add_task(task, self.catalog[task])
                break
            except TaskBusyError:  # evicted a moment ago and still finishing its requests
                await asyncio.sleep(_TASK_BUSY_PAUSE_S)
        else:
            raise TaskBusyError(f"[task_busy] task {task!r} is still being unloaded on this replica; retry")
        self.loaded.append(task)
        return LoadedTask(task, self._unload, asyncio.get_running_loop())

    async def _unload(self, task: str) -> None:
        """Ray evicted the task. Removed from the server once no request of it runs here: a
        removal while one ran left the task `task_busy` until it ended, and a request for it
        in the meantime failed with 409 after the load's retries (an outside probe)."""
        if task in self.loaded:
            self.loaded.remove(task)
        if self._holds.defer_removal(task):
            return
        await self._sdk().remove_task(task)

    async def _remove_if_unheld(self, task: str) -> None:
        """The deferred removal, once the task's last request here ended (unless it loaded again;
        a request begun since defers it again: if it fails before its load, nothing else would)."""
        if task in self.loaded or self._holds.defer_removal(task):
            return
        with contextlib.suppress(InlaidError):  # gone with the server, or removed already
            await self._sdk().remove_task(task)

    def _drop_stream(self, opened: tuple[str | None, Any]) -> None:
        """A stream opened for a caller that went away meanwhile: closed, and its task's hold
        ended (kept, an evicted task stayed on the server for good: a reviewer)."""
        task, stream = opened
        self._holds.track(asyncio.ensure_future(stream.aclose()))
        self._end(task)

    def _end(self, task: str | None) -> None:
        """A request of `task` (None: the base) ended here."""
        if self._holds.end(task):
            self._holds.track(asyncio.ensure_future(self._remove_if_unheld(task)))  # type: ignore[arg-type]

    def _check_task(self, task: str) -> None:
        """The server's own checks of a task's adapter (config and every weight), run here
        first: Ray's multiplexed loader evicts its LRU task *before* it calls `_load`, so a
        task that cannot load would otherwise cost a healthy task its seat."""
        if task not in self.catalog:
            raise unknown_task_error(task, self.catalog)
        try:
            check_servable_adapter(task, self.catalog[task], self._model_config, self._max_lora_rank)
        except AdapterError as error:
            raise InvalidRequestError(f"[invalid_request] {error}") from None

    async def _task(self) -> str | None:
        """The request's task, loaded. It counts as running here from before its load until
        the caller's `_end(task)`: an eviction meanwhile leaves it on the server till then."""
        task = serve.get_multiplexed_model_id() or None
        if task is None:
            return None
        self._holds.begin(task)
        try:
            if task not in self.loaded:  # a held task loads nothing and so evicts nothing
                await asyncio.to_thread(self._check_task, task)  # reads the weights: off the event loop
            await self.load_task(task)
        except BaseException:
            self._end(task)
            raise
        return task

    @staticmethod
    def _arguments(method: Callable[..., Any], arguments: Any) -> dict[str, Any]:
        """The handle's argument as keywords of the SDK call, or invalid_request: a bad one
        would otherwise surface as a raw RayTaskError(TypeError) to the caller."""
        if not isinstance(arguments, dict) or not all(isinstance(key, str) for key in arguments):
            raise InvalidRequestError(f"[invalid_request] the argument must be a dict of the SDK's keyword "
                                      f"arguments, got {type(arguments).__name__}")
        if "task" in arguments:  # (bind() said "got multiple values for keyword argument 'task'": a probe)
            raise InvalidRequestError("[invalid_request] the task is not an argument: it is the handle's "
                                      "multiplexed_model_id (handle.options(multiplexed_model_id=TASK); '' for the "
                                      "base model)")
        try:
            inspect.signature(method).bind(task=None, **arguments)
        except TypeError as error:
            raise InvalidRequestError(f"[invalid_request] {error}") from None
        return arguments

    async def _generate(self, arguments: dict[str, Any]) -> Any:
        arguments = self._arguments(self._sdk().generate, arguments)
        task = await self._task()
        try:
            return await self._sdk().generate(task=task, **arguments)
        finally:
            self._end(task)

    async def _open_stream(self, arguments: dict[str, Any]) -> tuple[str | None, Any]:
        """The task and its open stream; the caller ends the task's hold (`_end`)."""
        arguments = self._arguments(self._sdk().stream, arguments)
        task = await self._task()
        try:
            return task, await self._sdk().stream(task=task, **arguments)
        except BaseException:
            self._end(task)
            raise

    async def generate(self, arguments: dict[str, Any]) -> ReplicaAnswer:
        try:
            done = await self._while_server_runs(self._generate(arguments))
        except InlaidError as error:
            return ReplicaAnswer(self.replica_id, error=_error_reply(error))
        return ReplicaAnswer(self.replica_id, done=done)

    async def stream(self, arguments: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            task, stream = await self._while_server_runs(self._open_stream(arguments), self._drop_stream)
        except InlaidError as error:
            yield ReplicaAnswer(self.replica_id, error=_error_reply(error))
            return
        try:
            async with stream:
                chunks = aiter(stream)
                while True:
                    try:
                        chunk = await self._while_server_runs(anext(chunks))
                    except StopAsyncIteration:
                        break
                    yield chunk
            yield ReplicaAnswer(self.replica_id, done=stream.result)
        except InlaidError as error:
            yield ReplicaAnswer(self.replica_id, error=_error_reply(error))
        finally:
            self._end(task)

    # Raised, not answered: the ingress passes a RayTaskError's InlaidError on as it is.
    async def hello(self) -> HelloReply:
        return await self._while_server_runs(self._sdk().handshake())

    async def health(self) -> HealthReply:
        return await self._while_server_runs(self._sdk().health(timeout_s=5.0))

    async def describe(self) -> ReplicaInfo:
        tasks = await self._while_server_runs(self._sdk().list_tasks())
        assert self.server.process is not None
        return ReplicaInfo(replica=self.replica_id, pid=os.getpid(), server_pid=self.server.process.pid,
                           loaded_tasks=list(self.loaded), server_tasks=sorted(t.name for t in tasks))

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica. A server
        that runs but does not answer (stopped, deadlocked) fails it too: requests waited on
        one until their timeout and Ray kept the replica (an outside probe, SIGSTOP)."""
        if not self.server.alive:
            raise RuntimeError(f"the replica's Inlaid server exited:\n{self.server.logs()[-2000:]}")
        try:
            await self._sdk().health(timeout_s=_HEALTH_ANSWER_S)
        except InlaidError as error:
            pid = self.server.process.pid if self.server.process is not None else None
            raise RuntimeError(f"the replica's Inlaid server (pid {pid}) runs but did not answer a health check "
                               f"within {_HEALTH_ANSWER_S:.0f} s: {error}") from None

    def __del__(self) -> None:
        """Ray's graceful shutdown of the replica: stop the server, then close the SDK's
        sockets (an open ZeroMQ socket would hold the process at exit until Ray kills it)."""
        if hasattr(self, "server"):
            self.server.stop()
        zmq.asyncio.Context.instance().destroy(linger=0)


def replica_class(max_tasks_per_replica: int) -> type[ReplicaBase]:
    """The replica deployment's class: the per-replica task cap is fixed where the
    multiplexed loader is declared."""

    class InlaidReplica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_tasks_per_replica)
        async def load_task(self, task: str) -> LoadedTask:
            return await self._load(task)

    return InlaidReplica


@serve.ingress()
class InlaidIngress:
    """The OpenAI-compatible front of `inlaid.http`, over replicas instead of one server."""

    def __init__(self, replicas: Any, catalog: dict[str, str], http: dict[str, Any]) -> None:
        self.http = HttpConfig(**http)
        self.client = RayTaskClient(replicas, catalog, timeout_s=self.http.request_timeout_s)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app("ray-serve", self.http, client=self.client, admin_client=self.client.admin_client)


def build_app(config: RayDeploymentConfig) -> Any:
    """The Serve application: the ingress bound to the replica deployment."""
    replicas = serve.deployment(replica_class(config.max_tasks_per_replica)).options(
        name="InlaidReplica", ray_actor_options=config.replica_actor_options(),
        max_ongoing_requests=config.max_ongoing_requests, health_check_period_s=config.health_check_period_s,
        **config.scaling_options(),
    )  # fmt: skip
    ingress = serve.deployment(InlaidIngress).options(
        name="InlaidIngress", num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=config.max_ongoing_requests * max(1, config.max_replicas()),
    )  # fmt: skip
    return ingress.bind(replicas.bind(config.server, config.tasks, config.replica_start_timeout_s),
                        config.tasks, config.http)


def main(argv: list[str] | None = None) -> int:
    from inlaid.integrations.ray_deploy import deploy_main  # it imports this module

    return deploy_main(argv)


if __name__ == "__main__":
    sys.exit(main())
