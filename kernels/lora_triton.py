"""Triton SGMV kernels: segmented LoRA shrink and expand (Punica semantics), CUDA path.

Shapes (T tokens, G segments or segment capacity, S slots, R_max pool rank, n_slices):
    x               [T, K]                     activations, fp16/bf16 (fp32 in CPU-interpreter tests)
    a_pools[i]      [S, R_max, K]              PEFT lora_A.weight of every slot, slice i
    b_pools[i]      [S, N_i, R_max]            PEFT lora_B.weight of every slot, slice i
    v               float32 [n_slices, T, R_max]   shrink output, expand input
    y               [T, N_total]               updated in place by expand; slice i at column offset_i
    segment_starts  int32 [G + 1];  segment_slots int32 [G] (-1: no adapter)
    slot_ranks      int32 [n_slices, S] (0: no LoRA on slice i);  slot_scales float32 [n_slices, S]

Grid: (token blocks, rank blocks x K splits | column blocks, n_slices). Axis 0 walks the
non-empty BLOCK_M-token blocks of all segments in order (each program finds its segment
with an in-register prefix sum over segment_starts), so a decode batch of T length-1
segments launches ~T programs, not T x ceil(T / BLOCK_M). A program exits at once when its
segment has no adapter or its rank block lies past the slot's rank: every adapter is
computed at its own rank (heterogeneous ranks in one launch), padded ranks are never
loaded (masked loads) and cost no tiles beyond the 16-wide granularity of tl.dot. The grid
depends only on T, G, the pool shapes and n_slices -- never on segment lengths -- so a
launch can be captured in a CUDA graph with fixed-capacity metadata buffers (lora_meta).

Slices are passed as device tables of base pointers and strides, so q/k/v (or gate/up) run
in ONE launch. The tables are cached per pool set: build them (one eager call) before
capturing a CUDA graph.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}
# A model holds one pool set per LoRA half of each fused projection (8 a layer: 256 for a
# 32-layer model), and every step reads them all. Building a table is a host-to-device copy,
# which a CUDA graph capture refuses and an eager step pays per projection: the cache must
# hold every pool set of the model; the bound only stops pools re-allocated without end.
# (Captured graphs keep references to the tables they read: clearing never frees those.)
_MAX_TABLES = 1 << 14


def _pool_tables(pools: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(int64 [n_slices] base pointers, int64 [n_slices, 3] strides), cached per pool set."""
    key = (device, tuple((p.data_ptr(), tuple(p.stride())) for p in pools))
    tables = _TABLES.get(key)
    if tables is None:
        pointers = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
        strides = torch.tensor([list(p.stride()) for p in pools], dtype=torch.int64, device=device)
        tables = (pointers, strides)
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        _TABLES[key] = tables
    return tables


