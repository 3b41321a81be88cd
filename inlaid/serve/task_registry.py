"""Which tasks the server accepts requests for, and their adapters. Torch-free.

An adapter is checked in full (config and every weight, against the base model and the
slot pool) before it is registered, so a task that is accepted can be served. A removed
task stops accepting at once but stays registered with the engine until its last request in
flight (running or queued) finishes, so no slot is reloaded under a request that uses it.
Then (or when a task is replaced) its adapter directory is *released*: the listeners in
`on_released` hear of it (the state directory discards its copy there); the executors forget
their host copies at their next plan (`executor_pool.ShardEngine`).
"""

from __future__ import annotations

import hmac
import os
from collections import Counter
from collections.abc import Callable, Sequence

from inlaid.engine.adapter_config import AdapterError, adapter_signature
from inlaid.engine.adapter_weights import check_adapter_files, check_servable_adapter, max_weights_bytes
from inlaid.engine.engine import Engine, InvalidRequestError
from inlaid.protocol import ErrorCode, excerpt, unknown_task_message
from inlaid.serve.config import ConfigError, check_task_name


_MAX_PATH_CHARS = 4096  # Linux's PATH_MAX


class TaskError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TaskRegistry:
    def __init__(self, engines: Sequence[Engine], admin_token: str | None) -> None:
        """engines: one per executor; every one registers every task."""
        self.engines = list(engines)
        self.engine = self.engines[0]  # the model and limits, the same for all
        self._admin_token = admin_token
        self.tasks: dict[str, str] = {}  # accepting: name -> adapter dir
        self.draining: set[str] = set()
        self.active: Counter[str] = Counter()
        # Called with an adapter directory once its task no longer holds it (removed and
        # drained, or replaced): nothing in flight reads it any more.
        self.on_released: list[Callable[[str], None]] = []
        # Called with a task's name once it is removed and drained: no request of it is in
        # flight, none can be admitted, so its per-task figures (metrics, stats) may go.
        self.on_unregistered: list[Callable[[str], None]] = []

    def check_token(self, token: str) -> None:
        if self._admin_token is None:
            raise TaskError(ErrorCode.UNAUTHORIZED, "admin calls are disabled: the server has no admin token configured")
        if not hmac.compare_digest(token.encode(), self._admin_token.encode()):
            raise TaskError(ErrorCode.UNAUTHORIZED, "admin call refused: missing or wrong token")

    def check_adapter(self, name: str, adapter_dir: str) -> str:
        """Refuse (TaskError) a task name or adapter that could not be served; returns the
        `adapter_signature` of the files checked (`add` registers it). Reads files and touches
        no registry state: safe to run in a worker thread."""
        if not adapter_dir:  # a raw AddTask (the SDK refuses it): "" would be this process's working directory
            raise TaskError(ErrorCode.INVALID_REQUEST, "adapter_dir must not be empty")
        if len(adapter_dir) > _MAX_PATH_CHARS:  # no OS opens it; its error would echo it whole
            raise TaskError(ErrorCode.INVALID_REQUEST, f"adapter_dir {excerpt(adapter_dir)} is too long: at most "
                                                       f"{_MAX_PATH_CHARS} characters")
        check_absolute(adapter_dir, "adapter_dir")
        model, max_rank = self.engine.model_config, self.engine.config.max_lora_rank
        try:  # the files before they are hashed, or copied into a state directory (TaskCalls._add)
            check_task_name(name, self.engine.config.model_dir)
            check_adapter_files(name, adapter_dir, model, max_rank)
        except (ConfigError, AdapterError) as error:
            raise TaskError(ErrorCode.INVALID_REQUEST, str(error)) from None
        bound = max_weights_bytes(model, max_rank)
        signature = adapter_signature(adapter_dir, bound)
        try:
            check_servable_adapter(name, adapter_dir, model, max_rank)
        except AdapterError as error:
            raise TaskError(ErrorCode.INVALID_REQUEST, str(error)) from None
        if adapter_signature(adapter_dir, bound) != signature:  # else every load would refuse what was not checked
            raise TaskError(ErrorCode.INVALID_REQUEST, f"adapter {name!r}: its files in {adapter_dir} changed while "
                                                       "they were being checked; add the task again")
        return signature

    def serves_unchanged(self, name: str, adapter_dir: str, signature: str | None) -> bool:
        """Whether `name` serves these very files already (the path, and nothing in it replaced;
        `signature` None: the files now)."""
        if self.tasks.get(name) != adapter_dir:
            return False
        return self.engine.scheduler.adapters.signatures.get(name) == (
            adapter_signature(adapter_dir) if signature is None else signature)

    def add(self, name: str, adapter_dir: str, signature: str | None = None) -> str:
        """Register (or replace) a task whose adapter `check_adapter` accepted (`signature`: its
        answer; None: the files now). The same directory again with its files changed replaces
        the task with the new files."""
        if name in self.draining:
            raise TaskError(ErrorCode.TASK_BUSY, f"task {name!r} is being removed; retry when its requests finish")
        previous = self.tasks.get(name)
        signature = adapter_signature(adapter_dir) if signature is None else signature
        if self.serves_unchanged(name, adapter_dir, signature):
            return f"task {name!r} already serves {adapter_dir}"
        if previous is not None and self.active[name]:
            count = self.active[name]
            changed = " (its files changed since it was added)" if previous == adapter_dir else ""
            raise TaskError(ErrorCode.TASK_BUSY, (
                f"task {name!r}{changed} has {count} request{'' if count == 1 else 's'} in flight (running or queued); "
                "nothing was changed: retry the addition once they have finished"))
        try:
            for engine in self.engines:  # its weights were checked by check_adapter, off the event loop
                engine.register_adapter(name, adapter_dir, check_weights=False, signature=signature)
        except (AdapterError, InvalidRequestError) as error:
            raise TaskError(ErrorCode.INVALID_REQUEST, str(error)) from None
        self.tasks[name] = adapter_dir
        if previous is not None and previous != adapter_dir:  # replaced while none of its requests is in
            self._released(previous)  # flight: the old version is unused
        if previous == adapter_dir:
            return f"task {name!r} replaced: {adapter_dir} (its files changed since it was added: the new ones serve)"
        return f"task {name!r} {'replaced' if previous else 'added'}: {adapter_dir}"

    def serves(self, adapter_dir: str) -> bool:
        """Whether some task, accepting or draining, is registered with this directory."""
        return adapter_dir in self.engine.scheduler.adapters.paths.values()

    def remove(self, name: str) -> str:
        if name not in self.tasks:  # the name is a caller's, of any length: shown as an excerpt
            raise TaskError(ErrorCode.UNKNOWN_TASK, f"unknown task {excerpt(name)}")
        del self.tasks[name]
        if self.active[name]:
            self.draining.add(name)
            # `active` counts every admitted request, queued ones too: all of them still run.
            count = self.active[name]
            requests = ("1 request in flight (running or queued) finishes" if count == 1
                        else f"{count} requests in flight (running or queued) finish")
            return f"task {name!r} removed; its {requests} first"
        self._unregister(name)
        return f"task {name!r} removed"

    def check_accepting(self, name: str | None) -> None:
        if name is not None and name not in self.tasks:
            raise TaskError(ErrorCode.UNKNOWN_TASK, unknown_task_message(name, sorted(self.tasks)))

    def request_started(self, name: str | None) -> None:
        if name is not None:
            self.active[name] += 1

    def request_ended(self, name: str | None) -> None:
        if name is None:
            return
        self.active[name] -= 1
        if self.active[name] <= 0:
            del self.active[name]
            if name in self.draining:
                self.draining.discard(name)
                self._unregister(name)

    def _unregister(self, name: str) -> None:
        adapter_dir = self.engine.scheduler.adapters.paths[name]  # every engine registered the same
        for engine in self.engines:
            engine.scheduler.adapters.unregister(name)
        self._released(adapter_dir)
        for listener in self.on_unregistered:
            listener(name)

    def _released(self, adapter_dir: str) -> None:
        for listener in self.on_released:
            listener(adapter_dir)


def check_absolute(path: str, what: str) -> None:
    """Refuse a relative path from a caller: the server would resolve it against its own
    working directory, not the caller's, and might serve some other directory of that name
    (the CLI sends absolute paths; the SDK sends what it is given). Config paths are made
    absolute against the config file when it is read, stored ones against the state directory."""
    if not os.path.isabs(path):
        raise TaskError(ErrorCode.INVALID_REQUEST, f"{what} {excerpt(path)} is relative: give an absolute path (the "
                                                   "server resolves paths on its own machine, not against the "
                                                   "caller's working directory)")
