"""The coordinator's requests in flight: a Generate checked and placed on an executor's
engine, its tokens streamed back as steps finish, and its end (finished, cancelled, failed,
abandoned by its client, past its deadline) answered once and forgotten everywhere
(engine, indexes, metrics, task registry). Torch-free; runs on the coordinator's loop.

Every bad Generate gets a typed ErrorReply naming what is wrong, to its sender only: in
words for people, and as facts for programs (the field at fault, the admission counts of an
overload, what did not fit the context), which the HTTP front answers from, so that
rewording a message never changes its HTTP answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

import msgspec

from inlaid.engine.engine import Engine, RequestOutput
from inlaid.engine.prompts import InvalidRequestError, PromptTooLongError
from inlaid.engine.sequence import SequenceStatus
from inlaid.protocol import (
    MAX_REQUEST_ID_CHARS, SHOWN_NAMES, BatchPlan, Cancel, ContextOverflow, ErrorCode, ErrorReply, Generate,
    InFlightCounts, SamplingError, TextChunk, excerpt, reply_id,
)
from inlaid.serve.config_sections import ServerLimits
from inlaid.serve.executor_pool import ExecutorPool, ExecutorShard
from inlaid.serve.metrics import BASE_TASK_LABEL, ServerMetrics
from inlaid.serve.requests import ActiveRequest, RequestKey
from inlaid.serve.task_registry import TaskError, TaskRegistry

log = logging.getLogger("inlaid.coordinator")


class InFlight:
    def __init__(self, limits: ServerLimits, pool: ExecutorPool, registry: TaskRegistry,
                 send: Callable[[bytes, msgspec.Struct], None], accepting: Callable[[], bool],
                 counters: dict[str, int]) -> None:
        """send(client identity, message): a reply to one client. accepting(): False once
        the server shuts down. counters: the coordinator's (received, finished, ...)."""
        self.limits = limits
        self.pool = pool
        self.engine = pool.shards[0].engine  # tokenizer and limits: the same in every engine
        self.registry = registry
        self._send = send
        self._accepting = accepting
        self.counters = counters
        self.metrics: ServerMetrics | None = None  # set by the coordinator (it reads by_engine_id)
        self.requests: dict[RequestKey, ActiveRequest] = {}
        self.by_engine_id: dict[str, ActiveRequest] = {}
        self.by_seq_id: dict[int, ActiveRequest] = {}
        self.per_client: Counter[bytes] = Counter()  # requests in flight by connection
        self._next_engine_id = 0

    def __len__(self) -> int:
        return len(self.requests)

    def running(self, identity: bytes, request_id: str | None) -> bool:
        """Whether a request of this connection is in flight under `request_id`."""
        return (identity, request_id) in self.requests

    def refuse_reused_id(self, identity: bytes, request_id: str, kind: str) -> str:
        """A message under the id of a request in flight: refused, and not under that id. The
        request running under it gets its own one end (done or error); a second terminal
        message would end it twice for its client (a refused frame, a shutdown's refusal or
        an info call's answer under the id once did)."""
        return self.error(identity, "", ErrorCode.INVALID_REQUEST,
                          f"request id {excerpt(request_id)} is already in flight on this connection; this "
                          f"{kind} was refused and the one in flight goes on", field="request_id")

    def error(self, identity: bytes, request_id: str, code: str, message: str, *, field: str | None = None,
              in_flight: InFlightCounts | None = None, context_overflow: ContextOverflow | None = None,
              known_tasks: list[str] | None = None) -> str:
        # known_tasks: the first SHOWN_NAMES and the count go out (1,000 names were 10 KB a refusal)
        shown = known_tasks[:SHOWN_NAMES] if known_tasks is not None else None
        self._send(identity, ErrorReply(request_id=request_id, code=code, message=message, field=field,
                                        in_flight=in_flight, context_overflow=context_overflow, known_tasks=shown,
                                        known_tasks_total=len(known_tasks) if known_tasks is not None else None))
        return code

    # ------------------------------------------------------------------ admission
    def generate(self, identity: bytes, message: Generate, received_at: float | None = None) -> None:
        """received_at: when it arrived (time.monotonic), for one a starting server held: its
        deadline and its latency figures count from then, not from its admission."""
        assert self.metrics is not None
        rejection = self._admit(identity, message, received_at)
        if rejection is None:
            self.metrics.on_admitted(self.requests[(identity, message.request_id)])
        else:
            if rejection != ErrorCode.OVERLOADED:  # counted apart, in _admit
                self.counters["rejected"] += 1
            self.metrics.on_rejected(message.task, rejection)

    def refuse_unadmitted(self, identity: bytes, message: Generate, code: str, text: str) -> None:
        """A generate refused without going through admission (one a starting server held):
        counted as admission counts its refusals."""
        assert self.metrics is not None
        self.counters["received"] += 1
        self.counters["overloaded" if code == ErrorCode.OVERLOADED else "rejected"] += 1
        self.metrics.on_rejected(message.task, code)
        self.error(identity, reply_id(message.request_id), code, text)

    def internal_error(self, identity: bytes, message: Generate) -> None:
        """Handling `message` raised (a bug, logged by the caller): answer it once, count it
        failed, and leave nothing of it behind (an engine sequence nobody would read)."""
        request = self.requests.get((identity, message.request_id))
        if request is not None:
            self.fail(request, ErrorCode.INTERNAL, "internal server error")
            return
        self.error(identity, reply_id(message.request_id), ErrorCode.INTERNAL, "internal server error")
        self.counters["failed"] += 1
        assert self.metrics is not None
        self.metrics.on_rejected(message.task, ErrorCode.INTERNAL)

    def _admit(self, identity: bytes, message: Generate, received_at: float | None = None) -> str | None:
        """Start the request, or answer it with an error; returns that error's code."""
        request_id = message.request_id
        key = (identity, request_id)
        self.counters["received"] += 1
        if not request_id:  # its replies could not be told from those to unreadable frames
            return self.error(identity, request_id, ErrorCode.INVALID_REQUEST, "request_id must not be empty",
                              field="request_id")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            # Answered as a frame too broken to name its request (request_id ""): the id is
            # not echoed, and no request of this client can be told by a cut of it.
            return self.error(identity, "", ErrorCode.INVALID_REQUEST,
                              f"request_id {excerpt(request_id)} is too long: at most {MAX_REQUEST_ID_CHARS} "
                              "characters", field="request_id")
        if key in self.requests:  # (before the shutdown's refusal: that one was sent under the id)
            return self.refuse_reused_id(identity, request_id, "Generate")
        if not self._accepting():
            return self.error(identity, request_id, ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        # The checks that cost nothing come before the overload refusal: a mistyped task name
        # or a bad value is a 404/400 under load too, not a 429 that the official clients
        # retry twice and then report as a rate limit (an outside probe). The prompt's
        # (tokenizing it) comes after: an overloaded server does no work for a refused request.
        try:
            self.registry.check_accepting(message.task)
        except TaskError as error:
            known = sorted(self.registry.tasks) if error.code == ErrorCode.UNKNOWN_TASK else None
            return self.error(identity, request_id, error.code, error.message, field="task", known_tasks=known)
        if message.deadline_s is not None and not (message.deadline_s > 0 and math.isfinite(message.deadline_s)):
            return self.error(identity, request_id, ErrorCode.INVALID_REQUEST,
                              f"deadline_s must be a positive number of seconds, got {message.deadline_s!r}",
                              field="deadline_s")
        try:
            message.sampling.validate()
        except SamplingError as error:
            return self.error(identity, request_id, ErrorCode.INVALID_REQUEST, str(error), field=error.field)
        if (counts := self._overloaded(identity)) is not None:
            self.counters["overloaded"] += 1
            return self.error(identity, request_id, ErrorCode.OVERLOADED, _overload_message(counts), in_flight=counts)
        context_length = self.engine.max_model_len
        try:
            token_ids = self._prompt_tokens(message)
        except PromptTooLongError as error:
            return self.error(identity, request_id, ErrorCode.CONTEXT_LENGTH, str(error), field=_prompt_field(message),
                              context_overflow=ContextOverflow(context_length=context_length,
                                                               prompt_tokens=error.at_least_tokens))
        except (ValueError, InvalidRequestError) as error:
            return self.error(identity, request_id, ErrorCode.INVALID_REQUEST, str(error), field=_prompt_field(message))
        if len(token_ids) >= context_length:
            return self.error(identity, request_id, ErrorCode.CONTEXT_LENGTH,
                              f"the prompt has {len(token_ids)} tokens; the context length is "
                              f"{context_length} and at least one new token must fit", field=_prompt_field(message),
                              context_overflow=ContextOverflow(context_length=context_length,
                                                               prompt_tokens=len(token_ids)))
        room = context_length - len(token_ids)
        if (max_tokens := message.sampling.max_tokens) is not None and max_tokens > room:
            # OpenAI's and vLLM's rule: a completion the context cannot hold is refused, not cut
            # short with "length" after holding a seat until the context is full.
            return self.error(identity, request_id, ErrorCode.CONTEXT_LENGTH,
                              f"the context length is {context_length} tokens, but {len(token_ids) + max_tokens}"
                              f" were requested ({len(token_ids)} in the prompt, max_tokens {max_tokens}): lower "
                              f"max_tokens to at most {room}, or give none (null) to generate until the context is full",
                              field="max_tokens", context_overflow=ContextOverflow(
                                  context_length=context_length, prompt_tokens=len(token_ids), max_tokens=max_tokens))
        engine_id = f"r{self._next_engine_id}"
        self._next_engine_id += 1
        shard = self.pool.choose(message.task, len(token_ids), self.by_engine_id)
        try:
            shard.engine.add_request(token_ids, sampling=message.sampling, adapter=message.task, request_id=engine_id)
        except ValueError as error:  # InvalidRequestError included
            # The engine's field, with its "prompt" said as the field this request gave it in.
            field = getattr(error, "field", None)
            field = _prompt_field(message) if field == "prompt" else field
            return self.error(identity, request_id, ErrorCode.INVALID_REQUEST, str(error), field=field)
        request = ActiveRequest(key=key, engine_id=engine_id, seq_id=shard.engine.sequence(engine_id).seq_id,
                                task=message.task, stream=message.stream, num_prompt_tokens=len(token_ids),
                                executor=shard.index)
        if received_at is not None:
            request.received_at = received_at
        self.requests[key] = request
        self.per_client[identity] += 1
        self.by_engine_id[engine_id] = request
        self.by_seq_id[request.seq_id] = request
        self.registry.request_started(message.task)
        if message.deadline_s is not None:
            left = message.deadline_s - (time.monotonic() - request.received_at)
            request.deadline = asyncio.get_running_loop().call_later(max(0.0, left), self._on_deadline, key)
        shard.wake()
        return None

    def _overloaded(self, identity: bytes) -> InFlightCounts | None:
        """The counts that keep a request of connection `identity` out now, or None. The last
        tenth of max_pending_requests is kept from a connection holding its share of them
        (the limit over the connections in flight, a newcomer counted): a lone client can
        fill nine tenths, and one flooding cannot turn everyone else away (an outside probe:
        400 requests from one client, then one from another, refused as overloaded)."""
        limit, in_flight = self.limits.max_pending_requests, len(self.requests)
        if in_flight < limit - max(1, limit // 10):
            return None
        held = self.per_client[identity]
        share = limit / (len(self.per_client) + (0 if held else 1) + 1)
        if in_flight < limit and held < share:
            return None
        return InFlightCounts(requests=in_flight, this_connection=held, limit=limit)

    def _prompt_tokens(self, message: Generate) -> list[int]:
        """ValueError (InvalidRequestError) when the prompt cannot be served; every such
        refusal is about the prompt field the request gave (`_prompt_field`)."""
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(message, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages or prompt_token_ids (got "
                             f"{' and '.join(given) or 'none of them'})")
        if message.messages is not None:  # counted before any is copied: 40k of them cost 15 ms
            return self.engine.prompt_tokens(None, message.messages)
        return self.engine.prompt_tokens(message.prompt if message.prompt is not None else message.prompt_token_ids, None)

    # ------------------------------------------------------------------ steps
    def on_plan(self, plan: BatchPlan) -> None:
        now = time.monotonic()
        for chunk in plan.chunks:
            request = self.by_seq_id.get(chunk.seq_id)
            if request is not None and request.scheduled_at is None:
                request.scheduled_at = now

    def deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            request = self.by_engine_id.get(output.request_id)
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
                self.fail(request, output.error.code, output.error.message)
            elif output.finished:
                # Counted before the answer goes: a scrape right after a reply missed it (4 of 20).
                self.counters["finished"] += 1
                self._forget(request, output.finish_reason or "stop")
                self._send(request.identity, request.done_message(output.finish_reason or "stop"))
                log.debug("request finished", extra={"request_id": request.request_id, "task": request.task,
                                                     "tokens": len(request.token_ids),
                                                     "seconds": round(now - request.received_at, 4)})

    # ------------------------------------------------------------------ ends
    def cancel(self, identity: bytes, message: Cancel) -> None:
        request = self.requests.get((identity, message.request_id))
        if request is None:
            return  # finished already, or never existed: cancelling is idempotent
        self._engine_of(request).abort(request.engine_id)
        self.counters["finished"] += 1
        self._forget(request, "cancelled")  # counted before the answer goes, as a finished one
        self._send(identity, request.done_message("cancelled"))

    def client_gone(self, identity: bytes) -> None:
        """The client's connection closed: nobody can read its answers; stop computing them."""
        gone = [request for request in self.requests.values() if request.identity == identity]
        for request in gone:
            self._engine_of(request).abort(request.engine_id)
            self.counters["abandoned"] += 1
            self._forget(request, "abandoned")
        if gone:
            log.info("client disconnected; its requests are cancelled",
                     extra={"client": identity.hex(), "requests": [r.request_id for r in gone]})

    def fail_running(self, shard: ExecutorShard, message: str, code: str = ErrorCode.EXECUTOR_FAILED,
                     restart_unstarted: bool = False) -> None:
        """Fail every request whose KV state lived on this executor; waiting ones stay queued.
        With `restart_unstarted` (the executor was lost), a request that has not produced a
        token yet is queued again instead, once: its client has seen nothing, and running it
        again gives the same answer. Only once, because a request that itself kills
        executors must not take down every executor that runs it."""
        # Latest admitted first: each restarted one goes to the head of the queue, so they
        # end up there in their admission order.
        for request in reversed(self._on_executor(shard)):
            # None: the engine no longer knows it, so it can never finish: failed as running
            if self._status(shard, request) not in (SequenceStatus.RUNNING, None):
                continue
            if (restart_unstarted and not request.restarted and not request.token_ids
                    and shard.engine.restart_unstarted(request.engine_id)):
                request.restarted = True
                log.info("request queued again: its executor was lost before its first token",
                         extra={"request_id": request.request_id})
                continue
            self.fail(request, code, message)

    def fail_waiting(self, shard: ExecutorShard, message: str, code: str = ErrorCode.INTERNAL) -> None:
        """Fail every request queued on this executor's engine (not yet running)."""
        for request in self._on_executor(shard):
            if self._status(shard, request) is SequenceStatus.WAITING:
                self.fail(request, code, message)

    def _on_executor(self, shard: ExecutorShard) -> list[ActiveRequest]:
        return [r for r in self.requests.values() if r.executor == shard.index]

    @staticmethod
    def _status(shard: ExecutorShard, request: ActiveRequest) -> SequenceStatus | None:
        """The request's sequence status in the executor's engine; None when it knows it no more."""
        try:
            return shard.engine.sequence(request.engine_id).status
        except KeyError:
            return None

    def fail_all(self, code: str, message: str) -> None:
        for request in list(self.requests.values()):
            self.fail(request, code, message)

    def _on_deadline(self, key: RequestKey) -> None:
        request = self.requests.get(key)
        if request is not None:
            request.deadline = None
            self.fail(request, ErrorCode.DEADLINE_EXCEEDED,
                      f"the deadline passed after {len(request.token_ids)} generated tokens")

    def fail(self, request: ActiveRequest, code: str, message: str) -> None:
        self._engine_of(request).abort(request.engine_id)  # frees its KV blocks; a no-op when already gone
        self.counters["failed"] += 1
        self._forget(request, code)  # counted before the answer goes, as a finished one
        self.error(request.identity, request.request_id, code, message)
        # an adapter that cannot be loaded fails all of its task's requests: the operator's to mend
        if code == ErrorCode.ADAPTER_FAILED and request.task is not None:  # placement avoids it there a while
            self.pool.shards[request.executor].adapter_failed(request.task)
        (log.warning if code == ErrorCode.ADAPTER_FAILED else log.info)(
            "request failed", extra={"request_id": request.request_id, "task": request.task, "code": code,
                                     "reason": message})

    def _engine_of(self, request: ActiveRequest) -> Engine:
        return self.pool.shards[request.executor].engine

    def _forget(self, request: ActiveRequest, outcome: str) -> None:
        assert self.metrics is not None
        self.metrics.on_finished(request, outcome)
        self.pool.shards[request.executor].tasks_served[request.task or BASE_TASK_LABEL] += 1
        if request.deadline is not None:
            request.deadline.cancel()
        if self.requests.pop(request.key, None) is not None:
            self.per_client[request.identity] -= 1
            if not self.per_client[request.identity]:
                del self.per_client[request.identity]
        self.by_engine_id.pop(request.engine_id, None)
        self.by_seq_id.pop(request.seq_id, None)
        self.registry.request_ended(request.task)


def _overload_message(counts: InFlightCounts) -> str:
    # The limit is named by its key: a client running its own server may raise it.
    if counts.requests >= counts.limit:
        return f"{counts.requests} requests in flight (the limit, server.max_pending_requests); retry later"
    return (f"{counts.requests} requests in flight, {counts.this_connection} of them this connection's; the last "
            f"tenth of the {counts.limit} (server.max_pending_requests) is kept for other clients; retry later")


def _prompt_field(message: Generate) -> str | None:
    """The prompt field `message` gave (None when it gave none or several: no one field is at fault)."""
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(message, name) is not None]
    return given[0] if len(given) == 1 else None