@triton.jit
def _locate_token_block(starts_ptr, num_segments, block_id, BLOCK_M: tl.constexpr, MAX_SEGMENTS: tl.constexpr):
    """The `block_id`-th non-empty BLOCK_M-token block of the batch, counted over all segments
    in order: (segment, first token of the block, end of the segment). segment >= num_segments
    when block_id is past the last block. Every program recomputes the block prefix sum of
    its own (<= MAX_SEGMENTS values, in registers): no extra launch, graph-capturable."""
    idx = tl.arange(0, MAX_SEGMENTS)
    valid = idx < num_segments
    seg_start = tl.load(starts_ptr + idx, mask=valid, other=0)
    seg_end = tl.load(starts_ptr + idx + 1, mask=valid, other=0)
    blocks = tl.where(valid, (seg_end - seg_start + BLOCK_M - 1) // BLOCK_M, 0)
    block_end = tl.cumsum(blocks, axis=0)
    segment = tl.sum((block_end <= block_id).to(tl.int32), axis=0)
    mine = idx == segment
    start = tl.sum(tl.where(mine, seg_start, 0), axis=0)
    end = tl.sum(tl.where(mine, seg_end, 0), axis=0)
    first_block = tl.sum(tl.where(mine, block_end - blocks, 0), axis=0)
    return segment, start + (block_id - first_block) * BLOCK_M, end


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_pointer_table, a_stride_table, v_ptr,
    starts_ptr, slots_ptr, ranks_ptr,
    num_segments, num_slots, K, k_per_split,
    stride_xt, stride_xk, stride_vi, stride_vt, stride_vr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, MAX_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    segment, m_start, seg_end = _locate_token_block(starts_ptr, num_segments, tl.program_id(0), BLOCK_M, MAX_SEGMENTS)
    if segment >= num_segments:
        return
    pid = tl.program_id(1)
    slice_id = tl.program_id(2)
    pid_k = pid % SPLIT_K
    pid_r = pid // SPLIT_K
    slot = tl.load(slots_ptr + segment)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    r_start = pid_r * BLOCK_R
    if r_start >= rank:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_r = r_start + tl.arange(0, BLOCK_R)
    mask_m = offs_m < seg_end
    mask_r = offs_r < rank
    a_base = tl.load(a_pointer_table + slice_id).to(tl.pointer_type(x_ptr.dtype.element_ty))
    stride_as = tl.load(a_stride_table + slice_id * 3)
    stride_ar = tl.load(a_stride_table + slice_id * 3 + 1)
    stride_ak = tl.load(a_stride_table + slice_id * 3 + 2)
    a_base += slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x_tile = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xt + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        a_tile = tl.load(  # [BLOCK_K, BLOCK_R]: A[slot, r, k] read transposed
            a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_r[None, :] & mask_k[:, None], other=0.0,
        )
        acc += tl.dot(x_tile, a_tile, input_precision=DOT_PRECISION)
    v_ptrs = v_ptr + slice_id * stride_vi + offs_m[:, None].to(tl.int64) * stride_vt + offs_r[None, :] * stride_vr
    mask = mask_m[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(v_ptrs, acc, mask=mask)


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, v_ptr, b_pointer_table, b_stride_table, slice_width_ptr, slice_offset_ptr,
    starts_ptr, slots_ptr, ranks_ptr, scales_ptr,
    num_segments, num_slots,
    stride_yt, stride_yn, stride_vi, stride_vt, stride_vr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MAX_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, V_FLOAT32: tl.constexpr,
):
    segment, m_start, seg_end = _locate_token_block(starts_ptr, num_segments, tl.program_id(0), BLOCK_M, MAX_SEGMENTS)
    if segment >= num_segments:
        return
    pid_n = tl.program_id(1)
    slice_id = tl.program_id(2)
    slot = tl.load(slots_ptr + segment)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    width = tl.load(slice_width_ptr + slice_id)
    n_start = pid_n * BLOCK_N
    if (n_start >= width) | (rank == 0):
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_m = offs_m < seg_end
    mask_n = offs_n < width
    b_base = tl.load(b_pointer_table + slice_id).to(tl.pointer_type(y_ptr.dtype.element_ty))
    stride_bs = tl.load(b_stride_table + slice_id * 3)
    stride_bn = tl.load(b_stride_table + slice_id * 3 + 1)
    stride_br = tl.load(b_stride_table + slice_id * 3 + 2)
    b_base += slot.to(tl.int64) * stride_bs
    v_base = v_ptr + slice_id * stride_vi + offs_m[:, None].to(tl.int64) * stride_vt
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # the slot's own rank bounds the loop
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        v_tile = tl.load(v_base + offs_r[None, :] * stride_vr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b_tile = tl.load(  # [BLOCK_R, BLOCK_N]: B[slot, n, r] read transposed
            b_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :], other=0.0,
        )
        if V_FLOAT32:  # float16 pools: v (float32) may lie past 65504, and would turn inf
            acc += tl.dot(v_tile, b_tile.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(v_tile.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)
    scale = tl.load(scales_ptr + slice_id * num_slots + slot)
    column = tl.load(slice_offset_ptr + slice_id) + offs_n
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_yt + column[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc * scale).to(y_tile.dtype), mask=mask)


def max_token_blocks(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Upper bound of sum_g ceil(len_g / BLOCK_M) over any segmentation of T tokens into G
    segments: the grid's first axis (fixed for a CUDA graph with fixed T and G)."""
    return min(triton.cdiv(num_tokens, block_m) + num_segments, num_tokens)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _short_segments(num_tokens: int, num_segments: int) -> bool:
    """Segments of 16 tokens or fewer on average (decode batches): a 64-row token block
    would hold one segment's few rows and compute the rest as padding. On an H200 the
    expand of 256 one-token segments took 265 us with 64-row blocks, against 46 us for 64
    segments with 16-row blocks (bench/results/gpu_h200.md)."""
    return num_tokens <= 16 * max(1, num_segments)


def default_shrink_config(num_tokens: int, k: int, num_segments: int = 1) -> dict[str, int]:
    """Decode (small T): split K so enough programs stream the adapter weights; many short
    segments: 16-row blocks; prefill: 64-row blocks."""
    if num_tokens <= 128:
        return {"block_m": 16, "block_r": 16, "block_k": 128, "split_k": 4 if k >= 1024 else 1}
    if _short_segments(num_tokens, num_segments):
        return {"block_m": 16, "block_r": 16, "block_k": 128, "split_k": 1}
    return {"block_m": 64, "block_r": 16, "block_k": 64, "split_k": 1}


def default_expand_config(num_tokens: int, num_segments: int = 1) -> dict[str, int]:
    if num_tokens <= 128 or _short_segments(num_tokens, num_segments):
        return {"block_m": 16, "block_n": 64, "block_r": 16}
    return {"block_m": 64, "block_n": 64, "block_r": 16}


def sgmv_shrink(
    x: Tensor,
    a_pools: Sequence[Tensor],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
    out: Tensor,
    *,
    block_m: int | None = None,
    block_r: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """out[i, t, :r] = x[t] @ a_pools[i][slot, :r].T (out float32 [n_slices, T, R_max])."""
    num_tokens, k = x.shape
    n_slices = len(a_pools)
    num_slots, r_max = a_pools[0].shape[0], a_pools[0].shape[1]
    config = default_shrink_config(num_tokens, k, segment_slots.shape[0])
    block_m = block_m or config["block_m"]
    block_r = block_r or config["block_r"]
    block_k = block_k or config["block_k"]
    split_k = split_k or config["split_k"]
    num_segments = segment_slots.shape[0]
    if num_tokens == 0 or num_segments == 0:
        return out
    if split_k > 1:
        out.zero_()  # partial sums from the K splits are added atomically
    pointers, strides = _pool_tables(a_pools, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    grid = (max_token_blocks(num_tokens, num_segments, block_m), triton.cdiv(r_max, block_r) * split_k, n_slices)
    _sgmv_shrink_kernel[grid](
        x, pointers, strides, out,
        segment_starts, segment_slots, slot_ranks,
        num_segments, num_slots, k, k_per_split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k,
        MAX_SEGMENTS=max(16, triton.next_power_of_2(num_segments)), DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return out


_SLICE_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}  # one entry per fused projection shape: a handful


def _slice_tables(widths: tuple[int, ...], offsets: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    key = (device, widths, offsets)
    tables = _SLICE_TABLES.get(key)
    if tables is None:
        tables = (
            torch.tensor(widths, dtype=torch.int32, device=device),
            torch.tensor(offsets, dtype=torch.int32, device=device),
        )
        _SLICE_TABLES[key] = tables
    return tables


def sgmv_expand(
    y: Tensor,
    v: Tensor,
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
    slot_scales: Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_r: int | None = None,
    num_warps: int = 4,
) -> None:
    """y[t, off_i:off_i+N_i] += scale * v[i, t, :r] @ b_pools[i][slot, :, :r].T, in place."""
    num_tokens = y.shape[0]
    n_slices = len(b_pools)
    num_slots = b_pools[0].shape[0]
    config = default_expand_config(num_tokens, segment_slots.shape[0])
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    block_r = block_r or config["block_r"]
    num_segments = segment_slots.shape[0]
    if num_tokens == 0 or num_segments == 0:
        return
    widths = tuple(int(p.shape[1]) for p in b_pools)
    width_table, offset_table = _slice_tables(widths, tuple(int(o) for o in slice_offsets), y.device)
    pointers, strides = _pool_tables(b_pools, y.device)
    grid = (max_token_blocks(num_tokens, num_segments, block_m), triton.cdiv(max(widths), block_n), n_slices)
    _sgmv_expand_kernel[grid](
        y, v, pointers, strides, width_table, offset_table,
        segment_starts, segment_slots, slot_ranks, slot_scales,
        num_segments, num_slots,
        y.stride(0), y.stride(1), v.stride(0), v.stride(1), v.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        MAX_SEGMENTS=max(16, triton.next_power_of_2(num_segments)), DOT_PRECISION=_dot_precision(y.dtype),
        V_FLOAT32=y.dtype == torch.float16, num_warps=num_warps,
    )
