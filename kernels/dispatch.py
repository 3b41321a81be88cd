"""The ops the engine calls: one function per op, Triton on CUDA tensors, the CPU path otherwise.

Segmented LoRA (Punica SGMV semantics). Shapes:
    T          tokens of the step (one flat, ragged batch)
    G          segments (consecutive tokens sharing an adapter slot); may be a fixed capacity
    S          adapter slots in the pool;  R_max  the pool's padded rank
    n_slices   projections fused in one call (q/k/v, gate/up), slice i is N_i wide
    K          input features;  N_total  output features of the fused projection

    x               [T, K]                 activations (dtype = pool dtype)
    a_pools         n_slices x [S, R_max, K]    PEFT lora_A.weight per slot; rows >= rank never read
    b_pools         n_slices x [S, N_i, R_max]  PEFT lora_B.weight per slot; cols >= rank never read
    segment_starts  int32 [G + 1]          token offsets (see lora_meta)
    segment_slots   int32 [G]              slot per segment, -1 = no adapter
    slot_ranks      int32 [n_slices, S]    rank of each slot on each slice; 0 = no LoRA there
    slot_scales     float32 [n_slices, S]  lora_alpha / r (or / sqrt(r) for rsLoRA)
    v               float32 [n_slices, T, R_max]   shrink output / expand input; only
                                           [i, t, :rank] of tokens with an adapter is defined
    y               [T, N_total]           base output, updated in place by expand
    slice_offsets   n_slices ints          column of y where slice i starts

Quantized linear: `prepare_quant_linear` / `quant_matmul` (re-exported from quant_linear).
Dense bf16 on the CPU: `PackedDenseWeight` (re-exported from dense_cpu), the weight packed
once for oneDNN.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .dense_cpu import PackedDenseWeight, packing_supported  # noqa: F401  (re-exported)
from .lora_cpu import NATIVE_MAX_GROUP_TOKENS, HostSegments, host_segments, lora_apply_cpu
from .lora_cpu_plan import build_cpu_plan, lora_expand_cpu, lora_shrink_cpu
from .lora_compact_cpu import CompactLoraPools, build_compact_pools, update_compact_slots  # noqa: F401  (re-exported)
from .lora_meta import LoraArgumentError, check_pools, check_segment_values, check_segments
from .lora_native import (  # noqa: F401  (re-exported)
    HalfPools,
    NativeLoraPools,
    native_half_copies_worth_it,
    native_lora_available,
    native_pools_fit,
)
from .quant_linear import (  # noqa: F401  (re-exported: the engine imports ops from here)
    PreparedQuantLinear,
    QuantLinearWeights,
    fuse_quant_slices,
    prepare_quant_linear,
    quant_matmul,
)


def _check_common(
    x_like: Tensor, num_tokens: int, segment_starts: Tensor, segment_slots: Tensor,
    slot_ranks: Tensor, n_slices: int, num_slots: int,
) -> None:
    check_segments(segment_starts, segment_slots, num_tokens)
    if slot_ranks.dtype != torch.int32 or slot_ranks.shape != (n_slices, num_slots):
        raise LoraArgumentError(
            f"slot_ranks must be int32 [{n_slices}, {num_slots}], got {slot_ranks.dtype} {tuple(slot_ranks.shape)}"
        )
    for name, t in (("segment_starts", segment_starts), ("segment_slots", segment_slots), ("slot_ranks", slot_ranks)):
        if t.device != x_like.device:
            raise LoraArgumentError(f"{name} is on {t.device}, activations on {x_like.device}")


def _check_cpu_values(
    segment_starts: Tensor, segment_slots: Tensor, slot_ranks: Tensor,
    num_tokens: int, num_slots: int, r_max: int,
) -> None:
    # Value checks need the data on the host: done on the CPU path only (no GPU sync).
    check_segment_values(segment_starts, segment_slots, num_tokens, num_slots)
    _check_rank_values(slot_ranks, r_max)


def _check_rank_values(slot_ranks: Tensor, r_max: int) -> None:
    # A rank outside [0, R_max] is no error to a slice: -1 served rank R_max - 1, 1000 rank R_max.
    if slot_ranks.numel():
        low, high = torch.aminmax(slot_ranks)
        if int(low) < 0 or int(high) > r_max:
            raise LoraArgumentError(f"slot_ranks must lie in [0, R_max={r_max}]")


def _check_floating(**tensors: Tensor) -> None:
    # An integer x, pools and y ran, with every product and the scale truncated (0.3 -> 0),
    # as quant_matmul refuses them. The pools must share x's / y's dtype (check_pools).
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise LoraArgumentError(f"{name} must be floating-point, got {tensor.dtype}")


def _check_slices_fit(y: Tensor, b_pools: Sequence[Tensor], slice_offsets: Sequence[int]) -> None:
    for i, (pool, offset) in enumerate(zip(b_pools, slice_offsets)):
        if offset < 0 or offset + pool.shape[1] > y.shape[1]:
            raise LoraArgumentError(
                f"slice {i} (columns {offset}..{offset + pool.shape[1]}) does not fit y with {y.shape[1]} columns"
            )


def lora_shrink(
    x: Tensor,
    a_pools: Sequence[Tensor],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """v[i, t, :r] = x[t] @ a_pools[i][s, :r, :].T for tokens t of segments with slot s, r = slot_ranks[i, s].

    Returns float32 [n_slices, T, R_max] (written into `out` when given: a static buffer
    for CUDA graphs). Entries outside [:, t, :rank] of tokens with an adapter are undefined."""
    if x.dim() != 2:
        raise LoraArgumentError(f"x must be [T, K], got shape {tuple(x.shape)}")
    _check_floating(x=x)
    num_slots, r_max = check_pools(a_pools, "a_pools", x.dtype, x.device)
    if any(pool.shape[2] != x.shape[1] for pool in a_pools):
        raise LoraArgumentError(f"a_pools must be [S, R_max, K={x.shape[1]}]")
    _check_common(x, x.shape[0], segment_starts, segment_slots, slot_ranks, len(a_pools), num_slots)
    shape = (len(a_pools), x.shape[0], r_max)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out.shape != shape or out.dtype != torch.float32 or out.device != x.device:
        raise LoraArgumentError(f"out must be float32 {shape} on {x.device}")
    if x.is_cuda:
        from .lora_triton import sgmv_shrink

        return sgmv_shrink(x, a_pools, segment_starts, segment_slots, slot_ranks, out)
    _check_cpu_values(segment_starts, segment_slots, slot_ranks, x.shape[0], num_slots, r_max)
    plan = build_cpu_plan(segment_starts, segment_slots, slot_ranks)
    return lora_shrink_cpu(x, a_pools, plan, out)


def lora_expand(
    y: Tensor,
    v: Tensor,
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
    slot_scales: Tensor,
) -> None:
    """y[t, off_i:off_i+N_i] += slot_scales[i, s] * v[i, t, :r] @ b_pools[i][s, :, :r].T, in place,
    for tokens t of segments with slot s and r = slot_ranks[i, s] > 0."""
    if y.dim() != 2:
        raise LoraArgumentError(f"y must be [T, N_total], got shape {tuple(y.shape)}")
    _check_floating(y=y)
    num_slots, r_max = check_pools(b_pools, "b_pools", y.dtype, y.device)
    n_slices = len(b_pools)
    if len(slice_offsets) != n_slices:
        raise LoraArgumentError(f"{len(slice_offsets)} slice_offsets for {n_slices} b_pools")
    _check_slices_fit(y, b_pools, slice_offsets)
    if v.shape != (n_slices, y.shape[0], r_max) or v.device != y.device or v.dtype != torch.float32:
        raise LoraArgumentError(f"v must be float32 [{n_slices}, {y.shape[0]}, {r_max}] on {y.device}, "
                                f"got {v.dtype} {tuple(v.shape)}")
    if (slot_scales.shape != (n_slices, num_slots) or slot_scales.device != y.device
            or not slot_scales.is_floating_point()):
        raise LoraArgumentError(f"slot_scales must be floating-point [{n_slices}, {num_slots}] on {y.device}")
    _check_common(y, y.shape[0], segment_starts, segment_slots, slot_ranks, n_slices, num_slots)
    if y.is_cuda:
        from .lora_triton import sgmv_expand

        sgmv_expand(y, v, b_pools, slice_offsets, segment_starts, segment_slots, slot_ranks, slot_scales)
        return
    _check_cpu_values(segment_starts, segment_slots, slot_ranks, y.shape[0], num_slots, r_max)
    plan = build_cpu_plan(segment_starts, segment_slots, slot_ranks)
    lora_expand_cpu(y, v, b_pools, slice_offsets, plan, slot_scales)


def lora_host_segments(segment_starts: Tensor, segment_slots: Tensor, num_tokens: int, num_slots: int,
                       row_invariant: bool = False) -> HostSegments:
    """Validate a step's segments once and group them by slot for the CPU path of `lora_apply`.
    `row_invariant`: every row through the native kernel where it serves (no adapter's many
    rows take the matmul route): a row's result then never depends on the other rows."""
    check_segments(segment_starts, segment_slots, num_tokens)
    check_segment_values(segment_starts, segment_slots, num_tokens, num_slots)
    return host_segments(segment_starts, segment_slots, segment_starts.device,
                         native_group_limit=None if row_invariant else NATIVE_MAX_GROUP_TOKENS)


