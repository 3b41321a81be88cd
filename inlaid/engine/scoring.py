"""Teacher-forced scoring: the negative log-likelihood of given continuations, adapter on.

The low-noise quality measure of a served base: feed prompt + reference answer through the
engine's own forward (the same kernels that serve: int4 base, segmented LoRA, paged KV) and
sum -log p(token | everything before it) over the answer's tokens. Greedy task metrics on a
handful of examples move by chance; this moves only with the model.

It drives a `ModelRunner` directly with prefill plans, so the runner must be its own (not
one an `Engine` is serving from: it loads adapters into slots and writes KV blocks itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inlaid.engine.runner import ModelRunner
from inlaid.protocol import AdapterLoad, BatchPlan, ChunkPlan, SamplingParams

LOGITS_ROWS = 256  # rows of [rows, vocab] float32 logits computed at a time (50 MB for SmolLM2)


class ScoringError(ValueError):
    """A scoring request the runner cannot take (too long, no continuation, too many adapters)."""


@dataclass(frozen=True)
class ScoreRequest:
    """token_ids: prompt + continuation; the continuation starts at `first_scored` (>= 1)."""

    token_ids: list[int]
    first_scored: int
    adapter: tuple[str, str] | None = None  # (name, PEFT directory); None = the bare base


@dataclass(frozen=True)
class Score:
    nll: float  # sum over the continuation of -log p(token | all tokens before it), nats
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def score_continuations(
    runner: ModelRunner, requests: Sequence[ScoreRequest], max_batch_tokens: int = 2048
) -> list[Score]:
    """One Score per request, in order. Requests are packed into prefill steps of at most
    `max_batch_tokens` tokens, `runner.config.max_lora_slots` adapters and the KV cache."""
    config = runner.config
    blocks_per = [-(-len(r.token_ids) // config.block_size) for r in requests]
    for index, request in enumerate(requests):
        if not 1 <= request.first_scored < len(request.token_ids):
            raise ScoringError(f"request {index}: first_scored must lie in [1, {len(request.token_ids)}), "
                               f"got {request.first_scored}")
        if blocks_per[index] > config.num_kv_blocks or len(request.token_ids) > max_batch_tokens:
            raise ScoringError(f"request {index} ({len(request.token_ids)} tokens) does not fit one step "
                               f"(max_batch_tokens {max_batch_tokens}, KV cache {config.num_kv_blocks} blocks)")
    # Requests of one adapter side by side: fewer slot loads.
    order = sorted(range(len(requests)), key=lambda i: requests[i].adapter or ("", ""))
    scores: dict[int, Score] = {}
    batch: list[int] = []
    for index in order + [-1]:
        if index >= 0:
            grown = batch + [index]
            adapters = {requests[i].adapter for i in grown} - {None}
            fits = (sum(len(requests[i].token_ids) for i in grown) <= max_batch_tokens
                    and sum(blocks_per[i] for i in grown) <= config.num_kv_blocks
                    and len(adapters) <= config.max_lora_slots)
            if fits:
                batch = grown
                continue
        if batch:
            scores.update(zip(batch, _score_step(runner, [requests[i] for i in batch], [blocks_per[i] for i in batch])))
        batch = [index]
    return [scores[i] for i in range(len(requests))]


def _score_step(runner: ModelRunner, requests: list[ScoreRequest], blocks_per: list[int]) -> list[Score]:
    adapters = sorted({r.adapter for r in requests} - {None})
    slot_of: dict[tuple[str, str], int] = {}
    loads: list[AdapterLoad] = []
    for slot, (name, path) in enumerate(adapters):
        slot_of[(name, path)] = slot
        if runner.slot_contents.get(slot) != path:
            loads.append(AdapterLoad(slot=slot, name=name, path=path))
    chunks, next_block = [], 0
    for seq_id, (request, blocks) in enumerate(zip(requests, blocks_per)):
        chunks.append(ChunkPlan(
            seq_id=seq_id, token_ids=list(request.token_ids), start_pos=0,
            block_table=list(range(next_block, next_block + blocks)),
            adapter_slot=-1 if request.adapter is None else slot_of[request.adapter],
            sample=False, sampling=SamplingParams(), num_generated=0,
        ))
        next_block += blocks
    ordered, hidden, first_rows = runner.forward_hidden(BatchPlan(step_id=0, chunks=chunks, adapter_loads=loads))
    # Row p of a sequence predicts its token p + 1.
    rows, targets, owner = [], [], []
    for chunk, first in zip(ordered, first_rows):
        start = requests[chunk.seq_id].first_scored
        rows.extend(range(first + start - 1, first + len(chunk.token_ids) - 1))
        targets.extend(chunk.token_ids[start:])
        owner.extend([chunk.seq_id] * (len(chunk.token_ids) - start))
    row_index = torch.tensor(rows, dtype=torch.long, device=runner.device)
    target_index = torch.tensor(targets, dtype=torch.long, device=runner.device)
    token_nll = torch.empty(len(rows), dtype=torch.float64)
    with torch.inference_mode():
        for begin in range(0, len(rows), LOGITS_ROWS):
            piece = slice(begin, begin + LOGITS_ROWS)
            log_probs = torch.log_softmax(runner.model.logits(hidden[row_index[piece]]).float(), dim=-1)
            token_nll[piece] = -log_probs.gather(1, target_index[piece, None])[:, 0].double().cpu()
    sums = torch.zeros(len(requests), dtype=torch.float64).index_add_(0, torch.tensor(owner), token_nll)
    return [Score(float(sums[i]), len(r.token_ids) - r.first_scored) for i, r in enumerate(requests)]
