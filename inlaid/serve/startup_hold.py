"""Client requests that arrive while the server starts. Torch-free.

The front socket is bound before the executors are spawned and before the start-up tuning
(which can take minutes on a busy machine): a port that answered nothing meanwhile looked
dead (`health` timed out, the HTTP front's `/health` said "unreachable"). Read-only calls
(hello, health, stats, metrics, the task list, task status) are answered at once, health
with `starting`; everything else (generates, cancels, admin calls) is held, in arrival
order, and handled once the server serves (a generate's deadline and latency figures count
from its arrival), or refused as overloaded past `limit` held messages. Without a tuning the hold lasts
only while the executors are spawned (their model load is not waited for: requests queue
in the engines meanwhile). Nothing is left unanswered: a shutdown or a failed start during
the hold refuses what it holds (the coordinator's `release` handler decides).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import msgspec

from inlaid.protocol import (MAX_REQUEST_ID_CHARS, Cancel, ClientRequest, ErrorCode, ErrorReply, Generate, ListTasks,
                             TaskStatus, reply_id)
from inlaid.serve.in_flight import InFlight
from inlaid.serve.info_calls import INFO_CALLS

# Answered while starting: they read what the coordinator holds from its construction.
ANSWERED_WHILE_STARTING = (*INFO_CALLS, ListTasks, TaskStatus)
# Letting 1,000 held requests in at once would stall every other stream as a frame backlog
# did (the front loop's yield): the release yields as often.
_RELEASE_YIELD_AFTER_S = 0.005


Handle = Callable[[bytes, ClientRequest, float], None]  # (client identity, a held message, when it arrived)


class StartupHold:
    def __init__(self, limit: int, in_flight: InFlight, send: Callable[[bytes, msgspec.Struct], None]) -> None:
        """limit: held messages at most; in_flight: counts a refused generate as admission
        would; send: a reply to a client."""
        self.limit = limit
        self._in_flight = in_flight
        self._send = send
        self.starting = True
        self._held: deque[tuple[bytes, ClientRequest, float]] = deque()
        self._held_generates: set[tuple[bytes, str]] = set()  # (identity, request id)

    def holding(self, identity: bytes, request_id: str | None) -> bool:
        """Whether a generate of this connection is held under `request_id`."""
        return (identity, request_id) in self._held_generates

    def id_in_use(self, identity: bytes, request_id: str | None) -> bool:
        """Whether a generate of this connection is held, or in flight, under `request_id`:
        anything else sent under it is answered under no id (one end per request)."""
        return self.holding(identity, request_id) or self._in_flight.running(identity, request_id)

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, identity: bytes, message: ClientRequest) -> bool:
        """Whether `message` waits for the start to end (held, or answered as overflow)."""
        if not self.starting or isinstance(message, ANSWERED_WHILE_STARTING):
            return False
        if isinstance(message, Generate) and self.id_in_use(identity, message.request_id):
            # (in flight: released already, while the release yields)
            self._in_flight.refuse_reused_id(identity, message.request_id, "Generate")
        elif len(self._held) >= self.limit:
            self._refuse(identity, message, ErrorCode.OVERLOADED,
                         f"the server is starting and already holds {len(self._held)} requests for when it "
                         "serves; retry once its health says ok")
        else:
            self._held.append((identity, message, time.monotonic()))
            if isinstance(message, Generate) and 0 < len(message.request_id) <= MAX_REQUEST_ID_CHARS:
                # (an id admission refuses is never a request's: its refusal goes out under no id)
                self._held_generates.add((identity, message.request_id))
        return True

    def forget(self, identity: bytes) -> None:
        """A client that disconnected: its held messages would start work nobody reads."""
        self._held = deque(entry for entry in self._held if entry[0] != identity)
        self._held_generates = {key for key in self._held_generates if key[0] != identity}

    def refusing(self, reason: str) -> Handle:
        """A `release` handle refusing each held message as shutting down, with `reason`."""
        return lambda identity, message, _arrived: self._refuse(identity, message, ErrorCode.SHUTTING_DOWN, reason)

    def _refuse(self, identity: bytes, message: ClientRequest, code: str, text: str) -> None:
        if isinstance(message, Generate):
            self._in_flight.refuse_unadmitted(identity, message, code, text)
        elif not isinstance(message, Cancel):  # a cancel is never answered
            self._send(identity, ErrorReply(request_id=reply_id(message.request_id), code=code, message=text))

    async def release(self, handle: Handle) -> None:
        """The start has ended (served, shutting down, or failed): each held message to
        `handle`, in order; what arrives meanwhile is held behind them."""
        yield_at = time.monotonic() + _RELEASE_YIELD_AFTER_S
        while self._held:
            identity, message, arrived = self._held.popleft()
            if isinstance(message, Generate):
                self._held_generates.discard((identity, message.request_id))
            handle(identity, message, arrived)
            if (now := time.monotonic()) >= yield_at:
                await asyncio.sleep(0)
                yield_at = now + _RELEASE_YIELD_AFTER_S
        self.starting = False
