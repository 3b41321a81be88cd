"""The coordinator process: clients in front, the executors behind, an Engine for each.

One asyncio loop (uvloop) runs: the front loop (a ZeroMQ ROUTER; each frame is decoded,
checked and answered or turned into an engine request), one step loop per executor (plan
with `Engine.begin_step`, run on the executor, apply with `Engine.finish_step`, stream the
text back), the executor supervisors, and with several executors the placement of
requests on them (`executor_pool.py`, docs/scale-out.md). Never imports torch.

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
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from inlaid.engine.engine import Engine, InvalidRequestError, RequestOutput
from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.engine.sequence import SequenceStatus
from inlaid.protocol import (
    PROTOCOL_VERSION,
    AddTask,
    BatchPlan,
    Cancel,
    ClientRequest,
    ErrorCode,
    ErrorReply,
    Generate,
    GetMetrics,
    GetStats,
    Health,
    HealthReply,
    Hello,
    HelloReply,
    ListTasks,
    MetricsReply,
    RemoveTask,
    StepResult,
    TaskStatus,
    TextChunk,
)
from inlaid.serve.admin import TaskCalls
from inlaid.serve.config import ServerConfig
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.frames import decode_client_frames
from inlaid.serve.executor_pool import ExecutorPool, ExecutorShard
from inlaid.serve.metrics import BASE_TASK_LABEL, ServerMetrics
from inlaid.serve.peers import PeerWatch
from inlaid.serve.requests import ActiveRequest, RequestKey
from inlaid.serve.stats import server_stats
from inlaid.serve.step_loop import StepLoop
from inlaid.serve.supervisor import ExecutorSupervisor
from inlaid.serve.task_registry import TaskError, TaskRegistry

log = logging.getLogger("inlaid.coordinator")

SERVER_VERSION = "0.1.0"
# Frames above max_frame_bytes get a typed error; far larger ones are cut off by ZeroMQ
# itself (the peer is disconnected) before they are ever buffered whole.
_HARD_FRAME_FACTOR = 16
# After the grace period: the executor's stop timeout (10 s) plus closing the sockets.
_SHUTDOWN_WATCHDOG_MARGIN_S = 20.0
# ZMTP heartbeats: a client whose host vanished without closing its connection is dropped
# after this long, which the PeerWatch sees as a disconnect (its requests are cancelled).
_CLIENT_HEARTBEAT_IVL_MS = 10_000
_CLIENT_HEARTBEAT_TIMEOUT_MS = 60_000
_REBALANCE_INTERVAL_S = 0.1  # several executors: look for stranded waiting work this often


class Coordinator:
    def __init__(self, config: ServerConfig,
                 policy_factory: Callable[[], SchedulingPolicy | None] = lambda: None,
                 tune_policies: Callable[[], Callable[[], SchedulingPolicy | None]] | None = None) -> None:
        """policy_factory: a fresh scheduling policy for each executor's engine (None: FIFO).
        tune_policies: the start-up tuning, run in a thread while the executors load their
        model; the policy factory it returns replaces policy_factory's policies before serving."""
        self.config = config
        self._tune_policies = tune_policies
        self.limits = config.limits
        self.pool = ExecutorPool(config, policy_factory)
        self.engine = self.pool.shards[0].engine  # tokenizer, model and limits: the same in every engine
        self.registry = TaskRegistry(self.pool.engines, config.admin_token)
        for name, adapter_dir in config.tasks.items():
            try:
                self.registry.check_adapter(name, adapter_dir)
                self.registry.add(name, adapter_dir)
            except TaskError as error:
                raise ValueError(f"task {name!r} in the config: {error.message}") from None
        self.requests: dict[RequestKey, ActiveRequest] = {}
        self._by_engine_id: dict[str, ActiveRequest] = {}
        self._by_seq_id: dict[int, ActiveRequest] = {}
        self._next_engine_id = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._shutdown = asyncio.Event()
        self._accepting = True
        self._front: zmq.asyncio.Socket | None = None
        self._clients: PeerWatch | None = None
        self.dynamic = DynamicTasks(config, self.registry, wake=self._wake)
        self.task_calls = TaskCalls(self.registry, self._send, self.dynamic)
        self._tempdir: str | None = None
        self.started_at = time.monotonic()
        self.exit_code = 0
        self.counters = {"received": 0, "finished": 0, "failed": 0, "overloaded": 0, "abandoned": 0, "steps": 0,
                         "tokens": 0}
        self.metrics = ServerMetrics(self.pool.shards, self.registry.tasks, self._by_engine_id,
                                     {"version": SERVER_VERSION, "model": os.path.basename(config.engine.model_dir)})

    # ================================================================== lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        front = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 2000)  # let the last replies out on shutdown
        front.setsockopt(zmq.SNDHWM, 100_000)  # ROUTER drops beyond it: keep streams whole
        front.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes * _HARD_FRAME_FACTOR)
        front.setsockopt(zmq.HEARTBEAT_IVL, _CLIENT_HEARTBEAT_IVL_MS)
        front.setsockopt(zmq.HEARTBEAT_TIMEOUT, _CLIENT_HEARTBEAT_TIMEOUT_MS)
        front.bind(self.config.address)
        self._front = front
        self._clients = PeerWatch(front, self._on_client_gone)
        for shard, address in zip(self.pool.shards, self._executor_addresses()):
            shard.supervisor = ExecutorSupervisor(
                shard.engine.config, address, on_lost=functools.partial(self._on_executor_lost, shard),
                on_fatal=self._on_fatal, start_timeout_s=self.limits.executor_start_timeout_s,
                step_timeout_s=self.limits.step_timeout_s, log_level=self.config.log_level,
                log_format=self.config.log_format,
                on_swap_result=functools.partial(self.dynamic.jobs.on_swap_result, executor=shard.index),
            )  # fmt: skip
            shard.step_loop = StepLoop(shard.engine, shard.supervisor, on_plan=functools.partial(self._on_plan, shard),
                                       deliver=functools.partial(self._on_step_result, shard),
                                       fail_running=functools.partial(self._fail_running, shard),
                                       counters=self.counters,
                                       swaps=self.dynamic.jobs.for_executor(shard.index))  # fmt: skip
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_shutdown, signum)
        tuning = loop.run_in_executor(None, self._tune_policies) if self._tune_policies else None
        await asyncio.gather(*(shard.supervisor.start() for shard in self._supervised()))
        if tuning is not None:
            await self._take_tuned_policies(tuning)
        await self.dynamic.start()
        log.info("coordinator listening", extra={"address": self.config.address, "pid": os.getpid(),
                                                 "tasks": sorted(self.registry.tasks), "executors": len(self.pool)})
        front_task = loop.create_task(self._front_loop())
        clients_task = loop.create_task(self._clients.run())
        step_tasks = [loop.create_task(shard.step_loop.run()) for shard in self.pool.shards if shard.step_loop]
        loops = [front_task, clients_task, *step_tasks]
        if len(self.pool) > 1:
            loops.append(loop.create_task(self._placement_loop()))
        for task in loops:
            task.add_done_callback(self._on_loop_ended)
        await self._shutdown.wait()
        await self._drain()
        await self.dynamic.stop()
        # Stop the executors before the step loops: a step still running now is past the
        # grace period and gets killed rather than waited for.
        await asyncio.gather(*(shard.supervisor.stop() for shard in self._supervised()))
        tasks = (*loops, *self.task_calls.pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for engine in self.pool.engines:
            engine.scheduler.policy.close()  # the length predictor saves its state
        self._clients.close()
        front.close()
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
        faulthandler.cancel_dump_traceback_later()
        log.info("coordinator stopped", extra={"exit_code": self.exit_code, **self.counters})
        return self.exit_code

    async def _take_tuned_policies(self, tuning: asyncio.Future) -> None:
        """Wait for the start-up tuning and schedule with its policies; if it failed, keep
        the configured ones. No request has been read yet."""
        try:
            factory = await tuning
        except Exception as error:  # noqa: BLE001  (tuning is an optimisation: serve without it)
            log.error("scheduler tuning failed; serving with the configured options",
                      extra={"error": f"{type(error).__name__}: {error}"})
            return
        self.pool.replace_policies(factory)

    def request_shutdown(self, signum: int | None = None) -> None:
        if not self._shutdown.is_set():
            name = signal.Signals(signum).name if signum else "request"
            log.info("shutting down: no new requests; finishing in-flight ones",
                     extra={"signal": name, "in_flight": len(self.requests), "grace_s": self.limits.shutdown_grace_s})
            # A shutdown must end even if something blocks the loop: past the grace period
            # plus the executor's stop timeout, a watchdog thread writes every thread's stack
            # to the log and exits with 1.
            faulthandler.dump_traceback_later(self.limits.shutdown_grace_s + _SHUTDOWN_WATCHDOG_MARGIN_S,
                                              exit=True, file=sys.stderr)
        self._accepting = False
        self._shutdown.set()

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.limits.shutdown_grace_s
        while self.requests and time.monotonic() < deadline and self.exit_code == 0:
            await asyncio.sleep(0.05)
        for request in list(self.requests.values()):
            self._fail(request, ErrorCode.SHUTTING_DOWN, "the server shut down before this request finished")

    def _on_loop_ended(self, task: asyncio.Task[None]) -> None:
        # The loops only end when cancelled at shutdown; anything else would leave a server
        # that answers nothing, so exit (1) and let the service manager start a fresh one.
        if not task.cancelled() and not self._shutdown.is_set():
            self._on_fatal(f"a coordinator loop ended: {task.exception()!r}")

    def _on_fatal(self, reason: str) -> None:
        log.critical("cannot serve; exiting", extra={"reason": reason})
        self.exit_code = 1
        for request in list(self.requests.values()):
            self._fail(request, ErrorCode.EXECUTOR_FAILED, reason)
        self.request_shutdown()

    def _executor_addresses(self) -> list[str]:
        backend = self.config.executor_address
        if backend != "auto":
            return [backend]  # one executor (the config allows an address only then)
        self._tempdir = tempfile.mkdtemp(prefix="inlaid-")
        return [f"ipc://{self._tempdir}/executor-{shard.index}.ipc" for shard in self.pool.shards]

    def _supervised(self) -> list[ExecutorShard]:
        return [shard for shard in self.pool.shards if shard.supervisor is not None]

    async def _placement_loop(self) -> None:
        # Steps and losses rebalance at once; this catches an executor coming back.
        while True:
            await asyncio.sleep(_REBALANCE_INTERVAL_S)
            self.pool.rebalance(self._by_engine_id)

    # ================================================================== executor faults
    def _on_executor_lost(self, shard: ExecutorShard, reason: str) -> None:
        self.dynamic.jobs.on_executor_lost(shard.index)
        self._fail_running(shard, f"{reason}; the server restarts it, retry this request")
        self.pool.rebalance(self._by_engine_id)  # its waiting requests go to executors that are up

    def _fail_running(self, shard: ExecutorShard, message: str, code: str = ErrorCode.EXECUTOR_FAILED) -> None:
        """Fail every request whose KV state lived on this executor; waiting ones stay queued."""
        for request in [r for r in self.requests.values() if r.executor == shard.index]:
            try:
                running = shard.engine.sequence(request.engine_id).status is SequenceStatus.RUNNING
            except KeyError:
                running = True  # the engine no longer knows it: it can never finish
            if running:
                self._fail(request, code, message)
        # The executor's adapter slots are gone (or suspect): start the slot map afresh so
        # the next plans load every adapter again.
        shard.engine.scheduler.adapters.forget_slots()
        shard.wake()

    # ================================================================== step results
    def _on_plan(self, shard: ExecutorShard, plan: BatchPlan) -> None:
        now = time.monotonic()
        shard.count_admissions(plan)
        for chunk in plan.chunks:
            request = self._by_seq_id.get(chunk.seq_id)
            if request is not None and request.scheduled_at is None:
                request.scheduled_at = now

    def _on_step_result(self, shard: ExecutorShard, plan: BatchPlan, result: StepResult,
                        outputs: list[RequestOutput]) -> None:
        self.metrics.on_step(plan, result, outputs, shard.index)
        self._deliver(outputs)
        self.pool.rebalance(self._by_engine_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            request = self._by_engine_id.get(output.request_id)
            if request is None:
                continue
            if output.new_token_ids:
                if request.first_token_at is None:
                    request.first_token_at = now
                request.token_ids.extend(output.new_token_ids)
                self.counters["tokens"] += len(output.new_token_ids)
            request.text.append(output.text_delta)
            if request.stream and (output.text_delta or output.new_token_ids):
                self._send(request.identity, TextChunk(request_id=request.request_id, text=output.text_delta,
                                                       token_ids=list(output.new_token_ids)))
            if output.error is not None:  # the executor could not compute this one request
                self._fail(request, output.error.code, output.error.message)
            elif output.finished:
                self._send(request.identity, request.done_message(output.finish_reason or "stop"))
                self.counters["finished"] += 1
                self._forget(request, output.finish_reason or "stop")
                log.debug("request finished", extra={"request_id": request.request_id, "task": request.task,
                                                     "tokens": len(request.token_ids),
                                                     "seconds": round(now - request.received_at, 4)})

    # ================================================================== front
    async def _front_loop(self) -> None:
        assert self._front is not None
        assert self._clients is not None
        while True:
            try:
                frames = await self._front.recv_multipart(copy=False)
            except zmq.ZMQError as error:
                log.error("front socket receive failed", extra={"error": str(error)})
                await asyncio.sleep(0.01)
                continue
            self._clients.saw(frames[0])
            self._handle(frames[0].bytes, [frame.bytes for frame in frames[1:]])

    def _send(self, identity: bytes, message: msgspec.Struct) -> None:
        assert self._front is not None
        future = self._front.send_multipart([identity, self._encoder.encode(message)])
        future.add_done_callback(_consume_exception)

    def _error(self, identity: bytes, request_id: str, code: str, message: str) -> str:
        self._send(identity, ErrorReply(request_id=request_id, code=code, message=message))
        return code

    def _handle(self, identity: bytes, body: list[bytes]) -> None:
        message = decode_client_frames(body, self.limits.max_frame_bytes)
        if isinstance(message, ErrorReply):
            return self._send(identity, message)
        try:
            self._dispatch(identity, message)
        except Exception:  # a bug must cost this one message, never the server
            log.exception("internal error handling a client message",
                          extra={"request_id": message.request_id, "type": type(message).__name__})
            self._error(identity, message.request_id, ErrorCode.INTERNAL, "internal server error")

    def _dispatch(self, identity: bytes, message: ClientRequest) -> None:
        if isinstance(message, Generate):
            self._on_generate(identity, message)
        elif isinstance(message, Cancel):
            self._on_cancel(identity, message)
        elif isinstance(message, Hello):
            self._on_hello(identity, message)
        elif isinstance(message, Health):
            self._on_health(identity, message)
        elif isinstance(message, GetStats):
            gaps = [gap for shard in self.pool.shards if shard.step_loop for gap in shard.step_loop.step_gaps]
            self._send(identity, server_stats(message.request_id, self.pool.shards, self.counters, gaps))
        elif isinstance(message, GetMetrics):
            self._send(identity, MetricsReply(request_id=message.request_id, text=self.metrics.exposition()))
        elif isinstance(message, ListTasks):
            self.task_calls.list_tasks(identity, message)
        elif isinstance(message, (AddTask, RemoveTask, TaskStatus)):
            self.task_calls.admin(identity, message)

    # ------------------------------------------------------------------ generate / cancel
    def _on_generate(self, identity: bytes, message: Generate) -> None:
        rejection = self._admit(identity, message)
        if rejection is None:
            self.metrics.on_admitted(self.requests[(identity, message.request_id)])
        else:
            self.metrics.on_rejected(message.task, rejection)

    def _admit(self, identity: bytes, message: Generate) -> str | None:
        """Start the request, or answer it with an error; returns that error's code."""
        request_id = message.request_id
        key = (identity, request_id)
        self.counters["received"] += 1
        if not self._accepting:
            return self._error(identity, request_id, ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if key in self.requests:
            return self._error(identity, request_id, ErrorCode.INVALID_REQUEST,
                               f"request id {request_id!r} is already in flight on this connection")
        if len(self.requests) >= self.limits.max_pending_requests:
            self.counters["overloaded"] += 1
            return self._error(identity, request_id, ErrorCode.OVERLOADED,
                               f"{len(self.requests)} requests in flight (the limit); retry later")
        try:
            self.registry.check_accepting(message.task)
        except TaskError as error:
            return self._error(identity, request_id, error.code, error.message)
        if message.deadline_s is not None and not (message.deadline_s > 0 and math.isfinite(message.deadline_s)):
            return self._error(identity, request_id, ErrorCode.INVALID_REQUEST, "deadline_s must be a positive number")
        try:
            message.sampling.validate()
            token_ids = self._prompt_tokens(message)
        except (ValueError, InvalidRequestError) as error:
            return self._error(identity, request_id, ErrorCode.INVALID_REQUEST, str(error))
        if len(token_ids) >= self.engine.max_model_len:
            return self._error(identity, request_id, ErrorCode.CONTEXT_LENGTH,
                               f"the prompt has {len(token_ids)} tokens; the context length is "
                               f"{self.engine.max_model_len} and at least one new token must fit")
        engine_id = f"r{self._next_engine_id}"
        self._next_engine_id += 1
        shard = self.pool.choose(message.task, len(token_ids), self._by_engine_id)
        try:
            shard.engine.add_request(token_ids, sampling=message.sampling, adapter=message.task, request_id=engine_id)
        except (ValueError, InvalidRequestError) as error:
            return self._error(identity, request_id, ErrorCode.INVALID_REQUEST, str(error))
        request = ActiveRequest(key=key, engine_id=engine_id, seq_id=shard.engine.sequence(engine_id).seq_id,
                                task=message.task, stream=message.stream, num_prompt_tokens=len(token_ids),
                                executor=shard.index)
        self.requests[key] = request
        self._by_engine_id[engine_id] = request
        self._by_seq_id[request.seq_id] = request
        self.registry.request_started(message.task)
        if message.deadline_s is not None:
            request.deadline = asyncio.get_running_loop().call_later(message.deadline_s, self._on_deadline, key)
        shard.wake()

    def _prompt_tokens(self, message: Generate) -> list[int]:
        given = [x is not None for x in (message.prompt, message.messages, message.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if message.messages is not None:
            chat = [{"role": m.role, "content": m.content} for m in message.messages]
            return self.engine.prompt_tokens(None, chat)
        return self.engine.prompt_tokens(message.prompt if message.prompt is not None else message.prompt_token_ids, None)

    def _on_cancel(self, identity: bytes, message: Cancel) -> None:
        request = self.requests.get((identity, message.request_id))
        if request is None:
            return  # finished already, or never existed: cancelling is idempotent
        self._engine_of(request).abort(request.engine_id)
        self._send(identity, request.done_message("cancelled"))
        self.counters["finished"] += 1
        self._forget(request, "cancelled")

    def _engine_of(self, request: ActiveRequest) -> Engine:
        return self.pool.shards[request.executor].engine

    def _wake(self) -> None:
        for shard in self.pool.shards:
            shard.wake()

    def _on_client_gone(self, identity: bytes) -> None:
        """The client's connection closed: nobody can read its answers; stop computing them."""
        gone = [request for request in self.requests.values() if request.identity == identity]
        for request in gone:
            self._engine_of(request).abort(request.engine_id)
            self.counters["abandoned"] += 1
            self._forget(request, "abandoned")
        if gone:
            log.info("client disconnected; its requests are cancelled",
                     extra={"client": identity.hex(), "requests": [r.request_id for r in gone]})

    def _on_deadline(self, key: RequestKey) -> None:
        request = self.requests.get(key)
        if request is not None:
            request.deadline = None
            self._fail(request, ErrorCode.DEADLINE_EXCEEDED,
                       f"the deadline passed after {len(request.token_ids)} generated tokens")

    def _fail(self, request: ActiveRequest, code: str, message: str) -> None:
        self._engine_of(request).abort(request.engine_id)  # frees its KV blocks; a no-op when already gone
        self._error(request.identity, request.request_id, code, message)
        self.counters["failed"] += 1
        self._forget(request, code)
        log.info("request failed", extra={"request_id": request.request_id, "code": code, "reason": message})

    def _forget(self, request: ActiveRequest, outcome: str) -> None:
        self.metrics.on_finished(request, outcome)
        self.pool.shards[request.executor].tasks_served[request.task or BASE_TASK_LABEL] += 1
        if request.deadline is not None:
            request.deadline.cancel()
        self.requests.pop(request.key, None)
        self._by_engine_id.pop(request.engine_id, None)
        self._by_seq_id.pop(request.seq_id, None)
        self.registry.request_ended(request.task)

    # ------------------------------------------------------------------ small calls
    def _on_hello(self, identity: bytes, message: Hello) -> None:
        if message.protocol_version != PROTOCOL_VERSION:
            return self._error(identity, message.request_id, ErrorCode.PROTOCOL_VERSION,
                               f"server speaks protocol {PROTOCOL_VERSION}, client {message.protocol_version}")
        self._send(identity, HelloReply(request_id=message.request_id, protocol_version=PROTOCOL_VERSION,
                                        server_version=SERVER_VERSION, model=os.path.basename(self.config.engine.model_dir),
                                        max_model_len=self.engine.max_model_len))

    def _on_health(self, identity: bytes, message: Health) -> None:
        # "ok" while any executor serves; executor_ready only when every one is up.
        ready = [shard.ready for shard in self.pool.shards]
        status = "shutting_down" if not self._accepting else ("ok" if any(ready) else "starting")
        self._send(identity, HealthReply(request_id=message.request_id, status=status, executor_ready=all(ready),
                                         uptime_seconds=time.monotonic() - self.started_at))


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a reply to a vanished client: nothing to do
