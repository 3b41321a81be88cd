"""Triton low-bit weight-only GEMM for GPTQ layers (CUDA path): dequantize in registers.

Shapes (M rows of activations, K in_features, N out_features, G groups, b stored bits):
    x           [M, K]                 fp16/bf16 activations (fp32 in CPU-interpreter tests)
    codes       int32 [K * b // 32, N] GPTQ packing along K (b = bits; b = 2 for 3-bit), in
                                        sorted-K order (act-order rows grouped by g_idx)
    high_bits   int32 [K // 32, N]     3-bit only: the codes' top bit, 1-bit plane
    scales      [G, N]  act dtype;  zeros [G, N] act dtype (true zero points)
    input_perm  int64 [K] or None      sorted-K position -> input column (act-order)
    out         [M, N]

    out[m, n] = sum_k x[m, perm[k]] * scales[k // gs, n] * (q[k, n] - zeros[k // gs, n])

Offline re-layout (prepare_triton_layout; the checkpoint on disk stays standard GPTQ):
  act-order rows are sorted by group once, so a K tile lies in one group and loads one
  row of scales/zeros; x's columns are gathered through `input_perm` inside the kernel.
  K tiles divide the group size (not necessarily K): where the groups do not tile K
  (K = 576, group 128), the largest tile dividing both is used (64); where none does, the
  last tile is masked.
  3-bit codes are split into a 2-bit plane and a 1-bit plane: still 3 bits per weight of
  memory traffic, but no value straddles a 32-bit word (GPTQ's 3-bit stream does).
Paths: M <= GEMV_MAX_M -> the GEMV kernel (one activation row a program, each packed word
loaded once and unpacked in registers, no tensor-core tile padded to 16 rows; split-K with
fp32 atomics so enough programs stream the weight); M <= 16 -> the tiled kernel's decode
config (BLOCK_M 16, split-K); larger M -> tiled GEMM; M >= dense_min_m (DENSE_MIN_M on
CUDA) -> dequantize the whole weight (Triton) and use cuBLAS.
The tile loaders (codes gathered or unpacked once, a group's scale and zero) are in
quant_triton_tiles.py. Tiled-kernel options (compile-time; config keys, both 0 in
default_gemm_config until a GPU measurement switches them; bench/gpu_gemm_configs.py times them):
    unpack_once  UNPACK_ONCE: a K tile's packed words are loaded once, [WORDS, BLOCK_N] (WORDS =
                 BLOCK_K // PER_WORD), unpacked by shifts into [WORDS, PER_WORD, BLOCK_N] and
                 reshaped (row-major) to [BLOCK_K, BLOCK_N]: row word * PER_WORD + lane = k - k0,
                 GPTQ's packing order (the GEMV kernel's unpacking); 0: one load per code
    factored     FACTORED: the dot takes the raw codes in x's dtype (exact: codes < 256) and the
                 tile's group applies after it, acc += scale * (x . q - zero * rowsum(x)) in fp32;
                 0: every element is dequantized, (q - zero) * scale, before the dot
    num_warps, num_stages  passed to the launch (no num_stages: Triton's default)

Measured on an H200 (bench/results/gpu_h200.md, Llama-2-7B shapes, 4-bit g128): the tiled
kernel's decode config ran at 10-14% of the bandwidth floor (each packed word is loaded
once per code it holds: 8 loads of one word at 4 bits); the GEMV kernel at M = 1 takes
8.8-17.7 us where it took 20-41 us (1.05-1.55x cuBLAS fp16, 24-34% of the floor);
dequantize + cuBLAS beat the tiled kernel from M = 32 on every shape (4096x4096 M=32:
22 us against 38 us; 11008x4096 M=64: 65 us against 131 us), hence DENSE_MIN_M = 32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gptq_format import _pack_rows
from .quant_linear import QuantLinearError, TritonLayout
from .quant_triton_tiles import dequant_tile, gathered_codes, group_scale_zero, unpacked_codes

# Rows through the GEMV kernel: it reads the weight once a row (from L2 after the first), so
# it wins at 1-2 rows and loses from 4 (H200, 4-bit 4096x4096: 8.8 / 13.4 / 26.4 us at M = 1 /
# 2 / 4 against the tiled kernel's 20.3 us; the 7B shapes alike, bench/results/gpu_h200.md).
GEMV_MAX_M = 2
DENSE_MIN_M = 32  # from this many rows, dequantize + cuBLAS (PreparedQuantLinear.dense_min_m on CUDA)


def prepare_triton_layout(
    codes: Tensor, zeros: Tensor, scales: Tensor, bits: int, group: int,
    device: torch.device, act_dtype: torch.dtype,
) -> TritonLayout:
    """codes int32 [K, N] in sorted-K order, zeros int [G, N], scales [G, N] -> TritonLayout."""
    k = codes.shape[0]
    if _block_k_for(k, group) is None:
        raise QuantLinearError(f"Triton path needs a group size divisible by 16 (got {group}, K={k})")
    if bits == 3:
        packed = _pack_rows(codes & 3, 2)
        high_bits: Tensor | None = _pack_rows(codes >> 2, 1).to(device)
    else:
        packed = _pack_rows(codes, bits)
        high_bits = None
    return TritonLayout(
        codes=packed.to(device),
        high_bits=high_bits,
        scales=scales.to(device, act_dtype).contiguous(),
        zeros=zeros.to(device, act_dtype).contiguous(),
        group_size=group,
        in_features=k,
    )


@triton.jit
def _quant_gemm_kernel(
    x_ptr, perm_ptr, codes_ptr, high_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K, group_size, k_tiles_per_split,
    stride_xm, stride_xk, stride_ck, stride_cn, stride_hk, stride_hn, stride_sg, stride_sn,
    stride_om, stride_on,
    BITS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UNPACK_ONCE: tl.constexpr, FACTORED: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tile_begin = pid_k * k_tiles_per_split
    tile_end = tl.minimum(tl.cdiv(K, BLOCK_K), tile_begin + k_tiles_per_split)
    for tile in range(tile_begin, tile_end):
        k0 = tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K  # all true unless the last tile runs past K
        if HAS_PERM:
            x_cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            x_cols = offs_k
        x_tile = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + x_cols[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UNPACK_ONCE:  # rows word * PER_WORD + lane = k - k0: the row-major reshape keeps them in order
            q = tl.reshape(unpacked_codes(codes_ptr, high_ptr, k0, K, offs_n, mask_n, stride_ck, stride_cn,
                                           stride_hk, stride_hn, BITS, BLOCK_K), (BLOCK_K, BLOCK_N))
        else:
            q = gathered_codes(codes_ptr, high_ptr, offs_k, offs_n, mask_k, mask_n, stride_ck, stride_cn,
                                stride_hk, stride_hn, BITS)
        scale, zero = group_scale_zero(scales_ptr, zeros_ptr, k0, group_size, offs_n, mask_n, stride_sg, stride_sn)
        if FACTORED:  # x . ((q - zero) * scale) = scale * (x . q - zero * sum(x)): one group a tile
            x_dot_q = tl.dot(x_tile, q.to(x_tile.dtype), input_precision=DOT_PRECISION)
            x_total = tl.sum(x_tile.to(tl.float32), axis=1)  # masked columns (past K) loaded as 0
            acc += scale[None, :] * (x_dot_q - zero[None, :] * x_total[:, None])
        else:
            w_tile = (q.to(tl.float32) - zero[None, :]) * scale[None, :]
            acc += tl.dot(x_tile, w_tile.to(x_tile.dtype), input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


@triton.jit
def _quant_gemv_kernel(
    x_ptr, perm_ptr, codes_ptr, high_ptr, scales_ptr, zeros_ptr, out_ptr,
    N, K, group_size, k_tiles_per_split,
    stride_xm, stride_xk, stride_ck, stride_cn, stride_hk, stride_hn, stride_sg, stride_sn,
    stride_om, stride_on,
    BITS: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[row, n] (+)= sum over this program's K tiles of x[row, k] * w[k, n]. Grid: (N
    blocks, SPLIT_K, M). A K tile is [WORDS, PER_WORD] codes: each packed word [WORDS,
    BLOCK_N] is loaded once and unpacked into [WORDS, PER_WORD, BLOCK_N]; the tile lies in one
    group, so out += scale * (x . q - zero * sum(x)) needs one scale and zero per column."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    PER_WORD: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # 3-bit: the 2-bit plane's words
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    word_rows = tl.arange(0, WORDS)
    lanes = tl.arange(0, PER_WORD)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tile_begin = pid_k * k_tiles_per_split
    tile_end = tl.minimum(tl.cdiv(K, BLOCK_K), tile_begin + k_tiles_per_split)
    for tile in range(tile_begin, tile_end):
        k0 = tile * BLOCK_K
        offs_k = k0 + word_rows[:, None] * PER_WORD + lanes[None, :]  # [WORDS, PER_WORD]
        mask_k = offs_k < K
        if HAS_PERM:
            x_cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            x_cols = offs_k
        x = tl.load(x_ptr + row * stride_xm + x_cols * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        q = unpacked_codes(codes_ptr, high_ptr, k0, K, offs_n, mask_n, stride_ck, stride_cn, stride_hk, stride_hn,
                            BITS, BLOCK_K)
        scale, zero = group_scale_zero(scales_ptr, zeros_ptr, k0, group_size, offs_n, mask_n, stride_sg, stride_sn)
        x_dot_q = tl.sum(tl.sum(x[:, :, None] * q.to(tl.float32), axis=0), axis=0)
        x_total = tl.sum(tl.sum(x, axis=1), axis=0)
        acc += scale * (x_dot_q - zero * x_total)
    out_ptrs = out_ptr + row * stride_om + offs_n * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_n)


@triton.jit
def _dequant_kernel(
    codes_ptr, high_ptr, scales_ptr, zeros_ptr, w_ptr,
    N, K, group_size,
    stride_ck, stride_cn, stride_hk, stride_hn, stride_sg, stride_sn, stride_wk, stride_wn,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w_tile = dequant_tile(
        codes_ptr, high_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, mask_k, mask_n, group_size,
        stride_ck, stride_cn, stride_hk, stride_hn, stride_sg, stride_sn, BITS,
    )
    tl.store(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
             w_tile.to(w_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def _block_k_for(k: int, group: int, largest: int = 128) -> int | None:
    """K tile for a layer: a power of two (16..largest) that keeps every tile inside one
    group, i.e. divides the group size (any tile does when one group spans K). The largest
    one that also divides K is preferred (no masked tail); else the largest at all."""
    candidates = [block for block in (128, 64, 32, 16) if block <= largest and (group >= k or group % block == 0)]
    for block in candidates:
        if k % block == 0:
            return block
    return candidates[0] if candidates else None


def triton_supported(in_features: int, group: int) -> bool:
    return _block_k_for(in_features, group) is not None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter runs: keep grids small


def default_gemm_config(m: int, n: int, k: int, group: int, device: torch.device) -> dict[str, int]:
    """M <= GEMV_MAX_M: the GEMV kernel (gemv=1), split-K to about 4 programs an SM; other
    decode sizes (M <= 16): narrow tiles + split-K to cover the SMs; prefill: 64x64 tiles."""
    block_k = _block_k_for(k, group) or 16
    if m <= GEMV_MAX_M:
        block_n = 128
        programs = triton.cdiv(n, block_n) * m
        k_tiles = triton.cdiv(k, block_k)
        split_k = max(1, min(k_tiles, triton.cdiv(4 * _sm_count(device), programs)))
        return {"gemv": 1, "block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": 4}
    if m <= 16:
        block_n = 64
        programs = triton.cdiv(n, block_n)
        k_tiles = triton.cdiv(k, block_k)
        split_k = max(1, min(k_tiles // 4, triton.cdiv(2 * _sm_count(device), programs)))
        return {"block_m": 16, "block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": 4}
    block_k = _block_k_for(k, group, largest=64) or 16
    return {"block_m": 64 if m > 32 else 32, "block_n": 64, "block_k": block_k, "split_k": 1, "num_warps": 4}


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _high(layout: TritonLayout) -> tuple[Tensor, int, int]:
    if layout.high_bits is None:
        return layout.codes, 0, 0  # unused by the kernel for bits != 3
    return layout.high_bits, layout.high_bits.stride(0), layout.high_bits.stride(1)


def dequantize_triton(layout: TritonLayout, bits: int, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Dense weight [K, N] (sorted-K order) in `dtype`, dequantized by a Triton kernel
    (into `out` when given: tests pass a poisoned buffer)."""
    n = layout.scales.shape[1]
    k = layout.in_features
    weight = torch.empty((k, n), dtype=dtype, device=layout.codes.device) if out is None else out
    if weight.shape != (k, n) or weight.dtype != dtype:
        raise QuantLinearError(f"out must be {dtype} [{k}, {n}], got {weight.dtype} {tuple(weight.shape)}")
    block_k = _block_k_for(k, layout.group_size, largest=64)
    block_n = 64
    high, stride_hk, stride_hn = _high(layout)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        layout.codes, high, layout.scales, layout.zeros, weight,
        n, k, layout.group_size,
        layout.codes.stride(0), layout.codes.stride(1), stride_hk, stride_hn,
        layout.scales.stride(0), layout.scales.stride(1), weight.stride(0), weight.stride(1),
        BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return weight


