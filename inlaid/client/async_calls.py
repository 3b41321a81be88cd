"""The asyncio client's calls of one request and one reply: health, stats, metrics, the task
list, and the admin calls on tasks. A mixin of `AsyncClient`, apart from its connection
plumbing: each call is one request through `AsyncClient._call` (or `_roundtrip`: no hello)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from inlaid.client.arguments import checked_seconds
from inlaid.client.errors import ConnectionLostError, RequestTimeoutError, UnknownTaskError
from inlaid.client.messages import RequestIds, build_add_task, build_task_call, expect
from inlaid.client.task_wait import TASK_POLL_ANSWER_S, TaskWait
from inlaid.protocol import (
    AdminReply, GetMetrics, GetStats, Health, HealthReply, ListTasks, MetricsReply, RemoveTask, ServerReply,
    ServerStats, TaskInfo, TaskList, TaskStatus, TaskStatusReply,
)


class AsyncCalls:
    # What the calls use of the client they are mixed into (set by AsyncClient.__init__).
    address: str
    timeout_s: float
    admin_token: str | None
    _ids: RequestIds

    async def _call(self, message: Any, kind: type[Any], timeout_s: float | None = None) -> Any:
        raise NotImplementedError  # AsyncClient's: greets the server first

    async def _roundtrip(self, message: Any, timeout_s: float | None, frame: bytes | None = None) -> ServerReply:
        raise NotImplementedError  # AsyncClient's: one request, one reply

    async def health(self, timeout_s: float | None = None) -> HealthReply:
        return expect(await self._roundtrip(Health(request_id=self._ids.next()), timeout_s), HealthReply)

    async def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.2) -> HealthReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + checked_seconds(timeout_s, "timeout_s")
        checked_seconds(poll_s, "poll_s", zero_ok=True)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestTimeoutError(f"server at {self.address} not ready within {timeout_s:.0f} s")
            try:
                reply = await self.health(timeout_s=min(2.0, remaining))
                if reply.executor_ready and reply.status == "ok":
                    return reply
            except (RequestTimeoutError, ConnectionLostError):  # not up yet, or restarting
                pass
            await asyncio.sleep(poll_s)

    async def list_tasks(self, timeout_s: float | None = None) -> list[TaskInfo]:
        return (await self._call(ListTasks(request_id=self._ids.next()), TaskList, timeout_s)).tasks

    async def stats(self, timeout_s: float | None = None) -> ServerStats:
        return await self._call(GetStats(request_id=self._ids.next()), ServerStats, timeout_s)

    async def metrics(self, timeout_s: float | None = None) -> str:
        """The server's Prometheus metrics, text exposition format."""
        return (await self._call(GetMetrics(request_id=self._ids.next()), MetricsReply, timeout_s)).text

    async def add_task(self, name: str, adapter_dir: str | os.PathLike[str],
                       calibration_jsonl: str | os.PathLike[str] | None = None, *,
                       timeout_s: float | None = None) -> str:
        """Admin: serve task `name` with the PEFT adapter in `adapter_dir` (paths on the server's
        machine); it serves at once on the current base. With `calibration_jsonl` (the task's
        samples) the server then re-quantizes its base for it in the background: follow it with
        `task_status` or `wait_task`."""
        return (await self.add_task_reply(name, adapter_dir, calibration_jsonl, timeout_s=timeout_s)).message

    async def add_task_reply(self, name: str, adapter_dir: str | os.PathLike[str],
                             calibration_jsonl: str | os.PathLike[str] | None = None, *,
                             timeout_s: float | None = None) -> AdminReply:
        """`add_task`, answering the server's whole AdminReply: for a program, the facts
        beside its message (`replaces_config_entry`: the config's task it now overrides)."""
        message = build_add_task(self._ids.next(), name, adapter_dir, calibration_jsonl, self.admin_token)
        return await self._call(message, AdminReply, timeout_s)

    async def task_status(self, name: str, timeout_s: float | None = None) -> TaskStatusReply:
        """Admin: the task's phase, layers done / total, quantization version, what was kept and why."""
        message = build_task_call(TaskStatus, self._ids.next(), name, self.admin_token)
        return await self._call(message, TaskStatusReply, timeout_s)

    async def wait_task(self, name: str, timeout_s: float = 3600.0, poll_s: float = 0.5,
                        on_status: Callable[[TaskStatusReply], None] | None = None,
                        on_silence: Callable[[float, TaskStatusReply | None], None] | None = None,
                        answer_s: float = TASK_POLL_ANSWER_S) -> TaskStatusReply:
        """Poll `task_status` until the task's re-quantization has ended (ready, failed, or
        none). As `Client.wait_task`: a silent or restarting server does not end the wait before
        `timeout_s`; `on_silence(seconds_silent, last_status)` after each unanswered poll."""
        wait = TaskWait(name, self.address, timeout_s, poll_s, min(answer_s, self.timeout_s), self.timeout_s)
        while True:
            try:
                status = await self.task_status(name, timeout_s=wait.poll_timeout())
            except (RequestTimeoutError, ConnectionLostError) as error:  # down or restarting: keep asking
                wait.unanswered(error, on_silence)  # raises once timeout_s has passed
            except UnknownTaskError as error:
                raise wait.removed(error) from None
            else:
                if on_status is not None:
                    on_status(status)
                if wait.answered(status):
                    return status
            await asyncio.sleep(poll_s)

    async def remove_task(self, name: str, timeout_s: float | None = None) -> str:
        return (await self.remove_task_reply(name, timeout_s)).message

    async def remove_task_reply(self, name: str, timeout_s: float | None = None) -> AdminReply:
        """`remove_task`, answering the server's whole AdminReply (as `add_task_reply`)."""
        message = build_task_call(RemoveTask, self._ids.next(), name, self.admin_token)
        return await self._call(message, AdminReply, timeout_s)
