"""CPU path of the separate segmented LoRA ops (`lora_shrink`, `lora_expand`): batched torch
ops from a per-step plan, no loop over requests. The fused shrink + expand the engine calls
(`lora_apply`) lives in lora_cpu.py.

How (measured in bench/kernels_cpu.py, see docs/kernels.md):
  * a *plan* is derived once from the segment metadata (pure Python over segments, cached
    by content, so the 7 projections x L layers of a step reuse it);
  * per slice, slots are bucketed by their rank, so every matmul uses the adapter's real
    rank (`pool[slots, :r]`): padded ranks are never read nor multiplied;
  * inside a rank bucket, slots with few tokens (decode) are batched into ONE bmm with
    their tokens padded to the bucket's largest count (< LARGE_GROUP_TOKENS, so padding
    waste is bounded); slots with many tokens (prefill) get one plain matmul each -- a
    handful of big matmuls whose Python overhead is negligible next to their FLOPs.
The Python loops run over distinct ranks and over large groups only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

# A slot with at least this many tokens in the step gets its own matmul.
LARGE_GROUP_TOKENS = 16
_PLAN_CACHE_SIZE = 16


@dataclass(frozen=True)
class _LargeGroup:
    slot: int
    tokens: slice | Tensor  # a slice when the slot's tokens are one contiguous range


@dataclass(frozen=True)
class _SmallGroups:
    """Slots with few tokens, batched as [n_groups, max_count] padded token grids."""

    slots: Tensor  # int64 [n_groups]
    gather_index: Tensor  # int64 [n_groups * max_count]; padding points at token 0
    valid_positions: Tensor | None  # int64 positions of real tokens in the flat grid; None = all real
    tokens: Tensor  # int64 [n_real]: token of each real position, in grid order
    max_count: int


@dataclass(frozen=True)
class _RankBucket:
    rank: int
    small: _SmallGroups | None
    large: tuple[_LargeGroup, ...]


@dataclass(frozen=True)
class LoraCpuPlan:
    """Per slice: the rank buckets of the step's tokens."""

    slices: tuple[tuple[_RankBucket, ...], ...]


@dataclass
class _PlanCache:
    entries: "OrderedDict[tuple, LoraCpuPlan]" = field(default_factory=OrderedDict)

    def get(self, key: tuple) -> LoraCpuPlan | None:
        plan = self.entries.get(key)
        if plan is not None:
            self.entries.move_to_end(key)
        return plan

    def put(self, key: tuple, plan: LoraCpuPlan) -> None:
        self.entries[key] = plan
        if len(self.entries) > _PLAN_CACHE_SIZE:
            self.entries.popitem(last=False)


_CACHE = _PlanCache()


def slot_token_ranges(starts: list[int], slots: list[int]) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    for g, slot in enumerate(slots):
        if slot >= 0 and starts[g + 1] > starts[g]:
            ranges.setdefault(slot, []).append((starts[g], starts[g + 1]))
    return ranges


def token_list(token_ranges: list[tuple[int, int]]) -> list[int]:
    return [t for a, b in token_ranges for t in range(a, b)]


def _build_bucket(rank: int, slot_ranges: list[tuple[int, list[tuple[int, int]]]]) -> _RankBucket:
    large: list[_LargeGroup] = []
    small: list[tuple[int, list[int]]] = []
    for slot, token_ranges in slot_ranges:
        count = sum(b - a for a, b in token_ranges)
        if count >= LARGE_GROUP_TOKENS:
            if len(token_ranges) == 1:
                tokens: slice | Tensor = slice(*token_ranges[0])
            else:
                tokens = torch.tensor(token_list(token_ranges), dtype=torch.int64)
            large.append(_LargeGroup(slot, tokens))
        else:
            small.append((slot, token_list(token_ranges)))
    small_groups = None
    if small:
        max_count = max(len(t) for _, t in small)
        gather: list[int] = []
        valid: list[int] = []
        real_tokens: list[int] = []
        for g, (_, toks) in enumerate(small):
            gather += toks + [toks[0]] * (max_count - len(toks))
            valid += range(g * max_count, g * max_count + len(toks))
            real_tokens += toks
        small_groups = _SmallGroups(
            slots=torch.tensor([s for s, _ in small], dtype=torch.int64),
            gather_index=torch.tensor(gather, dtype=torch.int64),
            valid_positions=None if len(valid) == len(gather) else torch.tensor(valid, dtype=torch.int64),
            tokens=torch.tensor(real_tokens, dtype=torch.int64),
            max_count=max_count,
        )
    return _RankBucket(rank, small_groups, tuple(large))