def triton_quant_matmul(
    x: Tensor, layout: TritonLayout, bits: int, input_perm: Tensor | None, dense_min_m: int,
    out: Tensor | None = None, **config_override: int,
) -> Tensor:
    """[M, N] in x's dtype (bias not included), written into `out` when given (tests pass a
    poisoned buffer: every element must be overwritten). `config_override` replaces keys of
    default_gemm_config (gemv, block_m, block_n, block_k, split_k, num_warps) or adds
    num_stages, unpack_once, factored (the last two: tiled kernel only; the GEMV kernel always
    loads each word once and factors)."""
    m, k = x.shape
    n = layout.scales.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise QuantLinearError(f"out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if m == 0:
        # An empty batch: nothing to compute, and default_gemm_config divides by the
        # program count, which is 0 here (ZeroDivisionError, on a GPU as well).
        return out
    if m >= dense_min_m:
        weight = dequantize_triton(layout, bits, x.dtype)
        x_sorted = x if input_perm is None else x.index_select(1, input_perm)
        return torch.matmul(x_sorted, weight, out=out)
    config = default_gemm_config(m, n, k, layout.group_size, x.device)
    wants_tiled = config_override.get("gemv", 0 if "block_m" in config_override else None) == 0
    if config.get("gemv") and wants_tiled:  # a tiled-kernel override at GEMV sizes: start from its decode config
        config = default_gemm_config(GEMV_MAX_M + 1, n, k, layout.group_size, x.device)
    config.update(config_override)
    gemv = bool(config.get("gemv", 0))
    block_m, block_n, block_k, split_k = (config.get(key, 1) for key in ("block_m", "block_n", "block_k", "split_k"))
    if layout.group_size < k and layout.group_size % block_k:
        raise QuantLinearError(f"block_k {block_k} must divide the group size ({layout.group_size})")
    k_tiles = triton.cdiv(k, block_k)
    split_k = max(1, min(split_k, k_tiles))
    k_tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, k_tiles_per_split)
    # Split-K programs add fp32 partial sums with atomics into a zeroed buffer.
    target = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    high, stride_hk, stride_hn = _high(layout)
    perm = input_perm if input_perm is not None else layout.codes  # placeholder pointer when unused
    launch = {"num_warps": config.get("num_warps", 4)}
    if "num_stages" in config:  # else Triton's default
        launch["num_stages"] = config["num_stages"]
    if gemv:
        _quant_gemv_kernel[(triton.cdiv(n, block_n), split_k, m)](
            x, perm, layout.codes, high, layout.scales, layout.zeros, target,
            n, k, layout.group_size, k_tiles_per_split,
            x.stride(0), x.stride(1), layout.codes.stride(0), layout.codes.stride(1), stride_hk, stride_hn,
            layout.scales.stride(0), layout.scales.stride(1), target.stride(0), target.stride(1),
            BITS=bits, HAS_PERM=input_perm is not None, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            **launch,
        )
        if target is not out:
            out.copy_(target)
        return out
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _quant_gemm_kernel[grid](
        x, perm, layout.codes, high, layout.scales, layout.zeros, target,
        m, n, k, layout.group_size, k_tiles_per_split,
        x.stride(0), x.stride(1), layout.codes.stride(0), layout.codes.stride(1), stride_hk, stride_hn,
        layout.scales.stride(0), layout.scales.stride(1), target.stride(0), target.stride(1),
        BITS=bits, HAS_PERM=input_perm is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        DOT_PRECISION=_dot_precision(x.dtype), UNPACK_ONCE=bool(config.get("unpack_once", 0)),
        FACTORED=bool(config.get("factored", 0)), **launch,
    )
    if target is not out:
        out.copy_(target)
    return out
