"""The coordinator process: clients in front, the executors behind, an Engine for each.

One asyncio loop (uvloop) runs: the front (a ZeroMQ ROUTER, read at once into a bounded
inbox per connection, `front_inbox.py`; each frame is then decoded, checked and answered or
turned into an engine request: `in_flight.py` holds the requests from admission to their
answer), one step loop per executor (plan
with `Engine.begin_step`, run on the executor, apply with `Engine.finish_step`, stream the
text back), the executor supervisors, and with several executors the placement of
requests on them (`executor_pool.py`, docs/scale-out.md). Read-only calls (hello, health,
stats, metrics) are `info_calls.py`'s; until the server serves (the start-up tuning),
requests other than those wait in `startup_hold.py`. Never imports torch.

Every bad input is answered with a typed ErrorReply, carrying the request id it answers,
to its sender only; nothing a client sends can stop the loops. A client that disconnects
has its requests cancelled (`PeerWatch`). docs/serving.md, "Failure model", lists what
each fault does to whom.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from inlaid.engine.engine import RequestOutput
from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.protocol import (AddTask, BatchPlan, Cancel, ClientRequest, ErrorCode, ErrorReply, Generate, ListTasks,
                             RemoveTask, StepResult, TaskStatus, shown_names)
from inlaid.serve.admin import TaskCalls
from inlaid.serve.config import ServerConfig, base_model_id
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_errors import ExecutorBindError
from inlaid.serve.executor_pool import ExecutorPool, ExecutorShard
from inlaid.serve.frames import decode_client_frames, readable_head
from inlaid.serve.front_inbox import FrontInbox
from inlaid.serve.in_flight import InFlight
from inlaid.serve.info_calls import INFO_CALLS, SERVER_VERSION, InfoCalls
from inlaid.serve.ipc_dirs import private_ipc_dir
from inlaid.serve.shutdown_signals import ShutdownSignals
from inlaid.serve.metrics import FRAMES_QUEUED, REPLIES_UNREAD, ServerMetrics
from inlaid.serve.peers import FrontReplies, PeerWatch, front_socket
from inlaid.serve.requantizer_status import requantizer_metrics
from inlaid.serve.retuning import LiveRetuning, StartupTuning, TuneOptions
from inlaid.serve.startup_hold import StartupHold
from inlaid.serve.step_loop import StepLoop
from inlaid.serve.supervisor import ExecutorSupervisor
from inlaid.serve.task_registry import TaskError, TaskRegistry

log = logging.getLogger("inlaid.coordinator")

# After the grace period: the executor's stop timeout (10 s) plus closing the sockets.
_SHUTDOWN_WATCHDOG_MARGIN_S = 20.0
_REBALANCE_INTERVAL_S = 0.1  # several executors: look for stranded waiting work this often
# Frames a connection may have waiting to be handled (front_inbox.py): ZeroMQ's own default
# receive limit, or the server's whole pending capacity if that is more.
_MIN_FRAMES_QUEUED = 1000
# A client's disconnect is acted on this long after it is seen, once no frame waits: the
# frames it sent before closing (a Cancel) are read first (peers.py).
_CLIENT_GONE_SETTLE_S = 0.05


class Coordinator:
    def __init__(self, config: ServerConfig,
                 policy_factory: Callable[[], SchedulingPolicy | None] = lambda: None,
                 tune_policies: Callable[[], Callable[[], SchedulingPolicy | None]] | None = None,
                 retune_options: TuneOptions | None = None) -> None:
        """policy_factory: a fresh scheduling policy for each executor's engine (None: FIFO).
        tune_policies: the start-up tuning, run in a thread while the executors load their
        model; the policy factory it returns replaces policy_factory's policies before serving.
        retune_options: the same tuning for a task count, run again when live task changes
        move the count far (inlaid/serve/retuning.py)."""
        self.config = config
        self._tune_policies = tune_policies
        self.limits = config.limits
        self.pool = ExecutorPool(config, policy_factory)
        self.engine = self.pool.shards[0].engine  # tokenizer, model and limits: the same in every engine
        self.registry = TaskRegistry(self.pool.engines, config.admin_token)
        for name, adapter_dir in config.tasks.items():
            try:
                self.registry.add(name, adapter_dir, self.registry.check_adapter(name, adapter_dir))
            except TaskError as error:
                raise ValueError(f"task {name!r} in the config: {error.message}") from None
        self._encoder = msgspec.msgpack.Encoder()
        self._shutdown = asyncio.Event()
        self._accepting = True
        self._front: zmq.asyncio.Socket | None = None
        self._replies: FrontReplies | None = None
        self._clients: PeerWatch | None = None
        self._inbox: FrontInbox | None = None
        self.retuning = LiveRetuning(retune_options, len(config.tasks),
                                     lambda: [engine.scheduler.policy for engine in self.pool.engines]
                                     ) if retune_options is not None else None
        self.dynamic = DynamicTasks(config, self.registry, wake=self._wake, on_task_count=self._on_task_count)
        self.task_calls = TaskCalls(self.registry, self._reply_to_admin, self.dynamic, lambda: self._accepting)
        self._tempdir: str | None = None
        self._signals = ShutdownSignals()
        self.exit_code = 0
        self.start_error: str | None = None  # why run() could not start serving (exit 2)
        self.counters = {"received": 0, "finished": 0, "failed": 0, "overloaded": 0, "rejected": 0, "abandoned": 0,
                         "steps": 0, "tokens": 0, "frames_refused": 0}
        self.in_flight = InFlight(self.limits, self.pool, self.registry, self._send, lambda: self._accepting,
                                  self.counters)
        self.metrics = ServerMetrics(self.pool.shards, self.registry.tasks, self.in_flight.by_engine_id,
                                     {"version": SERVER_VERSION, "model": base_model_id(config.engine.model_dir)},
                                     scraped=functools.partial(requantizer_metrics, self.dynamic),
                                     per_task_histograms=config.task_histograms)
        self.in_flight.metrics = self.metrics
        self.registry.on_unregistered.append(self._on_task_gone)
        self.startup = StartupHold(self.limits.max_pending_requests, self.in_flight, self._send)
        self.info_calls = InfoCalls(config, self.pool, self.dynamic, self.counters, self.metrics, self._send,
                                    lambda: self._accepting, self._count_refused,
                                    lambda: len(self.startup) if self.startup.starting else None)

    # ================================================================== lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        front = front_socket(self.limits.max_frame_bytes, self.limits.max_pending_requests)
        try:
            front.bind(self.config.address)
        except zmq.ZMQError as error:  # in use, or not an address this machine has
            front.close(linger=0)
            return self._cannot_listen(self.config.address, str(error),
                                       f"cannot listen on server.address {self.config.address}: {error}")
        self._front = front
        self._replies = FrontReplies(front, self.in_flight.client_gone)
        self._inbox = FrontInbox(front, max(_MIN_FRAMES_QUEUED, self.limits.max_pending_requests),
                                 self.limits.max_frame_bytes,
                                 on_read=lambda frame: self._clients.saw(frame),  # type: ignore[union-attr]
                                 dropped=self._replies.is_cut_off, handle=self._handle, refuse=self._refuse_queued,
                                 refuse_dropped=lambda: self._count_refused(REPLIES_UNREAD))
        self._clients = PeerWatch(front, self._on_client_gone, settle_s=_CLIENT_GONE_SETTLE_S,
                                  backlog=self._inbox.waiting)
        for shard, address in zip(self.pool.shards, self._executor_addresses()):
            shard.supervisor = ExecutorSupervisor(
                shard.engine.config, address, on_lost=functools.partial(self._on_executor_lost, shard),
                on_fatal=self._on_fatal, start_timeout_s=self.limits.executor_start_timeout_s,
                step_timeout_s=self.limits.step_timeout_s, log_level=self.config.log_level,
                log_format=self.config.log_format, others_serving=functools.partial(self.pool.others_ready, shard),
                on_swap_result=functools.partial(self.dynamic.jobs.on_swap_result, executor=shard.index),
                index=shard.index,
            )  # fmt: skip
            shard.step_loop = StepLoop(shard.engine, shard.supervisor, on_plan=functools.partial(self._on_plan, shard),
                                       deliver=functools.partial(self._on_step_result, shard),
                                       fail_running=functools.partial(self._fail_running, shard),
                                       counters=self.counters,
                                       swaps=self.dynamic.jobs.for_executor(shard.index),
                                       fail_waiting=functools.partial(self.in_flight.fail_waiting, shard))  # fmt: skip
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_shutdown, signum)
        # The front runs from here: health says "starting" while the executors load and the
        # tuning runs; other requests are held until the server serves (startup_hold.py).
        loops = [loop.create_task(self._inbox.read_loop()), loop.create_task(self._inbox.handle_loop()),
                 loop.create_task(self._clients.run())]
        for task in loops:
            task.add_done_callback(self._on_loop_ended)
        # Abandonable: SIGTERM while it tunes stops the server at once (StartupTuning).
        tuning = StartupTuning(self._tune_policies).start() if self._tune_policies else None
        try:
            await asyncio.gather(*(shard.supervisor.start() for shard in self._supervised()))
        except BaseException as error:  # an executor that cannot start ends the server: so does its tuning
            if tuning is not None:
                tuning.abandon()
            self._accepting = False
            self._shutdown.set()  # the front loops' end is no fault now
            for task in loops:
                task.cancel()
            await self.startup.release(self.startup.refusing(f"the server could not start: {error!r}"))
            front.close(linger=1000)  # the refusals go out before the process ends
            if isinstance(error, ExecutorBindError):  # a config error: one line and exit 2, as server.address's
                return self._cannot_listen(self.config.executor_address, str(error), str(error))
            raise
        if tuning is not None and await tuning.finished_unless(self._shutdown):
            await self._take_tuned_policies(tuning.future)
        await self.dynamic.start()
        self._on_task_count(len(self.registry.tasks))  # tasks restored from the state directory count
        log.info("coordinator listening", extra={
            "address": self.config.address, "pid": os.getpid(), "tasks": len(self.registry.tasks),
            "task_names": shown_names(sorted(self.registry.tasks)), "executors": len(self.pool),
            "held_while_starting": len(self.startup)})
        step_tasks = [loop.create_task(shard.step_loop.run()) for shard in self.pool.shards if shard.step_loop]
        if len(self.pool) > 1:
            step_tasks.append(loop.create_task(self._placement_loop()))
        for task in step_tasks:
            task.add_done_callback(self._on_loop_ended)
        loops += step_tasks
        # Held admin calls must not run once a shutdown came during the start: refused then.
        shut = self.startup.refusing("the server shut down before it served")
        await self.startup.release(lambda identity, message, arrived: (self._answer if self._accepting else shut)(
            identity, message, arrived))
        await self._shutdown.wait()
        await self._drain()
        await self.dynamic.stop()
        if self.retuning is not None:
            await self.retuning.stop()
        # Stop the executors before the step loops: a step still running now is past the
        # grace period and gets killed rather than waited for.
        await asyncio.gather(*(shard.supervisor.stop() for shard in self._supervised()))
        tasks = (*loops, *self.task_calls.pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if not self.pool.close_policies():
                self.exit_code = self.exit_code or 1
        finally:  # whatever a policy's close raises, the sockets and the ipc directory go
            self._clients.close()
            front.close()
            if self._tempdir:
                shutil.rmtree(self._tempdir, ignore_errors=True)
            faulthandler.cancel_dump_traceback_later()
        log.info("coordinator stopped", extra={"exit_code": self.exit_code, **self.counters})
        return self.exit_code

    async def _take_tuned_policies(self, tuning: asyncio.Future) -> None:
        """Wait for the start-up tuning and schedule with its policies; if it failed, keep
        the configured ones. No request has been admitted yet (arrivals are held meanwhile)."""
        try:
            factory = await tuning
        except Exception as error:  # noqa: BLE001  (tuning is an optimisation: serve without it)
            log.error("scheduler tuning failed; serving with the configured options",
                      extra={"error": f"{type(error).__name__}: {error}"})
            return
        self.pool.replace_policies(factory)

    def _on_task_count(self, count: int) -> None:
        if self.retuning is not None:
            self.retuning.on_task_count(count)

    def _on_task_gone(self, name: str) -> None:
        # Removed and drained: its figures would otherwise stay for the life of the process,
        # one set per name ever added (an outside soak: /metrics 524 -> 1,195 series in 28 min).
        self.metrics.forget_task(name)
        for shard in self.pool.shards:
            shard.forget_task(name)

    def request_shutdown(self, signum: int | None = None) -> None:
        if signum is not None:
            self._signals.on_signal(signum, len(self.in_flight))
        if not self._shutdown.is_set():
            name = signal.Signals(signum).name if signum else "request"
            log.info("shutting down: no new requests; finishing in-flight ones",
                     extra={"signal": name, "in_flight": len(self.in_flight), "grace_s": self.limits.shutdown_grace_s})
            # A shutdown must end even if something blocks the loop: past the grace period
            # plus the executor's stop timeout, a watchdog thread writes every thread's stack
            # to the log and exits with 1.
            faulthandler.dump_traceback_later(self.limits.shutdown_grace_s + _SHUTDOWN_WATCHDOG_MARGIN_S,
                                              exit=True, file=sys.stderr)
        self._accepting = False
        self._shutdown.set()

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.limits.shutdown_grace_s
        while ((len(self.in_flight) or self.task_calls.pending) and time.monotonic() < deadline
               and self.exit_code == 0 and not self._signals.stop_now):
            await asyncio.sleep(0.05)
        self._signals.drained = True
        self.in_flight.fail_all(ErrorCode.SHUTTING_DOWN, "the server shut down before this request finished")
        self.task_calls.refuse_pending()

    def shutdown_begun(self) -> bool:
        return self._shutdown.is_set()

    def _on_loop_ended(self, task: asyncio.Task[None]) -> None:
        # The loops only end when cancelled at shutdown; anything else would leave a server
        # that answers nothing, so exit (1) and let the service manager start a fresh one.
        if not task.cancelled() and not self._shutdown.is_set():
            self._on_fatal(f"a coordinator loop ended: {task.exception()!r}")

    def _on_fatal(self, reason: str) -> None:
        log.critical("cannot serve; exiting", extra={"reason": reason})
        self.exit_code = 1
        self.in_flight.fail_all(ErrorCode.EXECUTOR_FAILED, reason)
        self.request_shutdown()

    def _cannot_listen(self, address: str, error: str, start_error: str) -> int:
        """A socket of the server's that could not be bound: logged, said by `inlaid serve` in
        one line (`start_error`), exit code 2, as every start-up refusal."""
        log.critical("cannot listen", extra={"address": address, "error": error})
        self.start_error = start_error
        return 2

    def _executor_addresses(self) -> list[str]:
        backend = self.config.executor_address
        if backend != "auto":
            return [backend]  # one executor (the config allows an address only then)
        self._tempdir = private_ipc_dir("ipc")
        return [f"ipc://{self._tempdir}/executor-{shard.index}.ipc" for shard in self.pool.shards]

    def _supervised(self) -> list[ExecutorShard]:
        return [shard for shard in self.pool.shards if shard.supervisor is not None]

    async def _placement_loop(self) -> None:
        # Steps and losses rebalance at once; this catches an executor coming back.
        while True:
            await asyncio.sleep(_REBALANCE_INTERVAL_S)
            self.pool.rebalance(self.in_flight.by_engine_id)

    # ================================================================== executor faults
    def _on_executor_lost(self, shard: ExecutorShard, reason: str, restartable: bool = True) -> None:
        self.dynamic.jobs.on_executor_lost(shard.index)
        self._fail_running(shard, f"{reason}; the server restarts it, retry this request",
                           restart_unstarted=restartable)
        self.pool.rebalance(self.in_flight.by_engine_id)  # its waiting requests go to executors that are up

    def _fail_running(self, shard: ExecutorShard, message: str, code: str = ErrorCode.EXECUTOR_FAILED,
                      restart_unstarted: bool = False) -> None:
        self.in_flight.fail_running(shard, message, code, restart_unstarted)
        # The executor's adapter slots are gone (or suspect): start the slot map afresh so
        # the next plans load every adapter again.
        shard.engine.scheduler.adapters.forget_slots()
        shard.wake()

    # ================================================================== step results
    def _on_plan(self, shard: ExecutorShard, plan: BatchPlan) -> None:
        shard.count_admissions(plan)
        self.in_flight.on_plan(plan)

    def _on_step_result(self, shard: ExecutorShard, plan: BatchPlan, result: StepResult,
                        outputs: list[RequestOutput]) -> None:
        self.metrics.on_step(plan, result, outputs, shard.index)
        self.in_flight.deliver(outputs)
        self.pool.rebalance(self.in_flight.by_engine_id)

    # ================================================================== front
    def _refuse_queued(self, identity: bytes, body: list[bytes]) -> None:
        """A frame past its connection's bound in the inbox (front_inbox.py)."""
        assert self._inbox is not None
        kind, request_id = readable_head(body[0])
        if kind == "cancel":  # never refused: it frees a request's KV, and a Cancel is never answered
            self._inbox.put(identity, body, force=True)
            return
        self._count_refused(FRAMES_QUEUED)
        self._inbox.log_refused(identity)
        if request_id:  # its sender's wait ends (under no id where that id's request is in flight)
            request_id = "" if self.startup.id_in_use(identity, request_id) else request_id
            self._send(identity, ErrorReply(request_id=request_id, code=ErrorCode.OVERLOADED, message=(
                f"more than {self._inbox.per_connection} messages (or {self._inbox.max_bytes} bytes) from this "
                "connection wait to be handled: this one is dropped; send fewer at once"),
                queued_messages=self._inbox.queued(identity)))

    def _send(self, identity: bytes, message: msgspec.Struct) -> None:
        assert self._replies is not None
        self._replies.send(identity, self._encoder.encode(message))

    def _on_client_gone(self, identity: bytes) -> None:
        assert self._replies is not None and self._inbox is not None
        self._inbox.forget(identity)
        self._replies.forget(identity)
        self.startup.forget(identity)
        self.in_flight.client_gone(identity)

    def _count_refused(self, reason: str) -> None:
        """A frame refused before it became a request (unreadable, unknown, unauthorized, ...)."""
        self.counters["frames_refused"] += 1
        self.metrics.on_frame_refused(reason)

    def _reply_to_admin(self, identity: bytes, message: msgspec.Struct) -> None:
        if isinstance(message, ErrorReply) and message.code == ErrorCode.UNAUTHORIZED:
            self._count_refused(message.code)
        self._send(identity, message)

    def _handle(self, identity: bytes, body: list[bytes]) -> None:
        message = decode_client_frames(body, self.limits.max_frame_bytes)
        if isinstance(message, ErrorReply):
            self._count_refused(message.code)
            if self.startup.id_in_use(identity, message.request_id):  # its request ends once, on its own
                message = msgspec.structs.replace(message, request_id="")
            self._send(identity, message)
        elif not isinstance(message, (Generate, Cancel)) and self.startup.id_in_use(identity, message.request_id):
            self._count_refused(ErrorCode.INVALID_REQUEST)
            self.in_flight.refuse_reused_id(identity, message.request_id, type(message).__name__)
        elif not self.startup.holds(identity, message):
            self._answer(identity, message)

    def _answer(self, identity: bytes, message: ClientRequest, arrived: float | None = None) -> None:
        """arrived: when a request a starting server held came in (None: now)."""
        try:
            self._dispatch(identity, message, arrived)
        except Exception:  # a bug must cost this one message, never the server
            log.exception("internal error handling a client message",
                          extra={"request_id": message.request_id, "type": type(message).__name__})
            if isinstance(message, Generate):
                self.in_flight.internal_error(identity, message)
            else:
                self._send(identity, ErrorReply(request_id=message.request_id, code=ErrorCode.INTERNAL,
                                                message="internal server error"))

    def _dispatch(self, identity: bytes, message: ClientRequest, arrived: float | None = None) -> None:
        if isinstance(message, Generate):
            self.in_flight.generate(identity, message, arrived)
        elif isinstance(message, Cancel):
            self.in_flight.cancel(identity, message)
        elif isinstance(message, INFO_CALLS):
            self.info_calls.answer(identity, message)
        elif isinstance(message, ListTasks):
            self.task_calls.list_tasks(identity, message)
        elif isinstance(message, (AddTask, RemoveTask, TaskStatus)):
            self.task_calls.admin(identity, message)

    def _wake(self) -> None:
        for shard in self.pool.shards:
            shard.wake()
