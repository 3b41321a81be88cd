"""CPU path of the fused segmented LoRA op the engine calls (`lora_apply`): y += LoRA(x) for
one (possibly fused) projection, shrink and expand together, per step.

Routes (lora_apply_cpu's docstring says which runs when): the native kernel (lora_native.c)
for adapters with few tokens in the step; torch's masked all-slots matmuls on compact
copies of the slots' real-rank rows (lora_compact_cpu.py: the loaded slots', kept across
steps, or the step's own slots', copied per call); one matmul pair per adapter. `HostSegments` is the step's segments read onto the host once, shared by every
projection. The separate shrink and expand ops: lora_cpu_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from . import lora_cpu_plan
from .lora_compact_cpu import CompactLoraPools, active_column_share, compact_step_pools, lora_apply_compact
from .lora_cpu_plan import add_rounded_once, slot_token_ranges, token_list
from .lora_meta import LoraArgumentError
from .lora_native import NativeLoraPools, lora_apply_native, native_lora_available, native_lora_fits

_Cached = TypeVar("_Cached")  # whatever a route caches per step: masks, shares, column runs

# The compact masked route is taken only while the step's slots own this share of its columns.
COMPACT_MIN_ACTIVE_SHARE = 0.7

# The masked path multiplies every token by every compact column (every loaded slot's, or the
# step's own slots'): its wasted work grows with tokens x slots, its op count does not grow
# with the number of adapters.
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
    # An adapter with this many tokens of the step keeps its matmul pair; None: none does, every
    # row takes the native kernel, whose rows are computed alone (batch invariance: a decode
    # row's bits moved when a prompt of its adapter joined its step and took the matmuls).
    native_group_limit: int | None = NATIVE_MAX_GROUP_TOKENS
    _masks: dict = field(default_factory=dict, compare=False)

    @property
    def native_large_groups(self) -> tuple[tuple[int, slice | Tensor], ...]:
        """The (slot, rows) groups too long for the native kernel (cached per step)."""
        large = self._masks.get("native_large")
        if large is None:
            limit = self.native_group_limit
            large = self._masks["native_large"] = tuple(
                (slot, rows) for slot, rows in self.slot_rows if limit is not None and _row_count(rows) >= limit)
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

    def cached_mask(self, key: tuple, build: Callable[[Tensor], _Cached]) -> _Cached:
        """`build(token_slots)`, once per step and key: the masks of the masked routes are
        the same for every projection that shares their key."""
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = build(self.token_slots)
        return mask


def host_segments(segment_starts: Tensor, segment_slots: Tensor, device: torch.device | None = None,
                  native_group_limit: int | None = NATIVE_MAX_GROUP_TOKENS) -> HostSegments:
    """Group the (already validated) segments by slot."""
    starts = segment_starts.tolist()
    slots = segment_slots.tolist()
    slot_rows: list[tuple[int, slice | Tensor]] = []
    for slot, token_ranges in slot_token_ranges(starts, slots).items():
        if len(token_ranges) == 1:
            slot_rows.append((slot, slice(*token_ranges[0])))
        else:
            slot_rows.append((slot, torch.tensor(token_list(token_ranges), dtype=torch.int64, device=device)))
    used = [slot for slot, _ in slot_rows]
    token_slots = torch.repeat_interleave(
        segment_slots.to(device=device, dtype=torch.int64), (segment_starts[1:] - segment_starts[:-1]).to(device)
    )
    return HostSegments(
        num_tokens=starts[-1],
        slot_rows=tuple(slot_rows),
        slot_range=(min(used), max(used) + 1) if used else (0, 0),
        token_slots=token_slots,
        native_group_limit=native_group_limit,
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
      * masked (decode-sized steps with several adapters, `stacked_a` given, no `compact`):
        the step's own slots copied at their real ranks (`compact_step_pools`), then the
        compact route on that copy: one shrink matmul of every token against those columns,
        each token's own columns kept (times the scale) and the rest selected away, one
        `addmm_` per slice. The pools' padding past a rank, rank-0 slots and slots without
        tokens are never read.
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
    if x.dtype == torch.float16:
        # float16's range ends at 65504: x @ A overflows it long before y does (activations of
        # ~100 over K = 1024 make 1e5), and on the masked routes another slot's overflowing
        # product turned a token's row NaN (0 x inf). The products run in float32 here, as the
        # CUDA kernels accumulate.
        _lora_apply_per_adapter_float32(y, x, a_pools, b_pools, slice_offsets, segments.slot_rows, slot_ranks,
                                        slot_scales)
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
            # No compact pools given: compact the step's own slots now. Multiplying the padded
            # pools (as this route once did) read the padding past each rank and every slot in
            # the step's range, so garbage or NaN there, or a rank-0 slot's rows, reached y.
            step_pools = compact_step_pools(stacked_a, b_pools, slot_ranks, slot_scales, segments)
            lora_apply_compact(y, x, step_pools, slice_offsets, segments)
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
            x_rows.shape[0] < lora_cpu_plan.LARGE_GROUP_TOKENS or min(slot_ranks_now) == r_max
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


def _lora_apply_per_adapter_float32(
    y: Tensor,
    x: Tensor,
    a_pools: Sequence[Tensor],
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    slot_rows: Sequence[tuple[int, slice | Tensor]],
    slot_ranks: Tensor,
    slot_scales: Tensor,
) -> None:
    """The per-adapter route with each adapter's rows and weights widened to float32, and y
    rounded once."""
    ranks = slot_ranks.tolist()
    scales = slot_scales.tolist()
    for slot, rows in slot_rows:
        x_rows = (x[rows] if isinstance(rows, slice) else x.index_select(0, rows)).float()
        for i, (a_pool, b_pool, offset) in enumerate(zip(a_pools, b_pools, slice_offsets)):
            rank = ranks[i][slot]
            if rank == 0:
                continue
            v = x_rows @ a_pool[slot, :rank].float().T
            delta = (v @ b_pool[slot, :, :rank].float().T).mul_(scales[i][slot])
            add_rounded_once(y[:, offset : offset + b_pool.shape[1]], rows, delta)
