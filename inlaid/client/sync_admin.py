"""The blocking Client's admin and information calls (tasks, stats, metrics): each one
request and its typed reply, over `Client._call`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from inlaid.client.errors import ConnectionLostError, RequestTimeoutError, UnknownTaskError
from inlaid.client.messages import build_add_task, build_task_call
from inlaid.client.task_wait import TASK_POLL_ANSWER_S, TaskWait
from inlaid.protocol import (
    AdminReply,
    GetMetrics,
    GetStats,
    ListTasks,
    MetricsReply,
    RemoveTask,
    ServerStats,
    TaskInfo,
    TaskList,
    TaskStatus,
    TaskStatusReply,
)


class AdminCalls:
    """Mixed into `Client`, whose `_call`, `_ids`, `address`, `timeout_s` and `admin_token` these use."""

    _call: Callable[..., Any]
    _ids: Any
    address: str
    timeout_s: float
    admin_token: str | None

    def list_tasks(self, timeout_s: float | None = None) -> list[TaskInfo]:
        return self._call(ListTasks(request_id=self._ids.next()), TaskList, timeout_s).tasks

    def stats(self, timeout_s: float | None = None) -> ServerStats:
        return self._call(GetStats(request_id=self._ids.next()), ServerStats, timeout_s)

    def metrics(self, timeout_s: float | None = None) -> str:
        """The server's Prometheus metrics, text exposition format."""
        return self._call(GetMetrics(request_id=self._ids.next()), MetricsReply, timeout_s).text

    def add_task(self, name: str, adapter_dir: str | os.PathLike[str],
                 calibration_jsonl: str | os.PathLike[str] | None = None, *,
                 timeout_s: float | None = None) -> str:
        """Admin: serve task `name` with the PEFT adapter in `adapter_dir` (paths on the server's
        machine); it serves at once on the current base. With `calibration_jsonl` (the task's
        samples) the server then re-quantizes its base for it in the background: follow it with
        `task_status` or `wait_task`."""
        return self.add_task_reply(name, adapter_dir, calibration_jsonl, timeout_s=timeout_s).message

    def add_task_reply(self, name: str, adapter_dir: str | os.PathLike[str],
                       calibration_jsonl: str | os.PathLike[str] | None = None, *,
                       timeout_s: float | None = None) -> AdminReply:
        """`add_task`, answering the server's whole AdminReply: for a program, the facts
        beside its message (`replaces_config_entry`: the config's task it now overrides)."""
        message = build_add_task(self._ids.next(), name, adapter_dir, calibration_jsonl, self.admin_token)
        return self._call(message, AdminReply, timeout_s)

    def task_status(self, name: str, timeout_s: float | None = None) -> TaskStatusReply:
        """Admin: the task's phase, layers done / total, quantization version, what was kept and why."""
        message = build_task_call(TaskStatus, self._ids.next(), name, self.admin_token)
        return self._call(message, TaskStatusReply, timeout_s)

    def wait_task(self, name: str, timeout_s: float = 3600.0, poll_s: float = 0.5,
                  on_status: Callable[[TaskStatusReply], None] | None = None,
                  on_silence: Callable[[float, TaskStatusReply | None], None] | None = None,
                  answer_s: float = TASK_POLL_ANSWER_S) -> TaskStatusReply:
        """Poll `task_status` until the task's re-quantization has ended (ready, failed, or
        none); `on_status(status)` after each answered poll (progress). A server that stops
        answering (down, restarting, hung) does not end the wait: each poll waits `answer_s` at
        most (or the client's timeout, if shorter), `on_silence(seconds_silent, last_status)`
        after each unanswered one, and polling goes on until `timeout_s`; the timeout error then
        names the last known progress."""
        wait = TaskWait(name, self.address, timeout_s, poll_s, min(answer_s, self.timeout_s), self.timeout_s)
        while True:
            try:
                status = self.task_status(name, timeout_s=wait.poll_timeout())
            except (RequestTimeoutError, ConnectionLostError) as error:  # down or restarting: keep asking
                wait.unanswered(error, on_silence)  # raises once timeout_s has passed
            except UnknownTaskError as error:
                raise wait.removed(error) from None
            else:
                if on_status is not None:
                    on_status(status)
                if wait.answered(status):
                    return status
            time.sleep(poll_s)

    def remove_task(self, name: str, timeout_s: float | None = None) -> str:
        return self.remove_task_reply(name, timeout_s).message

    def remove_task_reply(self, name: str, timeout_s: float | None = None) -> AdminReply:
        """`remove_task`, answering the server's whole AdminReply (as `add_task_reply`)."""
        message = build_task_call(RemoveTask, self._ids.next(), name, self.admin_token)
        return self._call(message, AdminReply, timeout_s)
