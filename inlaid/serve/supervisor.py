"""The coordinator's handle on its executor process: spawn, talk, watch, restart. Torch-free.

One executor at a time. Each incarnation has its own ZeroMQ identity (its generation), so
a late message from a dead incarnation can never be taken for an answer of the new one.

Losing the executor is detected three ways, and handled once per incarnation (`_lose`):
its connection closes (socket monitor), its process exits (`_watch`), or a step runs past
`step_timeout_s`. Losing it clears `ready` before anything else, fails the step in flight
and kills the process if it still runs, so no caller can keep sending plans to a dead
executor, and every restart goes through `_watch`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from inlaid.engine.config import EngineConfig
from inlaid.protocol import (
    PROTOCOL_VERSION,
    BatchPlan,
    ExecutorFailure,
    ExecutorHello,
    ExecutorOutbound,
    ExecutorShutdown,
    ExecutorStartFailure,
    ExecutorStats,
    LayerSwapResult,
    StepResult,
)
from inlaid.serve.child_process import FieldsLog, wait_or_kill
from inlaid.serve.executor import executor_identity
from inlaid.serve.executor_errors import ExecutorBindError, ExecutorLostError, ExecutorStepError
from inlaid.serve.ipc_dirs import listen_again_if_gone
from inlaid.serve.peers import PeerWatch

log = logging.getLogger("inlaid.supervisor")


_RESTART_BACKOFF_S = (0.2, 1.0, 2.0, 5.0, 10.0)  # by the number of failed starts in a row
MAX_START_FAILURES = 3  # executors dying before their hello, in a row: give up (unless others serve)
_START_ERROR_WAIT_S = 1.0  # the executor's socket lingers as long to deliver its ExecutorStartFailure
HELD_DOWN_RETRY_S = 60.0  # past MAX_START_FAILURES while other executors serve: a try a minute
_EXIT_AFTER_DISCONNECT_S = 1.0


# A step running this share of the step timeout makes health read "stalled" (info_calls.py)
# and logs one WARNING (a probe stopped an executor for 25 s: health said stalled, no log did).
STALLED_AFTER_FRACTION = 0.25


@dataclasses.dataclass
class StepTiming:
    round_trip_seconds: float  # plan encoded and sent -> result received and decoded
    compute_seconds: float  # the executor's own time for the step


class ExecutorSupervisor:
    def __init__(
        self,
        engine_config: EngineConfig,
        address: str,
        *,
        on_lost: Callable[[str, bool], None],
        on_fatal: Callable[[str], None],
        start_timeout_s: float = 600.0,
        step_timeout_s: float = 300.0,
        log_level: str = "INFO",
        log_format: str = "json",
        on_swap_result: Callable[[LayerSwapResult], None] | None = None,
        others_serving: Callable[[], bool] = lambda: False,
        index: int = 0,
    ) -> None:
        """others_serving: whether another executor of the server is ready. MAX_START_FAILURES
        failed starts in a row stop the server only when none is: one bad device of several
        ended the whole server, the healthy executors' requests with it (an outside probe)."""
        self.engine_config = engine_config
        self.index = index  # the server's executor number: every log line names it (two executors' read alike)
        self._log = FieldsLog(log, {"executor": index})
        self.others_serving = others_serving
        self.on_swap_result = on_swap_result
        self.address = address
        self.on_lost = on_lost
        self.on_fatal = on_fatal
        self.start_timeout_s = start_timeout_s
        self.step_timeout_s = step_timeout_s
        self.log_level = log_level
        self.log_format = log_format
        self.ready = asyncio.Event()
        self.generation = 0
        self.restarts = 0
        self.hello: ExecutorHello | None = None
        self._start_error = ""  # the current incarnation's ExecutorStartFailure, if it sent one
        self._start_error_read = asyncio.Event()
        self.stats: ExecutorStats | None = None
        self.timings: deque[StepTiming] = deque(maxlen=256)
        self._process: asyncio.subprocess.Process | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ExecutorOutbound)
        self._pending: tuple[int, asyncio.Future[tuple[StepResult, float]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_failures = 0
        self._stopping = False
        self._lost_generation = 0  # the last incarnation whose loss was handled
        self._peers: PeerWatch | None = None

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a dead executor raises, not vanishes
        try:
            sock.bind(self.address)
        except zmq.ZMQError as error:
            sock.close(linger=0)
            raise ExecutorBindError(f"cannot listen on server.executor_address {self.address}: {error}") from None
        self._socket = sock
        self._peers = PeerWatch(sock, self._on_peer_gone)
        self._spawn_task(self._receive_loop())
        self._spawn_task(self._peers.run())
        await self._spawn()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the executor to exit; kill it if it does not within `timeout_s`."""
        self._stopping = True
        self.ready.clear()
        process = self._process
        if process is not None and process.returncode is None:
            if self._pending is not None or self.hello is None:
                # Still loading, or still inside a step after the coordinator's grace period:
                # every request has been answered, and waiting would only delay the exit.
                self._log.warning("executor still busy at shutdown; killing it",
                                  extra={"pid": process.pid, "loading": self.hello is None})
                process.kill()
            else:
                try:
                    await self._send(ExecutorShutdown())
                except (zmq.ZMQError, ExecutorLostError):
                    pass
            await wait_or_kill(process, timeout_s, "executor")
        for task in list(self._tasks):
            task.cancel()
        if self._peers is not None:
            self._peers.close()
            self._peers = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _lose(self, generation: int, reason: str, restartable: bool = True) -> None:
        """Executor `generation` can serve no more: handled once, whichever way it was noticed.
        `restartable`: its requests with no output yet may run again elsewhere (not after a
        step timeout: a prompt that hangs a step would cost everyone a second timeout)."""
        if self._stopping or generation != self.generation or generation == self._lost_generation:
            return
        self._lost_generation = generation
        self.ready.clear()
        self._log.error("executor lost", extra={"generation": generation, "reason": reason})
        self._fail_pending(ExecutorLostError(reason))
        self.on_lost(reason, restartable)
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()  # no connection, or hung: it can never answer; `_watch` restarts it

    def _on_peer_gone(self, identity: bytes) -> None:
        if identity == executor_identity(self.generation) and self._lost_generation != self.generation:
            self.ready.clear()  # no plan goes to it from now on
            self._spawn_task(self._lose_unless_exiting(self.generation))

    async def _lose_unless_exiting(self, generation: int) -> None:
        # A process on its way out closes its connection first: give it a moment, so that
        # the loss is reported (by `_watch`) with its exit status when it has one.
        process = self._process
        if process is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), _EXIT_AFTER_DISCONNECT_S)
        except asyncio.TimeoutError:
            self._lose(generation, f"executor (pid {process.pid}) closed its connection")

    def _spawn_task(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """A watch, receive or peer task that raised would leave the executor unwatched or
        unheard, the server up and answering nothing: the server stops instead, saying why."""
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None and not self._stopping:
            self._log.error("an executor supervision task failed", extra={"task": task.get_coro().__qualname__,
                                                                           "error": repr(error)})
            self.on_fatal(f"the supervision of executor {self.index} failed: {type(error).__name__}: {error}")

    async def _spawn(self) -> None:
        if self._socket is not None:
            listen_again_if_gone(self._socket, self.address, self._log)
        self.generation += 1
        self.hello = None
        self._start_error = ""
        self._start_error_read.clear()
        self.stats = None  # a dead executor's figures are not this one's
        self.ready.clear()
        command = [
            sys.executable, "-m", "inlaid.serve.executor",
            "--address", self.address,
            "--generation", str(self.generation),
            "--engine-config", json.dumps(dataclasses.asdict(self.engine_config)),
            "--parent-pid", str(os.getpid()),
            "--log-level", self.log_level,
            "--log-format", self.log_format,
            "--index", str(self.index),
        ]  # fmt: skip
        # start_new_session: a terminal's Ctrl-C reaches the coordinator only, which then
        # stops the executor itself after draining.
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                       start_new_session=True)
        self._process = process
        self._log.info("executor started", extra={"pid": process.pid, "generation": self.generation})
        self._spawn_task(self._watch(process, self.generation))
        self._spawn_task(self._start_deadline(process, self.generation))

    async def _start_deadline(self, process: asyncio.subprocess.Process, generation: int) -> None:
        await asyncio.sleep(self.start_timeout_s)
        if generation == self.generation and self.hello is None and process.returncode is None:
            self._log.error("executor did not become ready in time; killing it",
                            extra={"pid": process.pid, "timeout_s": self.start_timeout_s})
            process.kill()

    async def _watch(self, process: asyncio.subprocess.Process, generation: int) -> None:
        code = await process.wait()
        if code == 1 and self.hello is None:  # a failed start: its ExecutorStartFailure, sent before the exit
            try:
                await asyncio.wait_for(self._start_error_read.wait(), _START_ERROR_WAIT_S)
            except TimeoutError:  # an exit without one (an import error, say): the exit code alone
                pass
        if self._stopping or generation != self.generation:
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        said = f": {self._start_error}" if self._start_error and self.hello is None else ""
        reason = f"executor (pid {process.pid}) died with {how}{said}"
        self._log.info("executor exited", extra={"pid": process.pid, "generation": generation, "returncode": code})
        self._lose(generation, reason)
        self._start_failures = self._start_failures + 1 if self.hello is None else 0
        await self._restart(reason)

    async def _restart(self, reason: str) -> None:
        """Start the next incarnation once the back-off has passed. A start that cannot even
        spawn the process (out of file descriptors, fork refused) counts as a failed start:
        it ended every restart for good, the server up and answering no generate (a probe)."""
        while True:
            # Back off only while starts keep failing (indexed by failures in a row, not by the
            # restarts of the server's whole life); an executor that had served comes back at once.
            delay = _RESTART_BACKOFF_S[min(self._start_failures, len(_RESTART_BACKOFF_S) - 1)]
            if self._start_failures >= MAX_START_FAILURES:
                failed = f"the executor failed to start {self._start_failures} times in a row; last: {reason}"
                if not self.others_serving():
                    self.on_fatal(failed)
                    return
                self._log.error("executor keeps failing to start; the other executors serve, and it is tried again",
                                extra={"reason": failed, "retry_in_s": HELD_DOWN_RETRY_S,
                                       "device": self.engine_config.device})
                delay = HELD_DOWN_RETRY_S
            self.restarts += 1
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
                return
            except OSError as error:
                reason = f"the executor process could not be started: {type(error).__name__}: {error}"
                self._log.error("executor could not be started", extra={"error": str(error)})
                self._start_failures += 1

    # ------------------------------------------------------------------ messages
    async def _send(self, message: msgspec.Struct) -> None:
        if self._socket is None:
            raise ExecutorLostError("the executor socket is closed")
        generation = self.generation
        try:
            await self._socket.send_multipart([executor_identity(generation), self._encoder.encode(message)])
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise
            reason = f"executor (pid {self.pid}) is not connected"
            self._lose(generation, reason)
            raise ExecutorLostError(reason) from error

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            try:
                identity_frame, *data = await self._socket.recv_multipart(copy=False)
            except zmq.ZMQError as error:
                self._log.error("executor socket receive failed", extra={"error": str(error)})
                await asyncio.sleep(0.01)
                continue
            received = time.perf_counter()
            if self._peers is not None:
                self._peers.saw(identity_frame)
            identity, frames = identity_frame.bytes, [frame.bytes for frame in data]
            if identity != executor_identity(self.generation) or len(frames) != 1:
                continue  # a previous incarnation's last words
            try:
                message = self._decoder.decode(frames[0])
            except (msgspec.DecodeError, ValueError) as error:
                self._log.error("undecodable frame from the executor", extra={"error": str(error)})
                continue
            if isinstance(message, StepResult):
                pending = self._pending
                if pending is not None and pending[0] == message.step_id and not pending[1].done():
                    pending[1].set_result((message, received))
            elif isinstance(message, ExecutorFailure):
                pending = self._pending
                if pending is not None and pending[0] == message.step_id and not pending[1].done():
                    pending[1].set_exception(ExecutorStepError(f"{message.error_type}: {message.message}"))
            elif isinstance(message, ExecutorStats):
                self.stats = message
            elif isinstance(message, LayerSwapResult):
                if self.on_swap_result is not None:
                    try:
                        self.on_swap_result(message)
                    except Exception:  # a bug there must not end the loop: no step result would be read
                        self._log.exception("a layer swap's result could not be handled",
                                            extra={"layer": message.layer, "version": message.version})
            elif isinstance(message, ExecutorStartFailure):  # its last words: why it could not start
                self._start_error = f"{message.error_type}: {message.message}"
                self._start_error_read.set()
            elif isinstance(message, ExecutorHello):
                if self._lost_generation == self.generation:
                    continue  # said just before it was lost (killed, disconnected): never ready
                if message.protocol_version != PROTOCOL_VERSION:
                    self.on_fatal(f"executor speaks protocol {message.protocol_version}, "
                                  f"coordinator {PROTOCOL_VERSION}")
                    continue
                self.hello = message
                self._start_failures = 0
                self.ready.set()
                self._log.info("executor connected", extra={"pid": message.pid, "generation": message.generation,
                                                            "device": message.device,
                                                            "load_seconds": round(message.load_seconds, 3)})

    def _fail_pending(self, error: Exception) -> None:
        if self._pending is not None and not self._pending[1].done():
            self._pending[1].set_exception(error)
            self._pending[1].exception()  # retrieved here: after a step timeout nobody awaits it
        self._pending = None

    async def execute(self, plan: BatchPlan) -> StepResult:
        """Run one plan on the executor. Raises ExecutorLostError (then `ready` is clear and
        the running requests have been failed) or ExecutorStepError (the plan raised)."""
        if not self.ready.is_set():
            # The plan was made for an executor that is gone: its requests cannot run on it.
            self.on_lost("no executor is ready", True)
            raise ExecutorLostError("no executor is ready")
        generation = self.generation
        future: asyncio.Future[tuple[StepResult, float]] = asyncio.get_running_loop().create_future()
        self._pending = (plan.step_id, future)
        sent = time.perf_counter()
        try:
            await self._send(plan)
            stalled_after = STALLED_AFTER_FRACTION * self.step_timeout_s
            try:
                result, received = await asyncio.wait_for(asyncio.shield(future), stalled_after)
            except asyncio.TimeoutError:  # health reads "stalled" from now on: the log says so too
                self._log.warning("a step is running long: health reads stalled until it ends; at the step timeout "
                                  "the executor is killed",
                                  extra={"step_id": plan.step_id, "running_s": round(stalled_after, 1),
                                         "timeout_s": self.step_timeout_s, "pid": self.pid})
                result, received = await asyncio.wait_for(asyncio.shield(future), self.step_timeout_s - stalled_after)
                self._log.info("the long step ended", extra={"step_id": plan.step_id,
                                                             "running_s": round(time.perf_counter() - sent, 1)})
        except asyncio.TimeoutError:
            reason = f"executor (pid {self.pid}) ran a step past the step timeout ({self.step_timeout_s:g} s)"
            self._log.error("step timed out; killing the executor", extra={"step_id": plan.step_id,
                                                                            "timeout_s": self.step_timeout_s})
            self._lose(generation, reason, restartable=False)
            raise ExecutorLostError(reason) from None
        finally:
            if self._pending is not None and self._pending[1] is future:
                self._pending = None
        if plan.chunks:  # a plan of layer swaps only (a restart's restore: seconds) is no step
            self.timings.append(StepTiming(received - sent, result.compute_seconds))
        return result
