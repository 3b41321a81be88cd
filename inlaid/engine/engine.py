"""The request-level engine: requests in, streamed text out. Torch-free.

`Engine` turns prompts into sequences, asks the scheduler for a plan each step, hands the
plan to an executor and turns the executor's sampled tokens back into text. In-process,
the executor is a `ModelRunner` (`Engine.local`); in the server, the coordinator uses
`begin_step`/`finish_step` and ships the plan to an executor process in between.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence as SequenceType

import msgspec

from inlaid.engine.adapter_config import AdapterError, adapter_signature, read_adapter_spec
from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.adapter_weights import check_adapter_files, check_adapter_weights, check_rank, max_weights_bytes
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.config import EngineConfig, ModelConfig, ModelLoadError
from inlaid.engine.prompts import InvalidRequestError, literal_mode_problem, prompt_token_ids
from inlaid.engine.scheduler import Scheduler, SchedulerLimits, SchedulingPolicy
from inlaid.engine.sequence import FinishReason, Sequence, SequenceStatus
from inlaid.engine.tokenizer import StreamingDetokenizer, Tokenizer
from inlaid.protocol import (BatchPlan, ChatMessage, SamplingError, SamplingParams, SequenceFailure, StepResult,
                             excerpt, shown_names)

if TYPE_CHECKING:
    from inlaid.engine.runner import ModelRunner


class Executor(Protocol):
    def execute(self, plan: BatchPlan) -> StepResult: ...


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    error: SequenceFailure | None = None  # set when finish_reason is "error": why the executor failed it


@dataclass
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None  # finish_reason "error": why the executor failed it (an adapter that did not load, ...)


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    detokenizer: StreamingDetokenizer
    text: list[str] = field(default_factory=list)


class Engine:
    def __init__(self, config: EngineConfig, runner: Executor | None = None, policy: SchedulingPolicy | None = None,
                 seq_ids: Iterator[int] | None = None) -> None:
        """seq_ids: shared by engines whose sequences must have distinct ids (one coordinator,
        several executors)."""
        config.validate()
        self.config = config
        self.runner = runner
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer(config.model_dir)
        if config.special_tokens_in_text == "text" and (problem := literal_mode_problem(self.tokenizer)):
            raise ModelLoadError(f"special_tokens_in_text = \"text\": {problem}")
        self.max_model_len = config.context_length(self.model_config)
        self.scheduler = Scheduler(
            SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.prefill_tokens_beside_decodes()),
            BlockManager(config.num_kv_blocks, config.block_size),
            AdapterSlots(config.max_lora_slots),
            eos_token_ids=self.model_config.eos_token_ids,
            policy=policy,
        )
        self._requests: dict[str, _Request] = {}
        self._by_seq_id: dict[int, Sequence] = {}
        self._seq_ids = seq_ids if seq_ids is not None else itertools.count()

    @classmethod
    def local(cls, config: EngineConfig, policy: SchedulingPolicy | None = None) -> "Engine":
        """An engine with its executor in this process."""
        from inlaid.engine.runner import ModelRunner

        return cls(config, ModelRunner(config), policy)

    # ------------------------------------------------------------------ adapters
    def register_adapter(self, name: str, path: str, *, check_weights: bool = True,
                         signature: str | None = None) -> None:
        """Serve the adapter at `path` as `name`, once its config and every weight passed the
        server's own checks (AdapterError naming the first problem). `check_weights=False`: the
        caller checked it (the server, off its event loop) and passes the `adapter_signature`
        it checked. A path registered again after its files changed serves the new files."""
        if not isinstance(name, str) or not name:  # None is the base model: an adapter under it was unreachable
            raise InvalidRequestError(f"an adapter's name must be a non-empty string, got {name!r}", "task")
        bound = max_weights_bytes(self.model_config, self.config.max_lora_rank)
        if signature is None:  # the files before they are hashed (a FIFO, a device, a huge file)
            check_adapter_files(name, path, self.model_config, self.config.max_lora_rank)
        checked, signature = signature is None, adapter_signature(path, bound) if signature is None else signature
        spec = read_adapter_spec(name, path)
        if check_weights:
            check_adapter_weights(spec, self.model_config, self.config.max_lora_rank)
        else:  # (the caller checked the weights, against another engine's bound perhaps)
            check_rank(spec, self.model_config, self.config.max_lora_rank)
        if checked and adapter_signature(path, bound) != signature:
            raise AdapterError(f"adapter {name!r}: its files in {path} changed while they were being checked; "
                               "register it again")
        slots = self.scheduler.adapters  # another adapter under a name in use: its slot would change under their KV
        if (slots.paths.get(name, str(path)), slots.signatures.get(name, signature)) != (str(path), signature) and (
                using := self.scheduler.sequences_using(name)):
            raise InvalidRequestError(f"adapter {name!r} has {using} request(s) running or queued; replace it once "
                                      "they have finished")
        slots.register(name, str(path), signature)

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.scheduler.adapters.paths)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        sampling: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> str:
        sampling = sampling or SamplingParams()
        try:
            sampling.validate()
        except SamplingError as error:
            raise InvalidRequestError(str(error), error.field) from error
        vocab = self.model_config.vocab_size
        # A stop id outside the vocabulary can never be sampled: refused as prompt ids are,
        # not accepted as a stop rule that silently never fires.
        bad = next((i for i, t in enumerate(sampling.stop_token_ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"stop_token_ids must be integers in [0, {vocab}), got "
                                      f"{sampling.stop_token_ids[bad]} at index {bad}", "stop_token_ids")
        token_ids = self.prompt_tokens(prompt, messages)
        if sampling.max_tokens is None:  # until the context is full (a too-long prompt is refused below)
            # one past the room the prompt leaves: the context, not this count, ends it ("context"; at
            # the room itself the count ended it first and said "length", as if a limit were asked)
            sampling = msgspec.structs.replace(sampling, max_tokens=max(1, self.max_model_len - len(token_ids) + 1))
        if adapter is not None and adapter not in self.scheduler.adapters.paths:
            raise InvalidRequestError(f"unknown adapter/task {excerpt(adapter)}; known: "
                                      f"{shown_names(self.adapter_names)}", "task")
        seq_id = next(self._seq_ids)
        request_id = request_id if request_id is not None else f"req-{seq_id}"
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {excerpt(request_id)} is already in use", "request_id")
        seq = Sequence(seq_id=seq_id, prompt_token_ids=token_ids, sampling=sampling, adapter=adapter)
        try:
            self.scheduler.add(seq)
        except ValueError as error:  # more KV blocks than the cache has: the prompt's length
            raise InvalidRequestError(str(error), "prompt") from error
        self._requests[request_id] = _Request(request_id, seq, StreamingDetokenizer(self.tokenizer, sampling.stop))
        self._by_seq_id[seq_id] = seq
        return request_id

    def prompt_tokens(self, prompt: str | list[int] | None,
                      messages: list[ChatMessage] | list[dict[str, str]] | None) -> list[int]:
        """The token ids of a prompt or of chat messages (`prompts.prompt_token_ids`)."""
        return prompt_token_ids(self.tokenizer, self.max_model_len, self.model_config.vocab_size, prompt, messages,
                                literal_special_tokens=self.config.special_tokens_in_text == "text")

    def abort(self, request_id: str) -> bool:
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.abort(request.seq)
        del self._by_seq_id[request.seq.seq_id]
        return True

    def take_waiting(self, request_id: str) -> "_Request | None":
        """Hand over a request that holds no KV blocks (waiting, never run or preempted) to
        another engine's `put`; None when it runs (or is unknown) and must stay."""
        request = self._requests.get(request_id)
        if request is None or request.seq.status is not SequenceStatus.WAITING or request.seq.block_table:
            return None
        self.scheduler.waiting.remove(request.seq)
        # Its policy forgets it as it forgets a finished one (it learns nothing: the sequence
        # has no finish reason); the receiving engine's policy sees it arrive.
        self.scheduler.policy.on_finish(request.seq, self.scheduler.clock())
        del self._requests[request_id]
        del self._by_seq_id[request.seq.seq_id]
        return request

    def put(self, request: "_Request") -> None:
        """Take over a request another engine's `take_waiting` gave up (its adapter must be
        registered here too)."""
        try:
            self.scheduler.add(request.seq)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        self._requests[request.request_id] = request
        self._by_seq_id[request.seq.seq_id] = request.seq

    def restart_unstarted(self, request_id: str) -> bool:
        """A running request that has generated nothing yet goes back to the queue, to be
        computed from its prompt again (its KV was on an executor that is gone); False, and
        nothing changes, for any other."""
        request = self._requests.get(request_id)
        if request is None or request.seq.status is not SequenceStatus.RUNNING or request.seq.num_generated:
            return False
        self.scheduler.restart(request.seq)
        return True

    def abort_all(self, reason: FinishReason = FinishReason.ERROR) -> list[str]:
        """Finish every request (the executor died); returns their ids."""
        ids = list(self._requests)
        for request in self._requests.values():
            self.scheduler.abort(request.seq, reason)
        self._requests.clear()
        self._by_seq_id.clear()
        return ids

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def sequence(self, request_id: str) -> Sequence:
        return self._requests[request_id].seq

    # ------------------------------------------------------------------ steps
    def begin_step(self) -> BatchPlan | None:
        return self.scheduler.schedule()

    def finish_step(self, result: StepResult) -> list[RequestOutput]:
        for name in result.failed_adapters:
            self.scheduler.adapters.evict(name)
        outputs: dict[int, RequestOutput] = {}
        request_of = {r.seq.seq_id: r for r in self._requests.values()}
        for failure in result.failed:  # the executor could not compute these: they end here, alone
            request = request_of.get(failure.seq_id)
            if request is None or request.seq.is_finished:
                continue  # cancelled while the step ran
            self.scheduler.abort(request.seq, FinishReason.ERROR)
            outputs[failure.seq_id] = RequestOutput(request_id=request.request_id, new_token_ids=[], text_delta="",
                                                    finished=True, finish_reason=FinishReason.ERROR.value, error=failure)
            del self._requests[request.request_id]
            del self._by_seq_id[failure.seq_id]
        update = self.scheduler.process_result(result, self._by_seq_id)
        for seq, token_id in update.new_tokens:
            request = request_of[seq.seq_id]
            # A stop token's own text is not output (vLLM's rule): the EOS token's never is
            # (it is special), and one of `stop_token_ids` may be any token, a "," say.
            ends_on_stop_token = seq.finish_reason is FinishReason.STOP and token_id in seq.sampling.stop_token_ids
            delta = "" if ends_on_stop_token else request.detokenizer.add(token_id)
            if request.detokenizer.stopped and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            elif request.detokenizer.stopped and seq.finish_reason in (FinishReason.LENGTH, FinishReason.CONTEXT):
                # The token that completed a stop string was also the last one allowed: the
                # stop string ended the text, so "stop" (vLLM checks stop strings first too); a
                # client continuing on "length" would have gone past the stop it asked for.
                seq.finish_reason = FinishReason.STOP
            if seq.is_finished and not request.detokenizer.stopped:
                delta += request.detokenizer.finish()
            request.text.append(delta)
            outputs[seq.seq_id] = RequestOutput(
                request_id=request.request_id,
                new_token_ids=[token_id],
                text_delta=delta,
                finished=seq.is_finished,
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            )
            if seq.is_finished:
                del self._requests[request.request_id]
                del self._by_seq_id[seq.seq_id]
        return list(outputs.values())

    def step(self) -> list[RequestOutput]:
        if self.runner is None:
            raise RuntimeError("this engine has no local executor; use begin_step/finish_step")
        plan = self.begin_step()
        if plan is None:
            return []
        try:
            result = self.runner.execute(plan)
        except BaseException:
            self.undo_step(plan)
            raise
        return self.finish_step(result)

    def undo_step(self, plan: BatchPlan) -> None:
        """A step whose execution raised (Ctrl-C or out of memory mid-forward): its sequences go
        back to the queue with no KV (their cache may be half written; computed again from
        their tokens when next planned, as after a preemption), and the adapters it was loading
        are loaded again at their next use; the policy hears that the step never ran. Left as
        planned, they stayed running with nothing to compute, holding their blocks:
        `has_unfinished()` stayed true and a step loop spun."""
        for load in plan.adapter_loads:
            self.scheduler.adapters.evict(load.name)
        undone = [self._by_seq_id[chunk.seq_id] for chunk in plan.chunks if chunk.seq_id in self._by_seq_id]
        # Each goes to the head of the queue: the latest admitted first, so the earliest leads.
        for seq in sorted(undone, key=lambda seq: seq.seq_id, reverse=True):
            if seq.status is SequenceStatus.RUNNING:
                self.scheduler.restart(seq)
        self.scheduler.policy.on_undone(plan.step_id, self.scheduler.clock())

    # ------------------------------------------------------------------ batch convenience
    def generate(
        self,
        prompts: SequenceType[str | list[int]] | None = None,
        sampling: SamplingParams | SequenceType[SamplingParams] | None = None,
        adapters: SequenceType[str | None] | None = None,
        *,
        messages: SequenceType[list[dict[str, str]]] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationOutput]:
        """Run a batch to completion (continuous batching inside); outputs in input order."""
        if prompts is not None and messages is not None:  # messages were ignored
            raise InvalidRequestError("give prompts or messages, not both")
        inputs: list = list(prompts) if prompts is not None else list(messages or [])
        count = len(inputs)
        sampling_list = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * count
        adapter_list = list(adapters) if adapters is not None else [None] * count
        if len(sampling_list) != count or len(adapter_list) != count:
            raise InvalidRequestError("prompts, sampling and adapters must have the same length")
        ids: list[str] = []
        try:
            for item, params, adapter in zip(inputs, sampling_list, adapter_list):
                if prompts is not None:
                    ids.append(self.add_request(item, sampling=params, adapter=adapter))
                else:
                    ids.append(self.add_request(messages=item, sampling=params, adapter=adapter))
        except BaseException:  # none of the batch runs: the ones added ran in the next call, unasked
            for request_id in ids:
                self.abort(request_id)
            raise
        sequences = {rid: self._requests[rid].seq for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=count, desc="generate", unit="req")
        pending = set(ids)
        errors: dict[str, str] = {}
        try:
            while pending:
                for output in self.step():
                    if output.request_id in texts:
                        texts[output.request_id].append(output.text_delta)
                        if output.error is not None:
                            errors[output.request_id] = f"[{output.error.code}] {output.error.message}"
                        if output.finished:
                            pending.discard(output.request_id)
                            if progress:
                                progress.update(1)
        except BaseException:  # Ctrl-C or a failed step: the batch's unfinished requests end with the call
            for request_id in pending:
                self.abort(request_id)
            raise
        finally:
            if progress:
                progress.close()
        return [
            GenerationOutput(
                request_id=rid,
                prompt_token_ids=list(sequences[rid].prompt_token_ids),
                token_ids=list(sequences[rid].output_token_ids),
                text="".join(texts[rid]),
                finish_reason=sequences[rid].finish_reason.value,  # type: ignore[union-attr]
                error=errors.get(rid),
            )
            for rid in ids
        ]

