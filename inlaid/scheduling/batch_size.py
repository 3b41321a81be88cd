"""How many of the ranked requests one step should compute: the batch that completes
requests fastest, priced by the executor's step-time cost model.

On the CPU executor a step costs a constant plus ~18 ms per distinct adapter plus ~2 ms per
row plus attention padded to the batch's longest context (`bench/results/sched_cost.md`):
past ~10 rows a step grows almost linearly with its rows, so a full batch is processor
sharing, and a short request in it waits as long per token as the longest one. Choosing
the prefix of the ranking (shortest remaining first) that maximises

    sum over its requests of 1 / remaining steps   /   predicted step seconds

is Smith's rule (order by processing time over weight) applied to the step: it runs the
short requests in small fast steps while they exist, and grows the batch to everything
when the remaining work is alike (the score of n equal requests grows with n). A request
left out keeps its KV blocks (paused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as SequenceType
from dataclasses import dataclass, field

from inlaid.engine.sequence import Sequence
from inlaid.scheduling.cost_model import StepCostModel, StepFeatures


@dataclass
class _StepEstimate:
    """A planned step's cost-model features, grown one request at a time."""

    block_size: int
    tokens: int = 0
    sampled: int = 0
    decode_rows: int = 0
    decode_context: int = 0
    prefill_chunks: int = 0
    prefill_queries: int = 0
    prefill_context: int = 0
    loads: int = 0
    adapters: set[str] = field(default_factory=set)

    def add(self, seq: Sequence, tokens: int, resident: bool) -> None:
        context = seq.num_computed_tokens + tokens
        self.tokens += tokens
        if tokens == 1:
            self.decode_rows += 1
            self.decode_context = max(self.decode_context, context)
        else:
            self.prefill_chunks += 1
            self.prefill_queries = max(self.prefill_queries, tokens)
            self.prefill_context = max(self.prefill_context, context)
        if context == len(seq.token_ids):
            self.sampled += 1
        if seq.adapter is not None and seq.adapter not in self.adapters:
            self.adapters.add(seq.adapter)
            self.loads += 0 if resident else 1

    def features(self) -> StepFeatures:
        pad = self.block_size
        return StepFeatures(
            tokens=self.tokens,
            sampled=self.sampled,
            decode_cells=self.decode_rows * -(-self.decode_context // pad) * pad,
            prefill_cells=self.prefill_chunks * self.prefill_queries * -(-self.prefill_context // pad) * pad,
            adapters=len(self.adapters),
            lora_token_rank=0,  # ranks are the executor's; the term is ~1 % of a step
            loads=self.loads,
        )


def fastest_batch(
    ranked: SequenceType[Sequence],
    remaining_steps: Callable[[Sequence], float],
    cost: StepCostModel,
    block_size: int,
    token_budget: int,
    max_seqs: int,
    max_adapters: int | None,
    resident: Callable[[str], bool],
) -> int:
    """The number of leading requests of `ranked` to compute in the next step (at least 1).

    Walks the ranking as the scheduler will (one token per decode, a prefill chunk within
    the token budget, at most `max_adapters` distinct adapters, `max_seqs` rows) and
    returns the prefix with the best completion rate (module docstring)."""
    estimate = _StepEstimate(block_size)
    budget = token_budget
    gain = 0.0
    best_rate, best_count, count = -1.0, 1, 0
    for seq in ranked:
        if count >= max_seqs or budget <= 0:
            break
        adapter = seq.adapter
        if (adapter is not None and adapter not in estimate.adapters and max_adapters is not None
                and len(estimate.adapters) >= max_adapters):
            continue  # the scheduler skips it too
        pending = seq.num_pending_tokens
        tokens = 1 if pending == 1 else min(pending, budget)
        estimate.add(seq, tokens, adapter is None or resident(adapter))
        budget -= tokens
        count += 1
        gain += 1.0 / max(remaining_steps(seq), 1.0)
        rate = gain / cost.step_seconds(estimate.features())
        if rate > best_rate:
            best_rate, best_count = rate, count
    return best_count