def lora_apply(
    y: Tensor,
    x: Tensor,
    a_pools: Sequence[Tensor],
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
    slot_scales: Tensor,
    v_buffer: Tensor | None = None,
    segments: HostSegments | None = None,
    stacked_a: Tensor | None = None,
    compact: CompactLoraPools | Callable[[], CompactLoraPools] | None = None,
    native: NativeLoraPools | None = None,
) -> None:
    """y += LoRA(x) for a (possibly fused) projection: shrink then expand.

    On the CPU the two halves run fused per adapter (`lora_apply_cpu`): no [n_slices, T,
    R_max] intermediate and far fewer small ops. Optional CPU helpers:
        segments   `lora_host_segments(...)` of this step, built once and shared by every
                   projection (the per-call metadata checks are then skipped)
        stacked_a  [S, n_slices * R_max, K] whose [:, i*R_max:(i+1)*R_max] is a_pools[i]:
                   lets decode tokens shrink every slice in one matmul
        compact    `build_compact_pools(...)` of these pools as loaded now, or a function
                   returning it (called only where the masked route runs): the masked
                   route then reads the slots' real ranks, not the padded pools
        native     `NativeLoraPools(stacked_a, b_pools, ...)` of these pools, bound once: with
                   `segments`, the pools are not checked again (they were when it was bound)
    `v_buffer` is for the CUDA-graph path."""
    _check_floating(x=x, y=y)
    if not x.is_cuda and v_buffer is None and native is not None and segments is not None:
        if segments.num_tokens != x.shape[0]:
            raise LoraArgumentError(f"segments cover {segments.num_tokens} tokens, x has {x.shape[0]}")
        lora_apply_cpu(y, x, a_pools, b_pools, slice_offsets, segments, slot_ranks, slot_scales, stacked_a, compact,
                       native)
        return
    if not x.is_cuda and v_buffer is None:
        num_slots, r_max = check_pools(a_pools, "a_pools", x.dtype, x.device)
        check_pools(b_pools, "b_pools", y.dtype, y.device)
        if len(b_pools) != len(a_pools) or len(slice_offsets) != len(a_pools):
            raise LoraArgumentError("a_pools, b_pools and slice_offsets must have one entry per slice")
        if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0] or any(
                pool.shape[2] != x.shape[1] for pool in a_pools):
            raise LoraArgumentError(f"x must be [T, K] and y [T, N_total] with the pools' K, got x {tuple(x.shape)}, "
                                    f"y {tuple(y.shape)}")
        _check_slices_fit(y, b_pools, slice_offsets)
        if slot_ranks.dtype != torch.int32 or slot_ranks.shape != (len(a_pools), num_slots):
            raise LoraArgumentError(f"slot_ranks must be int32 [{len(a_pools)}, {num_slots}]")
        if slot_scales.shape != (len(a_pools), num_slots) or not slot_scales.is_floating_point():
            raise LoraArgumentError(f"slot_scales must be floating-point [{len(a_pools)}, {num_slots}], "
                                    f"got {slot_scales.dtype} {tuple(slot_scales.shape)}")
        if stacked_a is not None:
            _check_stacked(stacked_a, a_pools)
        if segments is None:
            _check_common(x, x.shape[0], segment_starts, segment_slots, slot_ranks, len(a_pools), num_slots)
            _check_cpu_values(segment_starts, segment_slots, slot_ranks, x.shape[0], num_slots, r_max)
            segments = host_segments(segment_starts, segment_slots, x.device)
        elif segments.num_tokens != x.shape[0]:
            raise LoraArgumentError(f"segments cover {segments.num_tokens} tokens, x has {x.shape[0]}")
        else:  # the segments were checked when built; the ranks are this call's
            _check_rank_values(slot_ranks, r_max)
        lora_apply_cpu(y, x, a_pools, b_pools, slice_offsets, segments, slot_ranks, slot_scales, stacked_a, compact)
        return
    v = lora_shrink(x, a_pools, segment_starts, segment_slots, slot_ranks, out=v_buffer)
    lora_expand(y, v, b_pools, slice_offsets, segment_starts, segment_slots, slot_ranks, slot_scales)


def _check_stacked(stacked_a: Tensor, a_pools: Sequence[Tensor]) -> None:
    num_slots, r_max, k = a_pools[0].shape
    if stacked_a.shape != (num_slots, len(a_pools) * r_max, k) or not stacked_a.is_contiguous():
        raise LoraArgumentError(
            f"stacked_a must be a contiguous [{num_slots}, {len(a_pools) * r_max}, {k}], got {tuple(stacked_a.shape)}"
        )
    slice_bytes = r_max * k * stacked_a.element_size()
    for i, pool in enumerate(a_pools):
        if pool.data_ptr() != stacked_a.data_ptr() + i * slice_bytes or pool.stride() != stacked_a.stride():
            raise LoraArgumentError(f"a_pools[{i}] is not the view stacked_a[:, {i * r_max}:{(i + 1) * r_max}]")
