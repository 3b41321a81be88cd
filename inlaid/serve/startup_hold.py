"""Client requests that arrive while the server starts. Torch-free.

The front socket is bound before the executors load their model and before the start-up
tuning (which can take minutes on a busy machine): a port that answered nothing meanwhile
looked dead (`health` timed out, the HTTP front's `/health` said "unreachable"). Read-only
calls (hello, health, stats, metrics, the task list) are answered at once, health with
`starting`; everything else (generates, cancels, admin calls) is held, in arrival order, and
handled as if it had just arrived once the server serves, or refused as overloaded past
`limit` held messages. Nothing is lost: a held request is answered once the server serves,
or (a shutdown during the start) refused as shutting down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from inlaid.protocol import ClientRequest, GetMetrics, GetStats, Health, Hello, ListTasks

# Answered while starting: they read what the coordinator holds from its construction.
ANSWERED_WHILE_STARTING = (Hello, Health, GetStats, GetMetrics, ListTasks)


class StartupHold:
    def __init__(self, limit: int, overflow: Callable[[bytes, ClientRequest, int], None]) -> None:
        """overflow(identity, message, held): answer a message past `limit` held ones."""
        self.limit = limit
        self.overflow = overflow
        self.starting = True
        self._held: deque[tuple[bytes, ClientRequest]] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, identity: bytes, message: ClientRequest) -> bool:
        """Whether `message` waits for the start to end (held, or answered as overflow)."""
        if not self.starting or isinstance(message, ANSWERED_WHILE_STARTING):
            return False
        if len(self._held) >= self.limit:
            self.overflow(identity, message, len(self._held))
        else:
            self._held.append((identity, message))
        return True

    def forget(self, identity: bytes) -> None:
        """A client that disconnected: its held messages would start work nobody reads."""
        self._held = deque(entry for entry in self._held if entry[0] != identity)

    def release(self, handle: Callable[[bytes, ClientRequest], None]) -> None:
        """The start has ended (served, or shutting down): each held message, in order."""
        self.starting = False
        while self._held:
            handle(*self._held.popleft())
