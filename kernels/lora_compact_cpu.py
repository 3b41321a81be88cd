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

That multiply-by-0 is exact only while every copied weight is finite (0 x NaN = NaN: one
slot's NaN would reach every token's row). The engine refuses non-finite adapters at load,
so its pools always take it; pools holding a NaN or inf (`CompactLoraPools.finite`, known
at the copy) take the safe form instead: other slots' entries of v selected away
(`masked_fill_`) and one `addmm_` per run of columns whose slots have tokens in the step,
so an unused slot's B is never read either.

Column layout (slice-major, so each slice's columns are one contiguous range):
    for slice i, for each slot s with rank r_is > 0 (in slot order): r_is columns
    a_rows      [C, K]       row c = A_i[s][j] of its (slice i, slot s, rank index j)
    b_rows[i]   [C_i, N_i]   row c - start_i = B_i[s][:, j]
    col_slot    int64 [C]    the slot owning each column
    col_scale   [C]          that slot's scale for slice i, in the pools' dtype

Exact up to float summation order; the copies cost the adapters' real bytes once more.

A full rebuild copies every loaded slot (~100 ms for SmolLM2-135M's 120 projections on the
2-core Xeon VM, most of what a slot load used to cost the next step). `update_compact_slots` rewrites
only the slots just loaded, in place, when each fits the columns its slot already has:
a slot's columns for slice i then number its capacity c_is >= r_is, the columns past the
rank are zero (and add nothing), and the layout key says (slot, c_is, scale). A load that
needs more columns than its slot has, or leaves more than a quarter of all columns as
padding, rebuilds in full at the real ranks.
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
    layout: tuple  # ((slot, columns, scale) per slot with columns) per slice: keys the keep masks
    finite: bool = True  # every copied weight finite: the plain multiply-by-0 route is exact

    @property
    def num_columns(self) -> int:
        return self.a_rows.shape[0]


def build_compact_pools(
    stacked_a: Tensor, b_pools: Sequence[Tensor], slot_ranks: Tensor, slot_scales: Tensor, cache_layout: bool = True
) -> CompactLoraPools:
    """Copy every slot's real-rank rows into the compact layout above: one `index_select`
    per half and slice (a slot load costs each projection these few copies, not a Python
    loop over slots).

    stacked_a    [S, n_slices * R_max, K]: slice i of slot s is rows [i * R_max, (i + 1) * R_max)
    b_pools[i]   [S, N_i, R_max], best a view of contiguous [S, R_max, N_i] storage (the engine's:
                 then the copy reads only the real-rank rows; other layouts are gathered
                 element-wise, still only at the real ranks)
    slot_ranks   int32 [n_slices, S];  slot_scales [n_slices, S]
    cache_layout: keep the layout for later builds (the engine's few layouts; a per-step
                 subset of slots would push them out)
    """
    num_slots, stacked_rows, in_features = stacked_a.shape
    n_slices = len(b_pools)
    r_max = stacked_rows // n_slices
    ranks, scales = tuple(map(tuple, slot_ranks.tolist())), tuple(map(tuple, slot_scales.tolist()))
    layout = _layout(ranks, scales, r_max, stacked_a.device, cache_layout)
    a_rows = stacked_a.reshape(-1, in_features).index_select(0, layout.a_row_index)
    b_rows = tuple(_b_rows(b_pool, rows, r_max) for b_pool, rows in zip(b_pools, layout.b_row_index))
    return CompactLoraPools(
        a_rows=a_rows,
        b_rows=b_rows,
        slice_columns=layout.slice_columns,
        col_slot=layout.col_slot,
        col_scale=layout.col_scale.to(stacked_a.dtype),
        layout=layout.key,
        finite=_all_finite(a_rows, *b_rows),
    )


def _all_finite(*tensors: Tensor) -> bool:
    # A sum is finite only if every term is (a NaN or inf keeps it NaN or inf); a finite sum
    # that overflows reads as not finite, which only picks the safe form. One reduction a
    # tensor, at every projection's rebuild on a slot load: with `isfinite(t).all()` a build
    # took 1,016 us, with the sum 197 us (8 slots of rank 8-64, K = 576, 2 threads).
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors if t.numel())


