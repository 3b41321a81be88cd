"""The coordinator's task-management calls: AddTask, RemoveTask, TaskStatus (admin) and
ListTasks. Torch-free.

The admin token is checked before anything else, so an unauthenticated client can never
make the server read a file. `AddTask` checks the whole adapter (config and every weight,
`TaskRegistry.check_adapter`) and the calibration file, and copies them into the state
directory, in a worker thread, so a large adapter never stalls the event loop; it answers
only once the task is registered (its re-quantization queued) or refused. The task
lifecycle itself is `dynamic_tasks.DynamicTasks`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from inlaid.protocol import (
    AddTask, AdminReply, ErrorCode, ErrorReply, ListTasks, RemoveTask, ReplacedConfigEntry, TaskInfo, TaskList,
    TaskStatus,
)
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.task_registry import TaskError, TaskRegistry
from inlaid.tasks.checks import base_model_warnings

log = logging.getLogger("inlaid.coordinator")

Reply = Callable[[bytes, msgspec.Struct], None]  # (client identity, message)


class TaskCalls:
    def __init__(self, registry: TaskRegistry, reply: Reply, dynamic: DynamicTasks,
                 accepting: Callable[[], bool] = lambda: True) -> None:
        """accepting(): False once the server shuts down (adds and removals are refused then)."""
        self._accepting = accepting
        self.registry = registry
        self.dynamic = dynamic
        self._reply = reply
        self.pending: dict[asyncio.Task[None], tuple[bytes, AddTask]] = {}  # AddTask calls being checked

    def list_tasks(self, identity: bytes, message: ListTasks) -> None:
        tasks = [TaskInfo(name=name, adapter_dir=path, active_requests=self.registry.active[name])
                 for name, path in sorted(self.registry.tasks.items())]  # fmt: skip
        self._reply(identity, TaskList(request_id=message.request_id, tasks=tasks))

    def admin(self, identity: bytes, message: AddTask | RemoveTask | TaskStatus) -> None:
        try:
            self.registry.check_token(message.token)
            if isinstance(message, TaskStatus):
                return self._reply(identity, self.dynamic.status(message.request_id, message.name))
            if not self._accepting():  # the requantizer and the drain are ending: nothing may change now
                verb, done = ("add", "added") if isinstance(message, AddTask) else ("remove", "removed")
                raise TaskError(ErrorCode.SHUTTING_DOWN, f"the server is shutting down: task {message.name!r} was "
                                                         f"not {done}; {verb} it once the server is back")
            if isinstance(message, RemoveTask):
                return self._done(identity, message, self.dynamic.remove(message.name),
                                  returns_at_restart=self.dynamic.config.tasks.get(message.name))
        except TaskError as error:
            return self._refused(identity, message, error)
        task = asyncio.get_running_loop().create_task(self._add(identity, message))
        self.pending[task] = (identity, message)
        task.add_done_callback(lambda done: self.pending.pop(done, None))

    def refuse_pending(self) -> None:
        """At shutdown, after the grace period: each AddTask still being checked is told so
        (it was cancelled without a word, and its client read a lost connection, not knowing
        whether the task was added). It was not: a call registers only after its checks."""
        for task, (identity, message) in list(self.pending.items()):
            if task.done():  # answered; its done callback has not run yet
                continue
            task.cancel()
            log.warning("admin call refused", extra={"call": "AddTask", "task": message.name, "code": "shutting_down",
                                                     "client": identity.hex()})
            self._reply(identity, ErrorReply(
                request_id=message.request_id, code=ErrorCode.SHUTTING_DOWN,
                message=f"the server shut down while task {message.name!r} was being checked: it was not added; "
                        "add it again once the server is back"))
        self.pending.clear()

    async def _add(self, identity: bytes, message: AddTask) -> None:
        try:
            signature = await asyncio.to_thread(self.registry.check_adapter, message.name, message.adapter_dir)
            # a name of another base in its config: said, as `inlaid generate` says it (the shapes decide)
            other_base = await asyncio.to_thread(base_model_warnings, Path(self.dynamic.config.engine.model_dir),
                                                 {message.name: Path(message.adapter_dir)})
            inputs = await asyncio.to_thread(self.dynamic.prepare, message.name, message.adapter_dir,
                                             message.calibration_jsonl or None)
            inputs.signature = signature
            if inputs.copied:  # what is served is the copy: the source may have changed since it was checked
                inputs.signature = await asyncio.to_thread(self._check_copy, message.name, inputs.adapter_dir)
            text = self.dynamic.add(inputs)
            for warning in other_base:
                log.warning("an added adapter names another base model", extra={"task": message.name,
                                                                                "warning": warning})
                text += f"; note: {warning}"
            self._done(identity, message, text, inputs.replaced_config_entry, hessians_dropped=inputs.hessians_dropped,
                       already_served=inputs.already_served)
        except TaskError as error:
            self._refused(identity, message, error)
        except Exception:  # a bug must cost this call, never the server
            log.exception("internal error adding a task", extra={"request_id": message.request_id})
            self._reply(identity, ErrorReply(request_id=message.request_id, code=ErrorCode.INTERNAL,
                                             message="internal server error"))

    def _check_copy(self, name: str, copy_dir: str) -> str:
        store = self.dynamic.store
        assert store is not None  # only a state directory's tasks are copies
        try:
            return self.registry.check_adapter(name, copy_dir)
        except TaskError as error:
            store.discard_copy(copy_dir)
            raise TaskError(error.code, f"the adapter changed while it was being added: {error.message}") from None

    def _done(self, identity: bytes, message: AddTask | RemoveTask, text: str,
              replaces_config_entry: ReplacedConfigEntry | None = None, hessians_dropped: bool = False,
              already_served: bool = False, returns_at_restart: str | None = None) -> None:
        log.info("admin call", extra={"call": type(message).__name__, "task": message.name, "result": text})
        self._reply(identity, AdminReply(request_id=message.request_id, message=text,
                                         replaces_config_entry=replaces_config_entry,
                                         hessians_dropped=hessians_dropped, already_served=already_served,
                                         returns_at_restart=returns_at_restart))

    def _refused(self, identity: bytes, message: AddTask | RemoveTask | TaskStatus, error: TaskError) -> None:
        log.warning("admin call refused", extra={"call": type(message).__name__, "code": error.code,
                                                 "client": identity.hex(), "reason": error.message})
        self._reply(identity, ErrorReply(request_id=message.request_id, code=error.code, message=error.message))
