"""The baseline server's worker thread (hf_peft_server.py), with the requests and counters it shares."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import zmq

from hf_peft_batch import BatchRow, BatchTiming, HfPeftModel, PromptEncoder, sampling_key  # beside this file
from inlaid.protocol import ErrorCode, Generate, TextChunk
from inlaid.serve.config import ServerConfig

log = logging.getLogger("inlaid.baseline")
_RESULTS_ADDRESS = "inproc://baseline-results"


@dataclass
class Pending:
    identity: bytes
    message: Generate
    prompt_ids: list[int]
    received_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    running: bool = False
    answered: bool = False  # its one final reply is sent (or owed by the front thread): drop any later result

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.identity, self.message.request_id)


@dataclass
class Counters:
    received: int = 0
    finished: int = 0
    failed: int = 0
    overloaded: int = 0
    batches: int = 0
    forward_passes: int = 0
    tokens: int = 0
    batch_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    passes: deque[int] = field(default_factory=lambda: deque(maxlen=256))


class BatchWorker:
    """The worker thread of `BaselineServer`, which sets the attributes below and supplies
    `_failure` and `_done` (the replies it builds under the lock)."""

    config: ServerConfig
    encoder: PromptEncoder
    lock: threading.Condition
    waiting: deque[Pending]
    requests: dict[tuple[bytes, str], Pending]
    counters: Counters
    model: HfPeftModel | None
    load_error: str | None
    stopping: bool
    context: zmq.Context
    _encoder: msgspec.msgpack.Encoder

    def _worker(self) -> None:
        import torch

        from inlaid.engine.runner import resolve_dtype

        engine = self.config.engine
        try:
            model = HfPeftModel(engine.model_dir, self.config.tasks, engine.device,
                                resolve_dtype(engine.dtype, torch.device(engine.device)), self.encoder)
        except Exception as error:  # a bad model or adapter directory: the front thread exits with 1
            self.load_error = f"{type(error).__name__}: {error}"
            return
        self.model = model
        log.info("baseline model ready", extra={"device": engine.device, "threads": torch.get_num_threads(),
                                                "batch_cap": engine.max_num_seqs})
        out = self.context.socket(zmq.PUSH)
        out.connect(_RESULTS_ADDRESS)
        while True:
            batch = self._next_batch()
            if batch is None:
                out.close()
                return
            rows = [BatchRow(prompt_ids=p.prompt_ids, task=p.message.task, sampling=p.message.sampling,
                             is_abandoned=lambda p=p: p.answered or self.stopping) for p in batch]
            try:
                timing = model.run(rows)
            except Exception as error:  # reported to the batch's requests; the server keeps serving
                log.exception("batch failed", extra={"size": len(batch)})
                reason = f"{type(error).__name__}: {error}"
                self._settle(batch, out, lambda _, p: self._failure(p, ErrorCode.INTERNAL, reason))
                continue
            with self.lock:
                self.counters.batches += 1
                self.counters.forward_passes += timing.forward_passes
                self.counters.batch_seconds.append(time.monotonic() - timing.started)
                self.counters.passes.append(timing.forward_passes)
            self._settle(batch, out, lambda index, p: self._answers(p, rows[index], timing))

    def _next_batch(self) -> list[Pending] | None:
        """The requests waiting now that share the first one's way of sampling, up to the cap."""
        with self.lock:
            while not self.waiting and not self.stopping:
                self.lock.wait()
            if self.stopping:
                return None
            key = sampling_key(self.waiting[0].message.sampling)
            batch = [p for p in self.waiting if sampling_key(p.message.sampling) == key][: self.config.engine.max_num_seqs]
            now = time.monotonic()
            for pending in batch:
                self.waiting.remove(pending)
                pending.running, pending.scheduled_at = True, now
            return batch

    def _answers(self, pending: Pending, row: BatchRow, timing: BatchTiming) -> list[msgspec.Struct]:
        """A finished row's replies: the whole text as one chunk when streamed, then the result."""
        self.counters.tokens += len(row.token_ids)
        messages: list[msgspec.Struct] = []
        if pending.message.stream and (row.text or row.token_ids):
            messages.append(TextChunk(request_id=pending.message.request_id, text=row.text, token_ids=list(row.token_ids)))
        messages.append(self._done(pending, row.token_ids, row.text, row.finish_reason, timing.first_token_at))
        return messages

    def _settle(self, batch: list[Pending], out: zmq.Socket,
                replies_of: Callable[[int, Pending], list[msgspec.Struct]]) -> None:
        """Send every request of a finished batch its replies, unless it was answered while it
        ran (cancelled, past its deadline, shut down)."""
        frames = []
        with self.lock:
            for index, pending in enumerate(batch):
                if pending.answered:
                    continue
                pending.answered = True
                self.requests.pop(pending.key, None)
                frames += [[pending.identity, self._encoder.encode(m)] for m in replies_of(index, pending)]
        for frame in frames:
            out.send_multipart(frame)
