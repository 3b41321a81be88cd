"""CPU path of the segmented LoRA ops: batched torch ops, no loop over requests.

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
from typing import Callable, Sequence

import torch
from torch import Tensor

from .lora_compact_cpu import CompactLoraPools, active_column_share, lora_apply_compact
from .lora_meta import LoraArgumentError
from .lora_native import NativeLoraPools, lora_apply_native, native_lora_available, native_lora_fits

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


def _slot_token_ranges(starts: list[int], slots: list[int]) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    for g, slot in enumerate(slots):
        if slot >= 0 and starts[g + 1] > starts[g]:
            ranges.setdefault(slot, []).append((starts[g], starts[g + 1]))
    return ranges


def _token_list(token_ranges: list[tuple[int, int]]) -> list[int]:
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
                tokens = torch.tensor(_token_list(token_ranges), dtype=torch.int64)
            large.append(_LargeGroup(slot, tokens))
        else:
            small.append((slot, _token_list(token_ranges)))
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
    ranges = _slot_token_ranges(starts, slots)
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
    """out[i, t, :r] = x[t] @ A_i[slot_t, :r].T for every token with an adapter (out float32)."""
    for i, (a_pool, buckets) in enumerate(zip(a_pools, plan.slices)):
        out_i = out[i]
        for bucket in buckets:
            r = bucket.rank
            out_ir = out_i[:, :r]
            for group in bucket.large:
                out_ir[group.tokens] = (x[group.tokens] @ a_pool[group.slot, :r].T).to(out.dtype)
            small = bucket.small
            if small is None:
                continue
            k = x.shape[1]
            x_grid = x.index_select(0, small.gather_index).view(-1, small.max_count, k)
            a_sel = a_pool[:, :r].index_select(0, small.slots)  # [n_groups, r, K], real rank only
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
    """y[t, off_i:off_i+N_i] += scale * v[i, t, :r] @ B_i[slot_t, :, :r].T, in place."""
    scales = slot_scales.tolist()
    for i, (b_pool, offset, buckets) in enumerate(zip(b_pools, slice_offsets, plan.slices)):
        n_i = b_pool.shape[1]
        y_i = y[:, offset : offset + n_i]
        v_i = v[i]
        for bucket in buckets:
            r = bucket.rank
            for group in bucket.large:
                b = b_pool[group.slot, :, :r]
                delta = v_i[group.tokens, :r].to(b.dtype) @ b.T
                if isinstance(group.tokens, slice):
                    y_i[group.tokens].add_(delta, alpha=scales[i][group.slot])
                else:
                    y_i.index_add_(0, group.tokens, delta, alpha=scales[i][group.slot])
            small = bucket.small
            if small is None:
                continue
            v_grid = v_i[:, :r].index_select(0, small.gather_index).to(b_pool.dtype)
            b_sel = b_pool[:, :, :r].index_select(0, small.slots)  # [n_groups, N_i, r]
            b_sel.mul_(slot_scales[i].index_select(0, small.slots).to(b_sel.dtype)[:, None, None])
            delta = torch.bmm(v_grid.view(-1, small.max_count, r), b_sel.transpose(1, 2)).view(-1, n_i)
            if small.valid_positions is not None:
                delta = delta.index_select(0, small.valid_positions)
            y_i.index_add_(0, small.tokens, delta.to(y.dtype))


# The compact masked route is taken only while the step's slots own this share of its columns.
COMPACT_MIN_ACTIVE_SHARE = 0.7

# The masked path multiplies every token by every slot of the step's slot range: its wasted
# work grows with tokens x slots, its op count does not grow with the number of adapters.
DENSE_MAX_TOKEN_SLOTS = 512
USE_NATIVE = True  # the native kernel (lora_native.c) where it is built and the tensors fit; tests switch it
NATIVE_MAX_GROUP_TOKENS = 32  # an adapter with this many tokens of a step keeps its matmuls (docs/kernels.md)


@dataclass(frozen=True)
class HostSegments:
    """A step's segments read onto the host once and validated: the rows each slot owns.

    Every LoRA projection of every layer shares one step's segments, so the engine builds
    this once per step (`host_segments`) instead of re-reading and re-checking the
    metadata tensors in each of its 4 x L projection calls.

    slot_rows: (slot, rows) per adapter slot with tokens; rows is a slice when the slot's
               tokens are one contiguous range (the engine sorts its batch so they are),
               else an int64 index tensor
    slot_range: [first, last + 1) of the slots with tokens
    token_slots: int64 [T] slot of each token, -1 = none (for the masked paths)
    """

    num_tokens: int
    slot_rows: tuple[tuple[int, slice | Tensor], ...]
    slot_range: tuple[int, int]
    token_slots: Tensor
    _masks: dict = field(default_factory=dict, compare=False)

    @property
    def native_large_groups(self) -> tuple[tuple[int, slice | Tensor], ...]:
        """The (slot, rows) groups too long for the native kernel (cached per step)."""
        large = self._masks.get("native_large")
        if large is None:
            large = self._masks["native_large"] = tuple(
                (slot, rows) for slot, rows in self.slot_rows if _row_count(rows) >= NATIVE_MAX_GROUP_TOKENS)
        return large

    def native_token_slots(self, skipped: Sequence[tuple[int, slice | Tensor]]) -> Tensor:
        """token_slots with the rows of `skipped` groups set to -1 (cached per step: every
        projection of the step skips the same groups)."""
        if not skipped:
            return self.token_slots
        key = ("native", tuple(slot for slot, _ in skipped))
        slots = self._masks.get(key)
        if slots is None:
            slots = self.token_slots.clone()
            for _, rows in skipped:
                slots[rows] = -1
            self._masks[key] = slots
        return slots

    @property
    def masked_path(self) -> bool:
        """Whether the masked all-slots matmuls beat one matmul pair per adapter."""
        first, stop = self.slot_range
        return len(self.slot_rows) > 1 and self.num_tokens * (stop - first) <= DENSE_MAX_TOKEN_SLOTS

    def cached_mask(self, key: tuple, build: Callable[[Tensor], Tensor]) -> Tensor:
        """`build(token_slots)`, once per step and key: the masks of the masked routes are
        the same for every projection that shares their key."""
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = build(self.token_slots)
        return mask

    def one_hot(self, dtype: torch.dtype) -> Tensor:
        """[T, slots in range] 1.0 where the token uses the slot (cached per dtype)."""
        first, stop = self.slot_range
        return self.cached_mask(("one_hot", dtype), lambda token_slots: (
            token_slots[:, None] == torch.arange(first, stop, device=token_slots.device)[None, :]).to(dtype))


def host_segments(segment_starts: Tensor, segment_slots: Tensor, device: torch.device | None = None) -> HostSegments:
    """Group the (already validated) segments by slot."""
    starts = segment_starts.tolist()
    slots = segment_slots.tolist()
    slot_rows: list[tuple[int, slice | Tensor]] = []
    for slot, token_ranges in _slot_token_ranges(starts, slots).items():
        if len(token_ranges) == 1:
            slot_rows.append((slot, slice(*token_ranges[0])))
        else:
            slot_rows.append((slot, torch.tensor(_token_list(token_ranges), dtype=torch.int64, device=device)))
    used = [slot for slot, _ in slot_rows]
    token_slots = torch.repeat_interleave(
        segment_slots.to(device=device, dtype=torch.int64), (segment_starts[1:] - segment_starts[:-1]).to(device)
    )
    return HostSegments(
        num_tokens=starts[-1],
        slot_rows=tuple(slot_rows),
        slot_range=(min(used), max(used) + 1) if used else (0, 0),
        token_slots=token_slots,
    )


def lora_apply_cpu(
    y: Tensor,
    x: Tensor,
    a_pools: Sequence[Tensor],
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    segments: HostSegments,
    slot_ranks: Tensor,
    slot_scales: Tensor,
    stacked_a: Tensor | None = None,
    compact: CompactLoraPools | Callable[[], CompactLoraPools] | None = None,
    native: NativeLoraPools | None = None,
) -> None:
    """Fused shrink + expand: y[t, slice i] += scale * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T.

    Where the native kernel (lora_native.c) is built and the tensors are the engine's fp32
    pools, it takes every adapter with fewer than NATIVE_MAX_GROUP_TOKENS tokens (each token
    against its own slot, at its real rank) and the per-adapter route below the rest.
    `native`: these pools bound once for the kernel (the engine keeps one per projection),
    saving the per-call checks and pointer marshalling. Otherwise three torch routes (all exact up to float summation order):
      * masked on the compact pools (`compact` given; lora_compact_cpu.py): the masked route
        below over every loaded slot's real ranks instead of the padded pools, taken where the
        masked route would be and the step's own slots hold most of the columns (else the
        per-adapter route reads only theirs);
      * masked (decode-sized steps with several adapters, `stacked_a` given): ONE shrink
        matmul of every token against every slot of the step's slot range, a multiply that
        keeps each token's own slot (times its scale) and zeroes the rest, then one
        `addmm_` per slice against all those slots' B at once. 3 + n_slices ops per
        projection whatever the number of adapters; pool rows past a slot's rank are zero,
        so padded ranks add nothing.
      * per adapter: one shrink (all slices in one matmul through `stacked_a` when the
        adapter has few tokens, else per slice at the real rank) and one `addmm_` per slice.
    """
    if native is not None and native.stacked_a is not stacked_a:
        raise LoraArgumentError("`native` was bound to other pools than these")
    if (native is not None and USE_NATIVE) or native_lora_route(y, x, stacked_a, b_pools):
        # Small groups (decode tokens, short chunks) through the native kernel; an adapter
        # with many tokens keeps its matmul pair, where BLAS beats per-token dot products.
        large = segments.native_large_groups
        if len(large) < len(segments.slot_rows):
            token_slots = segments.native_token_slots(large)
            if native is not None:
                native.apply(y, x, token_slots)
            else:
                lora_apply_native(y, x, stacked_a, b_pools, slice_offsets, token_slots, slot_ranks, slot_scales)
        _lora_apply_per_adapter(y, x, a_pools, b_pools, slice_offsets, large, slot_ranks, slot_scales, stacked_a)
        return
    if segments.masked_path:
        if compact is not None:
            compact = compact() if callable(compact) else compact
            # The masked route multiplies every loaded slot's columns; while the step's own slots
            # hold less than COMPACT_MIN_ACTIVE_SHARE of them, reading only those (per adapter)
            # is faster (16 loaded slots: 3.5x at 2 in use, 1.3x at 8; bench/lora_routes.py).
            if active_column_share(compact, segments) >= COMPACT_MIN_ACTIVE_SHARE:
                lora_apply_compact(y, x, compact, slice_offsets, segments)
                return
        elif stacked_a is not None:
            _lora_apply_masked(y, x, stacked_a, b_pools, slice_offsets, segments, slot_scales)
            return
    _lora_apply_per_adapter(y, x, a_pools, b_pools, slice_offsets, segments.slot_rows, slot_ranks, slot_scales,
                            stacked_a)


def native_lora_route(y: Tensor, x: Tensor, stacked_a: Tensor | None, b_pools: Sequence[Tensor]) -> bool:
    """Whether lora_apply_cpu takes the native kernel for these tensors."""
    return USE_NATIVE and native_lora_available() and native_lora_fits(y, x, stacked_a, b_pools)


def _row_count(rows: slice | Tensor) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _lora_apply_per_adapter(
    y: Tensor,
    x: Tensor,
    a_pools: Sequence[Tensor],
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    slot_rows: Sequence[tuple[int, slice | Tensor]],
    slot_ranks: Tensor,
    slot_scales: Tensor,
    stacked_a: Tensor | None,
) -> None:
    """The per-adapter route over `slot_rows` (lora_apply_cpu's docstring)."""
    if not slot_rows:
        return
    ranks = slot_ranks.tolist()
    scales = slot_scales.tolist()
    r_max = a_pools[0].shape[1]
    for slot, rows in slot_rows:
        x_rows = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        slot_ranks_now = [row[slot] for row in ranks]
        fused_shrink = stacked_a is not None and (
            x_rows.shape[0] < LARGE_GROUP_TOKENS or min(slot_ranks_now) == r_max
        )
        stacked_v = x_rows @ stacked_a[slot].T if fused_shrink else None
        for i, (a_pool, b_pool, offset) in enumerate(zip(a_pools, b_pools, slice_offsets)):
            rank = slot_ranks_now[i]
            if rank == 0:
                continue
            if stacked_v is not None:
                v = stacked_v[:, i * r_max : i * r_max + rank]
            else:
                v = x_rows @ a_pool[slot, :rank].T
            b_t = b_pool[slot, :, :rank].T
            if isinstance(rows, slice):
                y[rows, offset : offset + b_pool.shape[1]].addmm_(v, b_t, alpha=scales[i][slot])
            else:
                y[:, offset : offset + b_pool.shape[1]].index_add_(0, rows, v @ b_t, alpha=scales[i][slot])


def _lora_apply_masked(
    y: Tensor,
    x: Tensor,
    stacked_a: Tensor,
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    segments: HostSegments,
    slot_scales: Tensor,
) -> None:
    first, stop = segments.slot_range
    num_slots, n_slices, num_tokens = stop - first, len(b_pools), x.shape[0]
    r_max = b_pools[0].shape[2]
    # [T, slots * n_slices * R]: every token against every slot in range.
    v_all = x @ stacked_a[first:stop].reshape(-1, x.shape[1]).T
    keep = segments.one_hot(x.dtype)[:, :, None] * slot_scales[:, first:stop].T.to(x.dtype)[None]
    v = torch.empty(num_tokens, n_slices, num_slots, r_max, dtype=x.dtype, device=x.device)
    torch.mul(
        v_all.view(num_tokens, num_slots, n_slices, r_max).transpose(1, 2),
        keep.transpose(1, 2)[..., None],
        out=v,
    )
    for i, (b_pool, offset) in enumerate(zip(b_pools, slice_offsets)):
        # [slots * R, N_i]: a view when the pool is stored [S, R, N_i] (as the engine's is).
        b_rows = b_pool[first:stop].transpose(1, 2).reshape(num_slots * r_max, b_pool.shape[1])
        y[:, offset : offset + b_pool.shape[1]].addmm_(v[:, i].reshape(num_tokens, num_slots * r_max), b_rows)
