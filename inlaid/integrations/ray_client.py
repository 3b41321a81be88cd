"""The Ray ingress's client: the SDK calls the HTTP front makes, each sent to a replica chosen
by Ray Serve's model multiplexing on the request's task.

`RayTaskClient` has the methods of `AsyncClient` that `inlaid.http` uses, so the ingress
serves the very same OpenAI front (`create_app(..., client=...)`). A replica answers with a
`ReplicaAnswer` (its generate result or the server's typed error). A replica that died or
became unreachable mid-request is `ConnectionLostError` (HTTP 503 `unavailable`, retry), as
when a single server is killed under a request (docs/http.md), and so is a deployment with no
replica to take the request (Ray Serve's `DeploymentUnavailableError`, which is no `RayError`);
a typed Inlaid error the replica raised is passed on as it is; any other exception raised by
the replica's own code (a `RayTaskError`) is `ExecutorFailedError` (HTTP 500).
No torch here: the ingress replica stays small.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inlaid.client import (ConnectionLostError, ExecutorFailedError, InlaidError, InvalidRequestError,
                           OverloadedError, RequestTimeoutError, UnknownTaskError)
from inlaid.client.errors import error_from_reply
from inlaid.protocol import (
    SHOWN_NAMES, AdminReply, ErrorCode, ErrorReply, GenerateDone, HealthReply, HelloReply, TaskInfo, TextChunk,
    unknown_task_message,
)


@dataclass
class ReplicaAnswer:
    """A replica's answer to one generate (Ray pickles it; it never crosses Inlaid's wire)."""

    replica: str  # Ray Serve's replica id
    done: GenerateDone | None = None
    error: ErrorReply | None = None

    def result(self) -> GenerateDone:
        if self.error is not None:
            if self.error.code == ConnectionLostError.code:  # the replica's server died: the SDK's own error
                raise ConnectionLostError(f"[{self.error.code}] {self.error.message}", self.error.request_id)
            raise error_from_reply(self.error)
        assert self.done is not None
        return self.done


@dataclass
class ReplicaInfo:
    """What a replica holds, for operators and tests."""

    replica: str
    pid: int
    server_pid: int
    loaded_tasks: list[str] = field(default_factory=list)  # Ray's multiplexed set, oldest load first
    server_tasks: list[str] = field(default_factory=list)  # tasks its Inlaid server has registered


def unknown_task_error(task: str, known: Iterable[str]) -> UnknownTaskError:
    """The refusal of an unknown task as a single server's coordinator gives it: its words
    (serve/task_registry.py `check_accepting`) and, for the HTTP front's 404, the tasks."""
    tasks = sorted(known)
    reply = ErrorReply(request_id="", code=ErrorCode.UNKNOWN_TASK, field="task", known_tasks=tasks[:SHOWN_NAMES],
                       known_tasks_total=len(tasks), message=unknown_task_message(task, tasks))
    return error_from_reply(reply)  # type: ignore[return-value]  (UNKNOWN_TASK's class)


