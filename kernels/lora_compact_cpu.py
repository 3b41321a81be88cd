"""The CPU's masked LoRA route over the slots' REAL ranks: the pools compacted once per load.

The masked route (lora_cpu.py) multiplies every decode token against every slot's whole
pool, padded to the pool's max rank, because that costs 3 + n_slices ops per projection
whatever the number of adapters. A decode step is bound by memory traffic, and with
adapters of mixed ranks the padding dominates it: 8 slots at R_max = 64 for adapters of
rank 8-64 (mean 22) read 2.9x the bytes the adapters hold, more than the base projection
itself (SmolLM2-135M, float32: 142 ms of LoRA against 91 ms of base in a 16-sequence
decode step). So after a slot changes, each projection copies its loaded slots' real-rank
rows into one compact matrix per half (`build_compact_pools`), and the masked route
multiplies those:

    v = (x @ A_compact.T) * keep         keep[t, c] = scale of column c if token t's slot
                                         owns column c, else 0          [T, C]
    y[:, slice i] += v[:, columns of slice i] @ B_compact_i             one addmm_ per slice

Column layout (slice-major, so each slice's columns are one contiguous range):
    for slice i, for each slot s with rank r_is > 0 (in slot order): r_is columns
    a_rows      [C, K]       row c = A_i[s][j] of its (slice i, slot s, rank index j)
    b_rows[i]   [C_i, N_i]   row c - start_i = B_i[s][:, j]
    col_slot    int64 [C]    the slot owning each column
    col_scale   [C]          that slot's scale for slice i, in the pools' dtype

Exact up to float summation order; the copies cost the adapters' real bytes once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # lora_cpu routes to this module; the segments type is all it needs back
    from .lora_cpu import HostSegments


@dataclass(frozen=True)
class CompactLoraPools:
    a_rows: Tensor  # [C, K]
    b_rows: tuple[Tensor, ...]  # per slice [C_i, N_i]
    slice_columns: tuple[tuple[int, int], ...]  # per slice [start, stop) of its columns
    col_slot: Tensor  # int64 [C]
    col_scale: Tensor  # [C] in the pools' dtype
    layout: tuple  # ((slot, rank, scale) per loaded slot) per slice: keys the keep masks

    @property
    def num_columns(self) -> int:
        return self.a_rows.shape[0]


def build_compact_pools(
    a_pools: Sequence[Tensor], b_pools: Sequence[Tensor], slot_ranks: Tensor, slot_scales: Tensor
) -> CompactLoraPools:
    """Copy every slot's real-rank rows (a_pools[i] [S, R_max, K], b_pools[i] [S, N_i, R_max],
    slot_ranks int32 / slot_scales [n_slices, S]) into the compact layout above."""
    ranks, scales = slot_ranks.tolist(), slot_scales.tolist()
    dtype, device = a_pools[0].dtype, a_pools[0].device
    a_parts: list[Tensor] = []
    b_rows: list[Tensor] = []
    slice_columns: list[tuple[int, int]] = []
    col_slot: list[int] = []
    col_scale: list[float] = []
    layout: list[tuple] = []
    for i, (a_pool, b_pool) in enumerate(zip(a_pools, b_pools)):
        start = len(col_slot)
        loaded = [(slot, rank, scales[i][slot]) for slot, rank in enumerate(ranks[i]) if rank > 0]
        b_parts = []
        for slot, rank, scale in loaded:
            a_parts.append(a_pool[slot, :rank])
            b_parts.append(b_pool[slot, :, :rank].T)
            col_slot += [slot] * rank
            col_scale += [scale] * rank
        b_rows.append(torch.cat(b_parts) if b_parts else b_pool.new_zeros(0, b_pool.shape[1]))
        slice_columns.append((start, len(col_slot)))
        layout.append(tuple(loaded))
    in_features = a_pools[0].shape[2]
    return CompactLoraPools(
        a_rows=torch.cat(a_parts) if a_parts else torch.zeros(0, in_features, dtype=dtype, device=device),
        b_rows=tuple(b_rows),
        slice_columns=tuple(slice_columns),
        col_slot=torch.tensor(col_slot, dtype=torch.int64, device=device),
        col_scale=torch.tensor(col_scale, dtype=dtype, device=device),
        layout=tuple(layout),
    )


def lora_apply_compact(
    y: Tensor, x: Tensor, compact: CompactLoraPools, slice_offsets: Sequence[int], segments: HostSegments
) -> None:
    """y[t, slice i] += scale * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T for every token t with
    an adapter (slot s): the masked route on the compact pools. x [T, K], y [T, sum N_i]."""
    if compact.num_columns == 0:
        return
    v = x @ compact.a_rows.T
    v.mul_(_keep_mask(compact, segments, x.dtype))
    for (start, stop), b_rows, offset in zip(compact.slice_columns, compact.b_rows, slice_offsets):
        if stop > start:
            y[:, offset : offset + b_rows.shape[1]].addmm_(v[:, start:stop], b_rows)


def _keep_mask(compact: CompactLoraPools, segments: HostSegments, dtype: torch.dtype) -> Tensor:
    """[T, C]: each column's scale where the token's slot owns the column, else 0. Most
    projections of a model share a layout, so the step's segments cache it per layout."""
    key = ("compact", compact.layout, dtype)
    keep = segments._one_hot.get(key)
    if keep is None:
        owns = segments.token_slots[:, None] == compact.col_slot[None, :]
        keep = owns.to(dtype) * compact.col_scale.to(dtype)[None, :]
        segments._one_hot[key] = keep
    return keep