def build_cpu_plan(segment_starts: Tensor, segment_slots: Tensor, slot_ranks: Tensor) -> LoraCpuPlan:
    """The plan for these segments (cached by content: metadata tensors are tiny)."""
    starts = segment_starts.tolist()
    slots = segment_slots.tolist()
    ranks = slot_ranks.tolist()
    key = (tuple(starts), tuple(slots), tuple(map(tuple, ranks)))
    plan = _CACHE.get(key)
    if plan is not None:
        return plan
    ranges = slot_token_ranges(starts, slots)
    by_rank_row: dict[tuple[int, ...], tuple[_RankBucket, ...]] = {}
    per_slice: list[tuple[_RankBucket, ...]] = []
    for rank_row in map(tuple, ranks):
        if rank_row not in by_rank_row:
            buckets: dict[int, list[tuple[int, list[tuple[int, int]]]]] = {}
            for slot, token_ranges in ranges.items():
                rank = rank_row[slot]
                if rank > 0:
                    buckets.setdefault(rank, []).append((slot, token_ranges))
            by_rank_row[rank_row] = tuple(_build_bucket(r, s) for r, s in sorted(buckets.items()))
        per_slice.append(by_rank_row[rank_row])
    plan = LoraCpuPlan(tuple(per_slice))
    _CACHE.put(key, plan)
    return plan


def lora_shrink_cpu(
    x: Tensor,
    a_pools: Sequence[Tensor],
    plan: LoraCpuPlan,
    out: Tensor,
) -> Tensor:
    """out[i, t, :r] = x[t] @ A_i[slot_t, :r].T for every token with an adapter (out float32).

    16-bit x and pools are multiplied in float32 (`widened`): v is float32 as on CUDA, where a
    float16 product would overflow (65504) and a bfloat16 one keep 8 bits."""
    x = widened(x)
    for i, (a_pool, buckets) in enumerate(zip(a_pools, plan.slices)):
        out_i = out[i]
        for bucket in buckets:
            r = bucket.rank
            out_ir = out_i[:, :r]
            for group in bucket.large:
                out_ir[group.tokens] = (x[group.tokens] @ widened(a_pool[group.slot, :r]).T).to(out.dtype)
            small = bucket.small
            if small is None:
                continue
            k = x.shape[1]
            x_grid = x.index_select(0, small.gather_index).view(-1, small.max_count, k)
            a_sel = widened(a_pool[:, :r].index_select(0, small.slots))  # [n_groups, r, K], real rank only
            result = torch.bmm(x_grid, a_sel.transpose(1, 2)).view(-1, r)
            if small.valid_positions is not None:
                result = result.index_select(0, small.valid_positions)
            out_ir.index_copy_(0, small.tokens, result.to(out.dtype))
    return out


def lora_expand_cpu(
    y: Tensor,
    v: Tensor,
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    plan: LoraCpuPlan,
    slot_scales: Tensor,
) -> None:
    """y[t, off_i:off_i+N_i] += scale * v[i, t, :r] @ B_i[slot_t, :, :r].T, in place.

    16-bit y and pools: the product in float32 (v itself may lie past float16's range) and y
    rounded once; a token's rows belong to one slot, so writing them back is exact."""
    scales = slot_scales.tolist()
    wide = y.dtype in NARROW_FLOATS
    for i, (b_pool, offset, buckets) in enumerate(zip(b_pools, slice_offsets, plan.slices)):
        n_i = b_pool.shape[1]
        y_i = y[:, offset : offset + n_i]
        v_i = v[i]
        for bucket in buckets:
            r = bucket.rank
            for group in bucket.large:
                b = widened(b_pool[group.slot, :, :r])
                delta = v_i[group.tokens, :r].to(b.dtype) @ b.T
                if wide:
                    add_rounded_once(y_i, group.tokens, delta.mul_(scales[i][group.slot]))
                elif isinstance(group.tokens, slice):
                    y_i[group.tokens].add_(delta, alpha=scales[i][group.slot])
                else:
                    y_i.index_add_(0, group.tokens, delta, alpha=scales[i][group.slot])
            small = bucket.small
            if small is None:
                continue
            b_sel = widened(b_pool[:, :, :r].index_select(0, small.slots))  # [n_groups, N_i, r]
            v_grid = v_i[:, :r].index_select(0, small.gather_index).to(b_sel.dtype)
            b_sel.mul_(slot_scales[i].index_select(0, small.slots).to(b_sel.dtype)[:, None, None])
            delta = torch.bmm(v_grid.view(-1, small.max_count, r), b_sel.transpose(1, 2)).view(-1, n_i)
            if small.valid_positions is not None:
                delta = delta.index_select(0, small.valid_positions)
            if wide:
                add_rounded_once(y_i, small.tokens, delta)
            else:
                y_i.index_add_(0, small.tokens, delta.to(y.dtype))


NARROW_FLOATS = (torch.float16, torch.bfloat16)


def widened(t: Tensor) -> Tensor:
    """`t` in float32 if it is a 16-bit float (a copy), else `t` itself."""
    return t.float() if t.dtype in NARROW_FLOATS else t


def add_rounded_once(y_rows: Tensor, tokens: slice | Tensor, delta: Tensor) -> None:
    """y_rows[tokens] += delta (float32), rounded to y's dtype once."""
    if isinstance(tokens, slice):
        y_rows[tokens] = (y_rows[tokens].float() + delta).to(y_rows.dtype)
    else:
        y_rows.index_copy_(0, tokens, (y_rows.index_select(0, tokens).float() + delta).to(y_rows.dtype))
