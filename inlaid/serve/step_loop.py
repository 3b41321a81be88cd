"""The coordinator's step loop: plan, run the plan on the executor, apply the result. Torch-free.

Every way a step can go wrong hands control back to the event loop before the next plan:
a lost executor has cleared `supervisor.ready` (the loop then suspends until a new one says
hello), a plan the executor could not run was a real round trip, and an unexpected error
pauses the loop briefly. So a fault that repeats can never turn into a busy loop that
starves the front (health, cancels, SIGTERM) and the supervisor's process watcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import msgspec

from inlaid.engine.engine import Engine, RequestOutput
from inlaid.protocol import BatchPlan, ErrorCode, LayerSwap, StepResult
from inlaid.serve.executor_errors import ExecutorLostError, ExecutorStepError
from inlaid.serve.supervisor import ExecutorSupervisor

log = logging.getLogger("inlaid.coordinator")

# After an error the loop does not understand: pause before planning again.
FAULT_PAUSE_S = 0.1
# Planning failures in a row after which the queued requests are failed too: failing what runs
# gives a transient fault its chance; a policy that fails every plan would hold the queue for ever.
PLANNING_FAILURES_BEFORE_FAILING_QUEUE = 3
_IDLE_RETRY_S = 0.05  # nothing admissible: look again this soon (or on new work)


class SwapSource(Protocol):
    """Re-quantized layers waiting to be installed (dynamic_tasks.DynamicTasks)."""

    def has_swaps(self) -> bool: ...
    def take_swaps(self) -> list[LayerSwap]: ...
    def next_swap_step_id(self) -> int: ...


class StepLoop:
    def __init__(
        self,
        engine: Engine,
        supervisor: ExecutorSupervisor,
        *,
        on_plan: Callable[[BatchPlan], None],
        deliver: Callable[[BatchPlan, StepResult, list[RequestOutput]], None],
        fail_running: Callable[[str, str], None],
        counters: dict[str, int],
        swaps: SwapSource | None = None,
        fail_waiting: Callable[[str, str], None] | None = None,
    ) -> None:
        """on_plan: a plan is about to run; deliver(plan, result, outputs): a step ran;
        fail_running(message, code): fail every request whose state lived on the executor;
        swaps: layers to install between steps (they ride the next plan, or a plan of their
        own when nothing runs); fail_waiting(message, code): fail every queued request, when
        planning keeps failing (a policy's bug would otherwise hold them unanswered for ever)."""
        self._swaps = swaps
        self._fail_waiting = fail_waiting
        self._planning_failures = 0  # in a row
        self.engine = engine
        self.supervisor = supervisor
        self._on_plan = on_plan
        self._deliver = deliver
        self._fail_running = fail_running
        self._counters = counters
        self.work = asyncio.Event()  # set when there may be something to plan
        # The coordinator's own time between a result and the next plan (apply the result,
        # stream text, plan), measured only across back-to-back steps.
        self.step_gaps: deque[float] = deque(maxlen=256)
        # When the plan now on the executor was sent (time.monotonic); None between steps.
        # Placement takes an executor whose step has run past `overdue_s` for stalled.
        self.executing_since: float | None = None

    async def run(self) -> None:
        last_result_at: float | None = None
        while True:
            swaps_waiting = self._swaps is not None and self._swaps.has_swaps()
            if not self.engine.has_unfinished() and not swaps_waiting:
                last_result_at = None
                self.work.clear()
                await self.work.wait()
                continue
            if not self.supervisor.ready.is_set():
                last_result_at = None
                await self.supervisor.ready.wait()
                continue
            try:
                plan = self.engine.begin_step()
            except Exception:  # a planning bug: fail what runs, never stop stepping
                log.exception("internal error planning a step")
                self._planning_failures += 1
                if self._planning_failures >= PLANNING_FAILURES_BEFORE_FAILING_QUEUE and self._fail_waiting is not None:
                    self._fail_waiting("internal server error: the scheduler cannot plan a step", ErrorCode.INTERNAL)
                await self._after_internal_error()
                continue
            self._planning_failures = 0
            if plan is None and swaps_waiting:
                await self._run_swaps_only()
                continue
            if plan is None:
                last_result_at = None
                self.work.clear()
                try:
                    await asyncio.wait_for(self.work.wait(), _IDLE_RETRY_S)
                except asyncio.TimeoutError:
                    pass
                continue
            if last_result_at is not None:
                self.step_gaps.append(time.perf_counter() - last_result_at)
            last_result_at = None
            if swaps_waiting:
                assert self._swaps is not None
                plan = msgspec.structs.replace(plan, layer_swaps=self._swaps.take_swaps())
            self._on_plan(plan)
            self.executing_since = time.monotonic()
            try:
                result = await self.supervisor.execute(plan)
            except ExecutorLostError:
                # The supervisor cleared `ready` and failed the running requests before it
                # raised: the next turn suspends until a new executor says hello.
                self._undone(plan)
                continue
            except ExecutorStepError as error:  # the shared forward pass raised: no one request's fault
                log.error("executor failed a plan", extra={"step_id": plan.step_id, "error": str(error)})
                self._fail_running(f"the executor failed this step: {error}", ErrorCode.EXECUTOR_FAILED)
                self._undone(plan)
                continue
            except Exception:  # a bug here must cost the running requests, never the server
                log.exception("internal error in the step loop", extra={"step_id": plan.step_id})
                self._undone(plan)
                await self._after_internal_error()
                continue
            finally:
                self.executing_since = None
            last_result_at = time.perf_counter()
            self._counters["steps"] += 1
            try:
                self._deliver(plan, result, self.engine.finish_step(result))
            except Exception:
                log.exception("internal error applying a step result", extra={"step_id": plan.step_id})
                await self._after_internal_error()

    def _undone(self, plan: BatchPlan) -> None:
        """The policy hears that a planned step never ran (no result will come): a step log
        kept each such step's plan forever, and `inlaid` took its adapters as the batch's."""
        scheduler = self.engine.scheduler
        try:
            scheduler.policy.on_undone(plan.step_id, scheduler.clock())
        except Exception:  # a plug-in's bug must not stop the step loop
            log.exception("the scheduling policy failed on a step that never ran", extra={"step_id": plan.step_id})

    async def _run_swaps_only(self) -> None:
        assert self._swaps is not None
        plan = BatchPlan(step_id=self._swaps.next_swap_step_id(), chunks=[], layer_swaps=self._swaps.take_swaps())
        try:
            await self.supervisor.execute(plan)
        except (ExecutorLostError, ExecutorStepError) as error:  # the swaps are sent again; nothing else ran
            log.warning("a plan of layer swaps did not complete", extra={"error": str(error)})
            await asyncio.sleep(FAULT_PAUSE_S)

    async def _after_internal_error(self) -> None:
        self._fail_running("internal server error while running this request", ErrorCode.INTERNAL)
        await asyncio.sleep(FAULT_PAUSE_S)
