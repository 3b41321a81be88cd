"""A transformers + PEFT server behind Inlaid's protocol: the baseline of the benchmarks.

    .venv/bin/python bench/baselines/hf_peft_server.py --config server.toml

It reads the same TOML file as `inlaid serve` (docs/serving.md) and answers the same
messages, so the SDK and any replay client drive it unchanged. What it does is what a
user would write by hand: one process, one `PeftModel` holding every task's adapter
(hf_peft_batch.py), and static batching -- whenever the model is free, the requests
waiting at that moment (up to `[executor] max_num_seqs`, those that share the first
one's way of sampling) run as ONE `generate` call to its end; requests arriving
meanwhile wait for the next batch. No streaming: a streamed request gets its whole text
as one TextChunk, then its GenerateDone. Admin calls (add/remove task) are refused.

Of `[executor]` it honours device, dtype, threads, max_num_seqs and max_model_len; the
other engine settings have no meaning here. Threads: `threads` torch threads (default:
every core this process may use) and one inter-op thread -- the baseline runs alone on
the machine in the benchmarks, beside only the replay client, which does no arithmetic.

Two threads: the front thread owns the socket (decodes, validates, tokenizes, queues,
answers, enforces deadlines and cancels); the worker thread (hf_peft_worker.py) loads the
model and runs batches, handing finished replies back through an inproc socket. Requests
are accepted and queued while the model loads (health says "starting"), as `inlaid serve`
does while its executor starts.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import msgspec
import zmq

from inlaid.protocol import (
    PROTOCOL_VERSION, AddTask, AdminReply, Cancel, ErrorCode, ErrorReply, Generate, GenerateDone, GetStats,
    Health, HealthReply, Hello, HelloReply, ListTasks, RemoveTask, ServerStats, TaskInfo, TaskList,
)
from inlaid.serve.config import ConfigError, ServerConfig, load_config
from inlaid.serve.frames import decode_client_frames
from inlaid.serve.logs import setup_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peft_batch import HfPeftModel, PromptEncoder  # noqa: E402  (this folder is no package)
from hf_peft_worker import _RESULTS_ADDRESS, BatchWorker, Counters, Pending  # noqa: E402

log = logging.getLogger("inlaid.baseline")
SERVER_VERSION = "hf-peft-baseline"


class BaselineServer(BatchWorker):
    def __init__(self, config: ServerConfig) -> None:
        if config.engine.quantized_dir:
            raise ConfigError("the transformers + PEFT baseline serves the float base only (no [model] quantized_dir)")
        self.config = config
        self.encoder = PromptEncoder(config.engine.model_dir, config.engine.max_model_len)
        self.lock = threading.Condition()
        self.waiting: deque[Pending] = deque()
        self.requests: dict[tuple[bytes, str], Pending] = {}
        self.deadlines: list[tuple[float, int, tuple[bytes, str]]] = []
        self.counters = Counters()
        self.model: HfPeftModel | None = None
        self.load_error: str | None = None
        self.accepting = True
        self.stopping = False
        self.started_at = time.monotonic()
        self.context = zmq.Context.instance()
        self._encoder = msgspec.msgpack.Encoder()
        self._sequence = 0

    # ================================================================== front thread
    def run(self) -> int:
        front = self.context.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 2000)
        front.setsockopt(zmq.SNDHWM, 100_000)
        front.bind(self.config.address)
        results = self.context.socket(zmq.PULL)
        results.bind(_RESULTS_ADDRESS)
        self.front = front
        worker = threading.Thread(target=self._worker, name="baseline-worker", daemon=True)
        worker.start()
        log.info("baseline listening", extra={"address": self.config.address, "pid": os.getpid(),
                                              "tasks": sorted(self.config.tasks)})
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        shutdown_at: float | None = None
        while True:
            if self.load_error is not None:
                log.critical("cannot load the model", extra={"error": self.load_error})
                return 1
            if not self.accepting and shutdown_at is None:
                shutdown_at = time.monotonic() + self.config.limits.shutdown_grace_s
            if shutdown_at is not None and (not self.requests or time.monotonic() > shutdown_at):
                break
            ready = dict(poller.poll(self._poll_ms()))
            if results in ready:
                while results.poll(0):
                    front.send_multipart(results.recv_multipart())
            if front in ready:
                while front.poll(0):
                    frames = front.recv_multipart()
                    try:
                        self._handle(frames[0], frames[1:])
                    except Exception:  # a bug costs one request, never the server
                        log.exception("internal error handling a client frame")
                        self._send(frames[0], ErrorReply(request_id="", code=ErrorCode.INTERNAL,
                                                         message="internal server error"))
            self._expire_deadlines()
        with self.lock:
            for pending in list(self.requests.values()):
                self._fail(pending, ErrorCode.SHUTTING_DOWN, "the server shut down before this request finished")
            self.stopping = True
            self.lock.notify_all()
        worker.join(timeout=10.0)  # a running batch ends at its next token: every row is abandoned
        while results.poll(0):
            front.send_multipart(results.recv_multipart())
        front.close()
        results.close()
        log.info("baseline stopped", extra={"batches": self.counters.batches, "finished": self.counters.finished,
                                            "failed": self.counters.failed,
                                            "worker_stopped": not worker.is_alive()})
        return 0

    def request_shutdown(self, *_: object) -> None:
        self.accepting = False

    def _poll_ms(self) -> int:
        with self.lock:
            next_deadline = self.deadlines[0][0] if self.deadlines else None
        wait = 0.1 if next_deadline is None else min(0.1, max(0.0, next_deadline - time.monotonic()))
        return int(wait * 1000) + 1

    def _send(self, identity: bytes, message: msgspec.Struct) -> None:
        self.front.send_multipart([identity, self._encoder.encode(message)])

    def _handle(self, identity: bytes, body: list[bytes]) -> None:
        message = decode_client_frames(body, self.config.limits.max_frame_bytes)
        if isinstance(message, ErrorReply):
            return self._send(identity, message)
        if isinstance(message, Generate):
            return self._on_generate(identity, message)
        if isinstance(message, Cancel):
            with self.lock:
                pending = self.requests.get((identity, message.request_id))
                if pending is not None:  # else finished already: cancelling is idempotent
                    self._answer(pending, self._done(pending, [], "", "cancelled"))
            return None
        request_id = message.request_id
        if isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                return self._send(identity, ErrorReply(request_id=request_id, code=ErrorCode.PROTOCOL_VERSION, message=(
                    f"server speaks protocol {PROTOCOL_VERSION}, client {message.protocol_version}")))
            return self._send(identity, HelloReply(request_id=request_id, protocol_version=PROTOCOL_VERSION,
                                                   server_version=SERVER_VERSION, model=Path(self.config.engine.model_dir).name,
                                                   max_model_len=self.encoder.max_model_len))
        if isinstance(message, Health):
            ready = self.model is not None
            status = "shutting_down" if not self.accepting else ("ok" if ready else "starting")
            return self._send(identity, HealthReply(request_id=request_id, status=status, executor_ready=ready,
                                                    uptime_seconds=time.monotonic() - self.started_at))
        if isinstance(message, ListTasks):
            with self.lock:
                active = [p.message.task for p in self.requests.values()]
            return self._send(identity, TaskList(request_id=request_id, tasks=[
                TaskInfo(name=name, adapter_dir=path, active_requests=active.count(name))
                for name, path in sorted(self.config.tasks.items())]))
        if isinstance(message, GetStats):
            return self._send(identity, self._stats(request_id))
        if isinstance(message, (AddTask, RemoveTask)):
            return self._send(identity, ErrorReply(request_id=request_id, code=ErrorCode.INVALID_REQUEST, message=(
                "the transformers + PEFT baseline serves a fixed task set: admin calls are not supported")))
        return None

    def _on_generate(self, identity: bytes, message: Generate) -> None:
        request_id = message.request_id
        self.counters.received += 1

        def refuse(code: str, text: str) -> None:
            self._send(identity, ErrorReply(request_id=request_id, code=code, message=text))

        if not self.accepting:
            return refuse(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if (identity, request_id) in self.requests:
            return refuse(ErrorCode.INVALID_REQUEST, f"request id {request_id!r} is already in flight on this connection")
        if len(self.requests) >= self.config.limits.max_pending_requests:
            self.counters.overloaded += 1
            return refuse(ErrorCode.OVERLOADED, f"{len(self.requests)} requests in flight (the limit); retry later")
        if message.task is not None and message.task not in self.config.tasks:
            known = ", ".join(sorted(self.config.tasks)) or "none"
            return refuse(ErrorCode.UNKNOWN_TASK, f"unknown task {message.task!r}; this server has: {known}")
        if message.deadline_s is not None and not (0 < message.deadline_s < float("inf")):
            return refuse(ErrorCode.INVALID_REQUEST, "deadline_s must be a positive number")
        try:
            message.sampling.validate()
            chat = None if message.messages is None else [{"role": m.role, "content": m.content} for m in message.messages]
            prompt_ids = self.encoder.prompt_ids(message.prompt, chat, message.prompt_token_ids)
        except ValueError as error:
            return refuse(ErrorCode.INVALID_REQUEST, str(error))
        if len(prompt_ids) >= self.encoder.max_model_len:
            return refuse(ErrorCode.CONTEXT_LENGTH, f"the prompt has {len(prompt_ids)} tokens; the context length is "
                                                    f"{self.encoder.max_model_len} and at least one new token must fit")
        pending = Pending(identity=identity, message=message, prompt_ids=prompt_ids)
        with self.lock:
            self.requests[pending.key] = pending
            self.waiting.append(pending)
            if message.deadline_s is not None:
                self._sequence += 1  # ties in the heap never compare the keys
                heapq.heappush(self.deadlines, (pending.received_at + message.deadline_s, self._sequence, pending.key))
            self.lock.notify_all()

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        with self.lock:
            while self.deadlines and self.deadlines[0][0] <= now:
                _, _, key = heapq.heappop(self.deadlines)
                pending = self.requests.get(key)
                if pending is not None:
                    self._fail(pending, ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the answer was ready")

    # ------------------------------------------------------------------ replies (hold self.lock)
    def _answer(self, pending: Pending, *messages: msgspec.Struct) -> None:
        """Send a request's final reply (and any chunk before it) and forget the request."""
        pending.answered = True
        self.requests.pop(pending.key, None)
        if pending in self.waiting:
            self.waiting.remove(pending)
        for message in messages:
            self._send(pending.identity, message)

    def _fail(self, pending: Pending, code: str, text: str) -> None:
        self._answer(pending, *self._failure(pending, code, text))

    def _failure(self, pending: Pending, code: str, text: str) -> list[msgspec.Struct]:
        self.counters.failed += 1
        return [ErrorReply(request_id=pending.message.request_id, code=code, message=text)]

    def _done(self, pending: Pending, token_ids: list[int], text: str, reason: str,
              first_token_at: float | None = None) -> GenerateDone:
        now = time.monotonic()
        self.counters.finished += 1
        return GenerateDone(
            request_id=pending.message.request_id, text=text, token_ids=token_ids, finish_reason=reason,
            num_prompt_tokens=len(pending.prompt_ids),
            queue_seconds=(pending.scheduled_at or now) - pending.received_at,
            first_token_seconds=(first_token_at - pending.received_at) if first_token_at and token_ids else 0.0,
            total_seconds=now - pending.received_at,
        )

    def _stats(self, request_id: str) -> ServerStats:
        with self.lock:
            running = sum(p.running for p in self.requests.values())
            waiting = len(self.requests) - running
        counters = self.counters
        seconds, passes = sum(counters.batch_seconds), sum(counters.passes)
        step = seconds / passes if passes else 0.0
        rss = 0
        try:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
        return ServerStats(
            request_id=request_id, requests_waiting=waiting, requests_running=running,
            requests_received=counters.received, requests_finished=counters.finished,
            requests_failed=counters.failed, requests_rejected_overloaded=counters.overloaded,
            steps=counters.forward_passes, tokens_generated=counters.tokens, kv_blocks_total=0, kv_blocks_free=0,
            executor_pid=os.getpid(), executor_restarts=0, executor_rss_bytes=rss, executor_device_memory_allocated=0,
            mean_step_seconds=step, mean_compute_seconds=step, mean_step_gap_seconds=0.0,
        )

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="transformers + PEFT baseline server (Inlaid's protocol)")
    parser.add_argument("--config", required=True, help="the server TOML file (same format as `inlaid serve`)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"hf_peft_server: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    import torch

    torch.set_num_threads(config.engine.threads or len(os.sched_getaffinity(0)))
    torch.set_num_interop_threads(1)
    try:
        server = BaselineServer(config)
    except (ConfigError, OSError, ValueError) as error:  # OSError: no tokenizer / config in the model dir
        print(f"hf_peft_server: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, server.request_shutdown)
    signal.signal(signal.SIGINT, server.request_shutdown)
    code = server.run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: it would terminate the ZeroMQ context, which waits for the
    # worker's socket if the worker is still inside a forward pass.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