def _b_rows(b_pool: Tensor, rows: Tensor, r_max: int) -> Tensor:
    """Rows `rows` of the pool seen as [S * R_max, N_i]: one index_select where that is a view
    (the engine's storage), else an element gather; never a copy of the whole pool (which
    would also read its padding)."""
    storage = b_pool.transpose(1, 2)  # [S, R_max, N_i]
    if storage.is_contiguous():
        return storage.reshape(-1, b_pool.shape[1]).index_select(0, rows)
    return storage[rows // r_max, rows % r_max]


MAX_PADDING_SHARE = 0.25  # an in-place update leaving more padding than this rebuilds in full


def update_compact_slots(
    compact: CompactLoraPools, stacked_a: Tensor, b_pools: Sequence[Tensor], slot_ranks: Tensor, slot_scales: Tensor,
    slots: set[int],
) -> CompactLoraPools | None:
    """`compact` with `slots` rewritten in place from the pools (shapes as `build_compact_pools`),
    or None where a full rebuild is needed: a slot's new rank exceeds its columns, or the
    padding would pass MAX_PADDING_SHARE of the columns. Other slots' columns are not touched."""
    ranks, scales = slot_ranks.tolist(), slot_scales.tolist()
    r_max = stacked_a.shape[1] // len(b_pools)
    columns: list[dict[int, tuple[int, int]]] = []  # per slice: slot -> (first column, columns)
    padding = 0
    for i, entries in enumerate(compact.layout):
        offset, owned = compact.slice_columns[i][0], {}
        for slot, width, _ in entries:
            owned[slot] = (offset, width)
            offset += width
            padding += width - ranks[i][slot]
        columns.append(owned)
        if any(ranks[i][slot] > owned.get(slot, (0, 0))[1] for slot in slots):
            return None
    if padding > MAX_PADDING_SHARE * compact.num_columns:
        return None
    col_scale = compact.col_scale.clone()  # a fresh layout's scales may be shared with other projections
    finite = compact.finite  # conservative: a rewrite of the one non-finite slot keeps it False
    for i, b_pool in enumerate(b_pools):
        b_storage = b_pool.transpose(1, 2)  # [S, R_max, N_i]: the engine's contiguous storage
        start = compact.slice_columns[i][0]
        for slot in slots:
            if slot not in columns[i]:
                continue  # no columns, and rank 0 (checked above): nothing to write
            first, width = columns[i][slot]
            rank = ranks[i][slot]
            a_columns, b_columns = compact.a_rows[first : first + width], compact.b_rows[i][first - start : first - start + width]
            a_columns[:rank].copy_(stacked_a[slot, i * r_max : i * r_max + rank])
            b_columns[:rank].copy_(b_storage[slot, :rank])
            a_columns[rank:].zero_()  # the pools' rows past the rank are never read (tests poison them)
            b_columns[rank:].zero_()
            finite = finite and _all_finite(a_columns[:rank], b_columns[:rank])
            col_scale[first : first + width] = scales[i][slot]
    layout = tuple(tuple((slot, width, scales[i][slot] if slot in slots else scale) for slot, width, scale in entries)
                   for i, entries in enumerate(compact.layout))
    return CompactLoraPools(a_rows=compact.a_rows, b_rows=compact.b_rows, slice_columns=compact.slice_columns,
                            col_slot=compact.col_slot, col_scale=col_scale, layout=layout, finite=finite)


@dataclass(frozen=True)
class _Layout:
    key: tuple
    a_row_index: Tensor  # int64 [C]: row of stacked_a.reshape(-1, K) for each column
    b_row_index: tuple[Tensor, ...]  # per slice int64 [C_i]: row of the [S * R_max, N_i] B storage
    slice_columns: tuple[tuple[int, int], ...]
    col_slot: Tensor
    col_scale: Tensor  # float32


_LAYOUTS: dict[tuple, _Layout] = {}
_MAX_LAYOUTS = 64  # the projections of a model share a handful of (ranks, scales) layouts


def _layout(ranks: tuple, scales: tuple, r_max: int, device: torch.device, cache: bool = True) -> _Layout:
    """Which stored rows make up the compact matrices, cached by (ranks, scales) if `cache`."""
    cache_key = (ranks, scales, r_max, str(device))
    layout = _LAYOUTS.get(cache_key)
    if layout is not None:
        return layout
    n_slices = len(ranks)
    a_rows: list[int] = []
    b_rows: list[Tensor] = []
    slice_columns: list[tuple[int, int]] = []
    col_slot: list[int] = []
    col_scale: list[float] = []
    key: list[tuple] = []
    for i, slice_ranks in enumerate(ranks):
        start = len(col_slot)
        loaded = [(slot, rank, scales[i][slot]) for slot, rank in enumerate(slice_ranks) if rank > 0]
        b_index: list[int] = []
        for slot, rank, scale in loaded:
            a_rows += range((slot * n_slices + i) * r_max, (slot * n_slices + i) * r_max + rank)
            b_index += range(slot * r_max, slot * r_max + rank)
            col_slot += [slot] * rank
            col_scale += [scale] * rank
        b_rows.append(torch.tensor(b_index, dtype=torch.int64, device=device))
        slice_columns.append((start, len(col_slot)))
        key.append(tuple(loaded))
    layout = _Layout(
        key=tuple(key),
        a_row_index=torch.tensor(a_rows, dtype=torch.int64, device=device),
        b_row_index=tuple(b_rows),
        slice_columns=tuple(slice_columns),
        col_slot=torch.tensor(col_slot, dtype=torch.int64, device=device),
        col_scale=torch.tensor(col_scale, dtype=torch.float32, device=device),
    )
    if cache:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[cache_key] = layout
    return layout


def lora_apply_compact(
    y: Tensor, x: Tensor, compact: CompactLoraPools, slice_offsets: Sequence[int], segments: HostSegments
) -> None:
    """y[t, slice i] += scale * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T for every token t with
    an adapter (slot s): the masked route on the compact pools. x [T, K], y [T, sum N_i].

    Finite pools (the engine's): v times the keep mask, one `addmm_` per slice. Pools with a
    NaN or inf somewhere: other slots' entries of v are *selected* away (`masked_fill_`; 0 x
    NaN/inf is NaN, which would turn every token's row NaN) and the expand reads only the
    columns of slots with tokens in this step (one `addmm_` per run of consecutive such
    slots: v's zero for an unused slot times a NaN in its B would be NaN too). The safe form
    costs ~10 % on a decode step, which is why it is not the engine's."""
    if compact.num_columns == 0:
        return
    v = x @ compact.a_rows.T
    v.mul_(_keep_mask(compact, segments, x.dtype))
    if compact.finite:
        for (start, stop), b_rows, offset in zip(compact.slice_columns, compact.b_rows, slice_offsets):
            if stop > start:
                y[:, offset : offset + b_rows.shape[1]].addmm_(v[:, start:stop], b_rows)
        return
    v.masked_fill_(_drop_mask(compact, segments), 0.0)
    for (start, _), b_rows, offset, runs in zip(compact.slice_columns, compact.b_rows, slice_offsets,
                                                 _active_runs(compact, segments)):
        for first, stop in runs:
            y[:, offset : offset + b_rows.shape[1]].addmm_(v[:, first:stop], b_rows[first - start : stop - start])


def _keep_mask(compact: CompactLoraPools, segments: HostSegments, dtype: torch.dtype) -> Tensor:
    """[T, C]: each column's scale where the token's slot owns the column, else 0. Most
    projections of a model share a layout, so the step's segments cache it per layout."""
    return segments.cached_mask(("compact", compact.layout, dtype), lambda token_slots: (
        token_slots[:, None] == compact.col_slot[None, :]).to(dtype) * compact.col_scale.to(dtype)[None, :])


def _drop_mask(compact: CompactLoraPools, segments: HostSegments) -> Tensor:
    """[T, C] bool, True where the token's slot does not own the column (the safe form only:
    finite pools, the engine's, never build it; cached per step and layout)."""
    return segments.cached_mask(("compact-drop", compact.layout),
                                lambda token_slots: token_slots[:, None] != compact.col_slot[None, :])


def _active_runs(compact: CompactLoraPools, segments: HostSegments) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per slice, the [first, stop) column ranges of consecutive slots with tokens in this
    step (cached per step and layout): the only B rows the expand may read."""
    def build(_: Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
        active = {slot for slot, _ in segments.slot_rows}
        per_slice = []
        for (start, _), entries in zip(compact.slice_columns, compact.layout):
            runs: list[list[int]] = []
            column = start
            for slot, width, _ in entries:
                if slot in active and width:
                    if runs and runs[-1][1] == column:
                        runs[-1][1] = column + width
                    else:
                        runs.append([column, column + width])
                column += width
            per_slice.append(tuple((first, stop) for first, stop in runs))
        return tuple(per_slice)
    return segments.cached_mask(("compact-runs", compact.layout), build)


def compact_step_pools(
    stacked_a: Tensor, b_pools: Sequence[Tensor], slot_ranks: Tensor, slot_scales: Tensor, segments: HostSegments
) -> CompactLoraPools:
    """`build_compact_pools` of just the slots with tokens in this step, at their real ranks:
    the masked route for callers that pass no `compact` (lora_cpu.py). Copying the step's
    real-rank rows is what keeps that route from reading the pools' padding (which the
    contract leaves undefined: NaN there must not reach y) or slots the step does not use."""
    active = torch.zeros(slot_ranks.shape[1], dtype=torch.bool)
    active[[slot for slot, _ in segments.slot_rows]] = True
    ranks = torch.where(active[None, :], slot_ranks.cpu(), 0).to(torch.int32)
    return build_compact_pools(stacked_a, b_pools, ranks, slot_scales, cache_layout=False)


def active_column_share(compact: CompactLoraPools, segments: HostSegments) -> float:
    """The share of the compact columns that belong to slots with tokens in this step (cached
    per step and layout): the masked route reads and multiplies all of them regardless."""
    def share(_: Tensor) -> float:
        active = {slot for slot, _ in segments.slot_rows}
        owned = sum(width for entries in compact.layout for slot, width, _ in entries if slot in active)
        return owned / max(compact.num_columns, 1)
    return segments.cached_mask(("compact-share", compact.layout), share)