def _ray_errors() -> tuple[type[Exception], ...]:
    """What a handle's call raises when Ray, not Inlaid, fails it. Serve's own errors
    (DeploymentUnavailableError, BackPressureError) are `RayServeException`s, not `RayError`s."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return RayError, RayServeException


def _ray_failure(error: Exception) -> InlaidError:
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(error, RayTaskError):  # the replica is alive; its code raised
        if isinstance(error.cause, InlaidError):  # a typed refusal (its server died: connection_lost)
            return error.cause
        return ExecutorFailedError(f"[executor_failed] the replica failed this request ({error.cause!r})")
    if isinstance(error, BackPressureError):  # every replica's queue is full: as a full server
        return OverloadedError(f"[overloaded] every replica is at its max_ongoing_requests; retry later ({error})")
    if isinstance(error, DeploymentUnavailableError):
        return ConnectionLostError(f"[connection_lost] no replica can take this request now (the deployment is "
                                   f"unavailable: {error}); retry later")
    # The replica died or cannot be reached (ActorDiedError, ActorUnavailableError, ...): the
    # same case as a single server killed under a request, and as retryable.
    return ConnectionLostError(f"[connection_lost] the replica serving this request was lost "
                               f"({type(error).__name__}); Ray Serve restarts it, retry this request")


class RayTaskClient:
    """Routes every generate to a replica holding its task (`multiplexed_model_id = task`)."""

    def __init__(self, replicas: Any, catalog: Mapping[str, str], timeout_s: float = 600.0) -> None:
        self._ray_errors = _ray_errors()  # imported here: building the app needs no ray import
        self.replicas = replicas  # a DeploymentHandle of the replica deployment
        self.catalog = dict(catalog)
        self.timeout_s = timeout_s
        self.server: HelloReply | None = None

    def _handle(self, task: str | None, stream: bool = False) -> Any:
        if task is not None and task not in self.catalog:
            raise unknown_task_error(task, self.catalog)
        return self.replicas.options(multiplexed_model_id=task or "", stream=stream)

    async def _call(self, send: Callable[[], Any], timeout_s: float | None) -> Any:
        """`send()` makes the handle's call; Ray may refuse it at once or when awaited."""
        try:
            response = send()
        except self._ray_errors as error:
            raise _ray_failure(error) from error
        try:
            return await asyncio.wait_for(response, timeout_s or self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestTimeoutError("[timeout] no answer from the replica in time") from None
        except self._ray_errors as error:
            raise _ray_failure(error) from error

    async def handshake(self, timeout_s: float | None = None) -> HelloReply:
        self.server = await self._call(lambda: self.replicas.hello.remote(), timeout_s)
        return self.server

    async def generate(self, prompt: str | None = None, *, task: str | None = None, timeout_s: float | None = None,
                       **arguments: Any) -> GenerateDone:
        handle = self._handle(task)
        answer: ReplicaAnswer = await self._call(lambda: handle.generate.remote({"prompt": prompt, **arguments}),
                                                 timeout_s)
        return answer.result()

    async def stream(self, prompt: str | None = None, *, task: str | None = None, timeout_s: float | None = None,
                     **arguments: Any) -> "RayTokenStream":
        handle = self._handle(task, stream=True)
        try:
            generator = handle.stream.remote({"prompt": prompt, **arguments})
        except self._ray_errors as error:
            raise _ray_failure(error) from error
        return RayTokenStream(generator, timeout_s or self.timeout_s, self._ray_errors)

    async def list_tasks(self, timeout_s: float | None = None) -> list[TaskInfo]:
        """The deployment's catalog: every task any replica can load on demand."""
        return [TaskInfo(name=name, adapter_dir=path, active_requests=0) for name, path in sorted(self.catalog.items())]

    async def health(self, timeout_s: float | None = None) -> HealthReply:
        return await self._call(lambda: self.replicas.health.remote(), timeout_s)

    async def metrics(self, timeout_s: float | None = None) -> str:
        return ""  # per-replica metrics stay with each replica (docs/scale-out.md)

    async def add_task(self, name: str, adapter_dir: str, calibration_jsonl: str | None = None, *,
                       timeout_s: float | None = None) -> str:
        return (await self.add_task_reply(name, adapter_dir, calibration_jsonl, timeout_s=timeout_s)).message

    async def add_task_reply(self, name: str, adapter_dir: str, calibration_jsonl: str | None = None, *,
                             timeout_s: float | None = None) -> AdminReply:
        raise InvalidRequestError("[invalid_request] a Ray deployment's tasks come from its catalog ([tasks] in its "
                                  "config); a replica loads one when a request names it")

    async def remove_task(self, name: str, timeout_s: float | None = None) -> str:
        return (await self.remove_task_reply(name, timeout_s)).message

    async def remove_task_reply(self, name: str, timeout_s: float | None = None) -> AdminReply:
        return await self.add_task_reply(name, "", timeout_s=timeout_s)  # the same refusal

    def admin_client(self, token: str) -> "RayTaskClient":
        return self

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "RayTaskClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class RayTokenStream:
    """`async for chunk in stream` over a replica's streaming generate; `result` at the end.
    Leaving early cancels the replica's generator, which cancels the request on its server."""

    def __init__(self, generator: Any, timeout_s: float, ray_errors: tuple[type[Exception], ...]) -> None:
        self._generator = generator
        self._timeout_s = timeout_s
        self._ray_errors = ray_errors
        self.result: GenerateDone | None = None
        self._done = False

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        try:
            while not self._done:
                try:
                    item = await asyncio.wait_for(self._generator.__anext__(), self._timeout_s)
                except StopAsyncIteration:
                    raise ExecutorFailedError("[executor_failed] the replica ended the stream without a result")
                except asyncio.TimeoutError:
                    raise RequestTimeoutError("[timeout] no answer from the replica in time") from None
                except self._ray_errors as error:
                    raise _ray_failure(error) from error
                if isinstance(item, TextChunk):
                    yield item
                else:
                    self._done = True
                    self.result = item.result()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._generator.cancel()

    async def __aenter__(self) -> "RayTokenStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
