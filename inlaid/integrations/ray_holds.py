"""Which tasks a Ray replica has requests running for, and which of them Ray's multiplexer
evicted meanwhile: their removal from the replica's server waits for their last request.
Removed at once, the task was `task_busy` on the server until that request ended, and a
request for it in the meantime failed (HTTP 409) once the load's retries ran out, its
seat empty (an outside probe). All calls come from the replica's event loop."""

from __future__ import annotations

import asyncio


class TaskHolds:
    """Which tasks have requests running on this replica, and which of them Ray evicted
    meanwhile (to be removed from the server when their last request ends)."""

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._evicted: set[str] = set()
        self._removals: set[asyncio.Future[None]] = set()  # referenced until done

    def begin(self, task: str | None) -> None:
        if task is not None:
            self._running[task] = self._running.get(task, 0) + 1

    def end(self, task: str | None) -> bool:
        """Whether the task's last request here ended and Ray evicted it meanwhile."""
        if task is None:
            return False
        self._running[task] -= 1
        if self._running[task]:
            return False
        del self._running[task]
        return self._take_evicted(task)

    def running(self, task: str) -> bool:
        return task in self._running

    def defer_removal(self, task: str) -> bool:
        """Ray evicted `task`: True (its removal waits) while a request of it runs here."""
        if task in self._running:
            self._evicted.add(task)
            return True
        return False

    def keep(self, task: str) -> bool:
        """Ray loads `task` again: True if its removal was still waiting (it stays registered)."""
        return self._take_evicted(task)

    def _take_evicted(self, task: str) -> bool:
        if task in self._evicted:
            self._evicted.discard(task)
            return True
        return False

    def track(self, removal: asyncio.Future[None]) -> None:
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
