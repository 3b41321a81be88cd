"""Re-tuning the scheduler live: the start-up tuning (inlaid/scheduling/autotune.py) chose the
inlaid policy's options for the task count the server started with; tasks added or removed
while serving can move that count far (9 tasks at start, 200 an hour later), and the best
options with it (docs/scheduling.md, "Tuning on the serving machine"). When the count moves
by `factor` or more from the count last tuned for, the same tuning runs again in a worker
thread for the new count and its options are applied to every executor's policy in place
(InlaidPolicy.retune: queued requests, the length predictor and the fairness counters stay).

One tuning at a time: changes during a tuning are looked at again when it ends. A failed
tuning is logged and the options in force stay. Tunings are cached per task count in the
state directory, so going back to a count tuned before costs nothing.

The start-up tuning itself runs in `StartupTuning`: a shutdown while it tunes abandons it
instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from inlaid.engine.scheduler import SchedulingPolicy

log = logging.getLogger("inlaid.coordinator")

# tune(num_tasks, progress) -> the [scheduler] options; progress(done, total) after each simulation.
TuneOptions = Callable[[int, Callable[[int, int], None]], dict[str, Any]]
T = TypeVar("T")


class TuningCancelled(Exception):
    """The server stops: the tuning in its worker thread ends at its next simulation."""


class LiveRetuning:
    def __init__(self, tune: TuneOptions, tuned_for: int, policies: Callable[[], list[SchedulingPolicy]],
                 factor: float = 2.0) -> None:
        """tune: runs in a worker thread. tuned_for: the task count the start-up tuning used.
        policies: every executor's policy now (they are re-tuned in place)."""
        if factor <= 1.0:
            raise ValueError("the re-tuning factor must be > 1")
        self._tune = tune
        self.tuned_for = max(1, tuned_for)
        self._policies = policies
        self.factor = factor
        self.task_count = self.tuned_for
        self.retunings = 0  # tunings applied since start
        self._running: asyncio.Future[dict[str, Any]] | None = None
        self._cancelled = threading.Event()

    def far_from_tuned(self, count: int) -> bool:
        count = max(1, count)
        return count >= self.tuned_for * self.factor or count * self.factor <= self.tuned_for

    def on_task_count(self, count: int) -> None:
        """The server now serves `count` tasks (called on the event loop after every change)."""
        self.task_count = count
        if self._running is None and not self._cancelled.is_set() and self.far_from_tuned(count):
            self._start(max(1, count))

    def _start(self, count: int) -> None:
        log.info("re-tuning the scheduler", extra={"tasks": count, "tuned_for": self.tuned_for})
        running = asyncio.get_running_loop().run_in_executor(None, self._tune, count, self._progress)
        running.add_done_callback(lambda future: self._done(count, future))
        self._running = running

    def _progress(self, done: int, total: int) -> None:
        if self._cancelled.is_set():
            raise TuningCancelled

    def _done(self, count: int, future: asyncio.Future[dict[str, Any]]) -> None:
        self._running = None
        if future.cancelled() or self._cancelled.is_set():
            return
        error = future.exception()
        if error is not None:
            log.error("scheduler re-tuning failed; the options in force stay",
                      extra={"tasks": count, "error": f"{type(error).__name__}: {error}"})
            self.tuned_for = count  # do not retry the same count at every change
        else:
            self._apply(count, future.result())
        self.on_task_count(self.task_count)  # changes made during the tuning

    def _apply(self, count: int, options: dict[str, Any]) -> None:
        from inlaid.scheduling.registry import retune_policy

        try:
            applied = [retune_policy(policy, options) for policy in self._policies()]
        except ValueError as error:  # the tuning's options are checked before any policy takes them
            log.error("scheduler re-tuning gave options the policy refuses; the options in force stay",
                      extra={"tasks": count, "error": str(error)})
            self.tuned_for = count
            return
        self.tuned_for = count
        self.retunings += 1
        log.info("scheduler re-tuned", extra={"tasks": count, "options": options,
                                              "policies": sum(result is not None for result in applied)})

    async def stop(self) -> None:
        """End a tuning in progress (at its next simulation) and wait for its thread."""
        self._cancelled.set()
        running = self._running
        if running is not None:
            await asyncio.gather(running, return_exceptions=True)


class StartupTuning(Generic[T]):
    """The start-up tuning (`tune`, the coordinator's tune_policies) in a thread of its own,
    which a shutdown can abandon: SIGTERM while it ran waited for the whole tuning (with a
    slow one, until the shutdown watchdog dumped every stack and exited 1).

    The thread is a daemon, not the loop's default executor's: asyncio.run joins that pool's
    threads at exit, so an abandoned tuning would still hold the process. It is also told to
    stop (`abandon_tuning`, checked before each simulation), so it ends within a simulation
    and writes no cache file for a tuning it did not finish."""

    def __init__(self, tune: Callable[[], T]) -> None:
        self._tune = tune
        self._abandon = threading.Event()
        self._started = time.monotonic()
        self.future: asyncio.Future[T] | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> StartupTuning[T]:
        from inlaid.scheduling.autotune import TuningAbandoned, abandon_tuning

        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def work() -> None:
            abandon_tuning.set(self._abandon)
            try:
                outcome: tuple[T | None, BaseException | None] = (self._tune(), None)
            except TuningAbandoned:
                return
            except BaseException as error:  # noqa: BLE001  (handed to the waiter, as run_in_executor does)
                outcome = (None, error)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop closed: the server stopped without waiting
                pass

        self._started = time.monotonic()
        self.future = future
        self.thread = threading.Thread(target=work, name="scheduler-tuning", daemon=True)
        self.thread.start()
        return self

    async def finished_unless(self, stop: asyncio.Event) -> bool:
        """Wait for the tuning, or for `stop` (the server's shutdown): True when the tuning
        ended (`future` holds its result or error); False when it was abandoned."""
        assert self.future is not None, "start() first"
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({self.future, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if self.future.done():
            return True
        self.abandon()
        return False

    def abandon(self) -> None:
        """Give the tuning up: its thread ends at its next simulation; the server neither
        waits for it nor uses its result."""
        self._abandon.set()
        if self.future is not None:
            self.future.cancel()
        log.info("scheduler tuning abandoned: the server stops",
                 extra={"tuned_s": round(time.monotonic() - self._started, 1)})


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # abandoned meanwhile: nobody waits for it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
