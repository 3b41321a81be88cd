"""A discrete-event simulator that runs the REAL scheduler with a cost model as its executor.

The engine's `Scheduler`, `BlockManager` and `AdapterSlots` and the policy under test
plan every step exactly as in the server; only the executor is replaced: the step takes
`StepCostModel.step_seconds` of simulated time, and each sampled token is the trace's:
end-of-sequence once the request reaches its recorded output length. The scheduler never
sees the true lengths (only each request's budget), like the server. Requests arriving
during a step join at the next plan, as in the coordinator's loop.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import Scheduler, SchedulerLimits, SchedulingPolicy
from inlaid.engine.sequence import Sequence
from inlaid.protocol import BatchPlan, SampledToken, SamplingParams, StepResult
from inlaid.scheduling.cost_model import StepCostModel, StepFeatures
from inlaid.scheduling.metrics import RequestRecord, ServiceGapMeter, StepRecord
from inlaid.scheduling.traces import Trace, TraceRequest

_EOS = 0
_TOKEN = 1
# Steps in a row that compute nothing new (no token sampled, no prompt token past what its
# request had computed before: a preemption's recomputation is no progress): a livelock.
# Counted on tokens alone, a 10,000-token prompt at one prefill token a step tripped it.
_MAX_STEPS_WITHOUT_PROGRESS = 10_000


class SimulationStuckError(RuntimeError):
    """Work is left but the scheduler plans nothing and no request will arrive (a
    deadlock), or it plans steps that never produce a token (a livelock)."""


@dataclass
class EngineShape:
    """The limits of the simulated server (the `[executor]` settings that matter to planning)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_lora_slots: int = 8
    max_model_len: int = 8192
    max_prefill_tokens_beside_decodes: int | None = None  # EngineConfig.prefill_tokens_beside_decodes()

    @classmethod
    def of(cls, engine: Any) -> "EngineShape":
        """The limits of an `EngineConfig` (duck-typed: this module stays torch-free)."""
        return cls(max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
                   block_size=engine.block_size, num_kv_blocks=engine.num_kv_blocks,
                   max_lora_slots=engine.max_lora_slots, max_model_len=engine.max_model_len or cls.max_model_len,
                   max_prefill_tokens_beside_decodes=engine.prefill_tokens_beside_decodes())

    @property
    def context_length(self) -> int:
        """The longest sequence the server serves: `max_model_len` capped by the KV cache, as
        the engine caps it (`EngineConfig.context_length`): a longer one ends with finish
        reason "context" there instead of holding the queue."""
        return min(self.max_model_len, self.num_kv_blocks * self.block_size)


@dataclass
class SimulationResult:
    requests: list[RequestRecord]
    steps: list[StepRecord]
    max_distinct_adapters: int  # the largest number of adapters one step computed
    max_blocks_used: int
    service_gap: float  # VTC's fairness figure (ServiceGapMeter)

    @property
    def refused(self) -> list[RequestRecord]:
        """Requests the server would refuse (a prompt with no room in the context): failed
        records with the reason in `error`, counted by `summarize` as failed."""
        return [record for record in self.requests if record.error]


def generated_tokens(request: TraceRequest, shape: EngineShape) -> int:
    """How many tokens the request generates on this server: its recorded length, cut at the
    context length as the scheduler cuts it (finish reason "context"). ValueError for a
    prompt the server refuses (no new token fits)."""
    context = shape.context_length
    if request.prompt_tokens >= context:
        raise ValueError(context_refusal(request.prompt_tokens, context))
    return min(request.output_tokens, context - request.prompt_tokens)


def context_refusal(prompt_tokens: int, context: int) -> str:
    """The scheduler's words for a prompt with no room for a new token (`Scheduler.add`)."""
    return f"prompt has {prompt_tokens} tokens; the context length is {context} and at least one new token must fit"


