"""The clock and memory of one `wait_task`, shared by the sync and the asyncio client."""

from __future__ import annotations

import time
from collections.abc import Callable

from inlaid.client.arguments import checked_seconds
from inlaid.client.errors import RequestTimeoutError, UnknownTaskError
from inlaid.protocol import TaskStatusReply


TASK_POLL_ANSWER_S = 10.0  # wait_task: how long one poll waits before the silence is reported


class TaskWait:
    """The clock and memory of one `wait_task` (shared by the sync and async clients): when it
    must end, how long the server has been silent, and the last status it gave."""

    def __init__(self, name: str, address: str, timeout_s: float, poll_s: float, answer_s: float,
                 first_answer_s: float) -> None:
        self.name = name
        self.address = address
        self.timeout_s = checked_seconds(timeout_s, "timeout_s")
        checked_seconds(poll_s, "poll_s", zero_ok=True)
        self.answer_s = checked_seconds(answer_s, "answer_s")
        # A server that has not answered once in this wait is not a server restarting mid-job
        # (a wrong address, one never started): its silence fails the wait after the client's
        # own timeout, as any call does, not after timeout_s (an hour by default).
        self.first_answer_s = first_answer_s
        self.deadline = time.monotonic() + self.timeout_s
        self.last_status: TaskStatusReply | None = None
        self.last_answer = time.monotonic()  # silence is counted from the wait's start until a first answer

    def poll_timeout(self) -> float:
        # A poll ends near the deadline (a reconnecting client's handshake may take as long
        # again), and always gets a moment to be answered.
        return max(0.05, min(self.answer_s, self.deadline - time.monotonic()))

    def progress(self) -> str:
        status = self.last_status
        if status is None:
            return "no status received yet"
        return f"last known: {status.phase}, layers {status.layers_done}/{status.layers_total}"

    def answered(self, status: TaskStatusReply) -> bool:
        """Whether the wait is over; raises once it has run out with the job still going."""
        self.last_status = status
        self.last_answer = time.monotonic()
        if status.phase not in ("queued", "requantizing"):
            return True
        if time.monotonic() >= self.deadline:
            raise RequestTimeoutError(f"task {self.name!r} still {status.phase} after {self.timeout_s:.0f} s "
                                      f"({self.progress()})")
        return False

    def removed(self, error: UnknownTaskError) -> UnknownTaskError:
        """The server no longer knows the task: removed while this wait ran where it had answered
        for it before (said as a bare `unknown task`, a caller could not tell it from a typo)."""
        if self.last_status is None:
            return error
        message = f"[{error.code}] task {self.name!r} was removed while this wait ran ({self.progress()})"
        return UnknownTaskError(message, error.request_id, reply=error.reply)

    def unanswered(self, error: Exception, on_silence: Callable[[float, TaskStatusReply | None], None] | None) -> None:
        """A poll got no answer (`error`): report the silence, or raise once the wait has run
        out, or `error` itself once a server never heard from in this wait has been silent for
        `first_answer_s`."""
        silent_s = time.monotonic() - self.last_answer
        if self.last_status is None and silent_s >= self.first_answer_s:
            raise error
        if time.monotonic() >= self.deadline:
            raise RequestTimeoutError(f"task {self.name!r}: no answer from {self.address} for {silent_s:.0f} s; "
                                      f"gave up after {self.timeout_s:.0f} s ({self.progress()})")
        if on_silence is not None:
            on_silence(silent_s, self.last_status)