def isolated_latency(request: TraceRequest, rank: int, cost: StepCostModel, shape: EngineShape) -> float:
    """The request alone on the server, adapter resident: chunked prefill, then decode steps
    up to the tokens it generates there (`generated_tokens`). In closed form: the model is
    linear in the features, so the steps cost their summed features plus one constant each
    (a loop over 1e9 decode steps took two minutes)."""
    prompt, block, chunk = request.prompt_tokens, shape.block_size, shape.max_num_batched_tokens
    decode_steps = generated_tokens(request, shape) - 1
    lora = request.task is not None
    # Prefill: `full` chunks of `chunk` tokens, then the rest; a chunk's attention is its
    # tokens x its context padded to a block, and a 1-token chunk counts as a decode row.
    full, rest = divmod(prompt, chunk)
    chunk_cells = chunk * block * _sum_ceil_div(full, chunk, 0, block)
    rest_cells = rest * block * -(-prompt // block) if rest else 0
    prefill_cells = (chunk_cells if chunk > 1 else 0) + (rest_cells if rest > 1 else 0)
    cells = (chunk_cells if chunk == 1 else 0) + (rest_cells if rest == 1 else 0)
    # Decode step g (1..decode_steps) attends to prompt + g keys, padded to a block.
    cells += block * _sum_ceil_div(decode_steps, 1, prompt, block)
    steps = full + (1 if rest else 0) + decode_steps
    total = StepFeatures(tokens=prompt + decode_steps, sampled=1 + decode_steps, decode_cells=cells,
                         prefill_cells=prefill_cells, adapters=steps if lora else 0,
                         lora_token_rank=(prompt + decode_steps) * rank if lora else 0, loads=0)
    return cost.step_seconds(total) + (steps - 1) * cost.step_seconds(StepFeatures(0, 0, 0, 0, 0, 0, 0))


def _sum_ceil_div(n: int, a: int, b: int, m: int) -> int:
    """sum over k = 1..n of ceil((a k + b) / m), for a, b >= 0 and m >= 1, in O(log) steps:
    ceil(x / m) = floor((x + m - 1) / m), summed by the classic floor-sum recursion."""
    total, count, a2, b2, m2 = 0, n, a, a + b + m - 1, m  # the k = 1..n terms as k' = 0..n-1
    while count > 0:
        if a2 >= m2:
            total += count * (count - 1) // 2 * (a2 // m2)
            a2 %= m2
        if b2 >= m2:
            total += count * (b2 // m2)
            b2 %= m2
        y_max = a2 * count + b2
        if y_max < m2:
            break
        count, b2 = divmod(y_max, m2)
        m2, a2 = a2, m2
    return total


def synthetic_prompt(request: TraceRequest) -> list[int]:
    """Stand-in token ids when the real prompt is not given: deterministic per source."""
    seed = zlib.crc32((request.source or f"{request.task}:{request.prompt_tokens}").encode())
    return [(seed + 7919 * i) % 49000 + 100 for i in range(request.prompt_tokens)]


class Simulator:
    def __init__(
        self,
        trace: Trace,
        policy: SchedulingPolicy,
        cost: StepCostModel,
        shape: EngineShape | None = None,
        prompts: Mapping[str, list[int]] | None = None,
        on_plan: Callable[[BatchPlan, Scheduler], None] | None = None,
    ) -> None:
        """`on_plan` sees every plan right after the scheduler made it (invariant checks)."""
        self.trace = trace
        self.on_plan = on_plan
        self.cost = cost
        self.shape = shape or EngineShape()
        self.prompts = prompts or {}
        self.now = 0.0
        self.adapters = AdapterSlots(self.shape.max_lora_slots)
        for name in trace.tasks:
            self.adapters.register(name, f"sim://{name}")
        self.scheduler = Scheduler(
            SchedulerLimits(self.shape.max_num_seqs, self.shape.max_num_batched_tokens, self.shape.context_length,
                            self.shape.max_prefill_tokens_beside_decodes),
            BlockManager(self.shape.num_kv_blocks, self.shape.block_size),
            self.adapters,
            eos_token_ids=(_EOS,),
            policy=policy,
            clock=lambda: self.now,
        )
        self._ranks = {name: profile.rank for name, profile in trace.tasks.items()}
        self._slot_names: dict[int, str] = {}

    def run(self, progress: bool = False) -> SimulationResult:
        requests = self.trace.requests
        context = self.shape.context_length
        records = [RequestRecord(request_id=str(i), task=r.task, prompt_tokens=r.prompt_tokens, arrival_s=r.arrival_s,
                                 isolated_s=isolated_latency(r, self._ranks.get(r.task or "", 0), self.cost, self.shape)
                                 if r.prompt_tokens < context else 0.0, preemptions=0)
                   for i, r in enumerate(requests)]
        sequences: dict[int, Sequence] = {}
        sampling: dict[int, SamplingParams] = {}
        steps: list[StepRecord] = []
        max_adapters = 0
        max_blocks = 0
        next_arrival = 0
        steps_without_progress = 0
        computed_high: dict[int, int] = {}  # by sequence: the most prompt and output tokens it has had computed
        fairness = ServiceGapMeter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="simulate", unit="req", leave=False)
        while next_arrival < len(requests) or self.scheduler.has_work():
            while next_arrival < len(requests) and requests[next_arrival].arrival_s <= self.now:
                index, request = next_arrival, requests[next_arrival]
                next_arrival += 1
                if request.prompt_tokens >= context:
                    # The server refuses this request alone (ContextLengthError) and serves on:
                    # so does the simulation, recording it as failed (before building a prompt
                    # of up to millions of synthetic tokens).
                    records[index].error = f"ContextLengthError: {context_refusal(request.prompt_tokens, context)}"
                    if bar:
                        bar.update(1)
                    continue
                params = sampling.setdefault(request.max_tokens, SamplingParams(max_tokens=request.max_tokens))
                seq = Sequence(seq_id=index, prompt_token_ids=self.prompts.get(request.source) or synthetic_prompt(request),
                               sampling=params, adapter=request.task, arrival_time=request.arrival_s)
                if seq.num_prompt_tokens != request.prompt_tokens:
                    raise ValueError(f"request {index}: prompt of {seq.num_prompt_tokens} tokens, trace says "
                                     f"{request.prompt_tokens}")
                sequences[index] = seq
                self.scheduler.add(seq)
            plan = self.scheduler.schedule()
            if plan is None:
                if next_arrival >= len(requests) and not self.scheduler.has_work():
                    break  # the last arrivals were refused: nothing left to run
                if next_arrival >= len(requests):
                    raise SimulationStuckError(
                        f"{len(self.scheduler.waiting)} waiting and {len(self.scheduler.running)} running requests, "
                        "but the scheduler plans nothing")
                self.now = max(self.now, requests[next_arrival].arrival_s)
                continue
            if self.on_plan is not None:
                self.on_plan(plan, self.scheduler)
            for load in plan.adapter_loads:
                self._slot_names[load.slot] = load.name
            features = StepFeatures.of_plan(plan, lambda slot: self._ranks[self._slot_names[slot]], self.shape.block_size)
            seconds = self.cost.step_seconds(features)
            steps.append(StepRecord(self.now, seconds, len(plan.chunks), features.tokens, features.adapters, features.loads))
            max_adapters = max(max_adapters, features.adapters)
            max_blocks = max(max_blocks, self.shape.num_kv_blocks - self.scheduler.blocks.num_free_blocks)
            first_prompts: dict[str, int] = {}
            for chunk in plan.chunks:
                record = records[chunk.seq_id]
                if record.admitted_s is None:
                    record.admitted_s = self.now
                    task = requests[chunk.seq_id].task or "<base>"
                    first_prompts[task] = first_prompts.get(task, 0) + record.prompt_tokens
            self.now += seconds
            sampled = []
            for chunk in plan.chunks:
                if chunk.sample:
                    seq = sequences[chunk.seq_id]
                    last = seq.num_generated + 1 >= requests[chunk.seq_id].output_tokens
                    sampled.append(SampledToken(seq_id=chunk.seq_id, token_id=_EOS if last else _TOKEN))
            result = StepResult(step_id=plan.step_id, sampled=sampled, num_tokens=features.tokens, compute_seconds=seconds)
            update = self.scheduler.process_result(result, sequences)
            progressed = bool(update.new_tokens)
            for chunk in plan.chunks:
                tokens_done = sequences[chunk.seq_id].num_computed_tokens
                if tokens_done > computed_high.get(chunk.seq_id, 0):
                    computed_high[chunk.seq_id], progressed = tokens_done, True
            steps_without_progress = 0 if progressed else steps_without_progress + 1
            if steps_without_progress > _MAX_STEPS_WITHOUT_PROGRESS:
                raise SimulationStuckError(f"{steps_without_progress} steps without progress (no token sampled, no "
                                           f"prompt token computed for the first time) at t={self.now:.1f} s")
            sampled_by_task: dict[str, int] = {}
            for seq, _ in update.new_tokens:
                records[seq.seq_id].token_times.append(self.now)
                task = seq.adapter or "<base>"
                sampled_by_task[task] = sampled_by_task.get(task, 0) + 1
            computed = {chunk.seq_id for chunk in plan.chunks}
            left_out = {s.adapter or "<base>" for i, s in sequences.items() if i not in computed and not s.is_finished}
            fairness.step(self.now, left_out, first_prompts, sampled_by_task)
            for seq in update.finished:
                computed_high.pop(seq.seq_id, None)
                record = records[seq.seq_id]
                record.finish_s = self.now
                record.preemptions = seq.num_preemptions
                del sequences[seq.seq_id]
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        self.scheduler.policy.close()
        return SimulationResult(records, steps, max_adapters, max_blocks, fairness.worst)


def simulate(trace: Trace, policy: SchedulingPolicy, cost: StepCostModel, shape: EngineShape | None = None,
             prompts: Mapping[str, list[int]] | None = None, progress: bool = False,
             on_plan: Callable[[BatchPlan, Scheduler], None] | None = None) -> SimulationResult:
    return Simulator(trace, policy, cost, shape, prompts, on_plan).run(progress)
