"""Tile loaders of the Triton low-bit GEMM (kernels/quant_triton.py): the codes and the group
scale / zero point of one K tile, [BLOCK_K rows of K, BLOCK_N columns of N].

Layout (quant_triton.py's docstring has the whole of it): codes int32 [K * b // 32, N], GPTQ
packing along K (PER_WORD = 32 // b codes a word, lane j at bits j*b); 3-bit: a 2-bit plane
(16 codes a word) and a 1-bit plane `high` [K // 32, N]; scales / zeros [G, N]. A K tile
never straddles a group (prepare_triton_layout chooses BLOCK_K so), hence one scale and one
zero a column per tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gathered_codes(
    codes_ptr, high_ptr, offs_k, offs_n, mask_k, mask_n, stride_ck, stride_cn, stride_hk, stride_hn,
    BITS: tl.constexpr,
):
    """int32 [BLOCK_K, BLOCK_N] codes of rows offs_k, gathered one code a load (a packed word
    is loaded once per code it holds); rows outside mask_k (past K) are not loaded (0)."""
    mask = mask_k[:, None] & mask_n[None, :]
    if BITS == 3:
        low_words = tl.load(codes_ptr + (offs_k // 16)[:, None] * stride_ck + offs_n[None, :] * stride_cn,
                            mask=mask, other=0)
        high_words = tl.load(high_ptr + (offs_k // 32)[:, None] * stride_hk + offs_n[None, :] * stride_hn,
                             mask=mask, other=0)
        q = ((low_words >> ((offs_k % 16) * 2)[:, None]) & 3) | (((high_words >> (offs_k % 32)[:, None]) & 1) << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(codes_ptr + (offs_k // PER_WORD)[:, None] * stride_ck + offs_n[None, :] * stride_cn,
                        mask=mask, other=0)
        q = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def unpacked_codes(
    codes_ptr, high_ptr, k0, K, offs_n, mask_n, stride_ck, stride_cn, stride_hk, stride_hn,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """int32 [WORDS, PER_WORD, BLOCK_N] codes of rows k0 + word * PER_WORD + lane (GPTQ's
    packing order; PER_WORD = 32 // BITS, 16 at 3-bit: the 2-bit plane's words): each packed
    word [WORDS, BLOCK_N] is loaded once and unpacked by shifts; words past K are not loaded."""
    PER_WORD: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    word_k = k0 // PER_WORD + tl.arange(0, WORDS)
    lanes = tl.arange(0, PER_WORD)
    mask_w = (word_k * PER_WORD < K)[:, None] & mask_n[None, :]
    words = tl.load(codes_ptr + word_k[:, None] * stride_ck + offs_n[None, :] * stride_cn, mask=mask_w, other=0)
    if BITS == 3:
        q = (words[:, None, :] >> (lanes * 2)[None, :, None]) & 3
        # 32 top bits a word: a 16-code word's top bits are the low or high half of one.
        high = tl.load(high_ptr + (word_k // 2)[:, None] * stride_hk + offs_n[None, :] * stride_hn,
                       mask=mask_w, other=0)
        shift = ((word_k % 2) * 16)[:, None] + lanes[None, :]  # [WORDS, PER_WORD]
        q = q | (((high[:, None, :] >> shift[:, :, None]) & 1) << 2)
    else:
        q = (words[:, None, :] >> (lanes * BITS)[None, :, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def group_scale_zero(scales_ptr, zeros_ptr, k0, group_size, offs_n, mask_n, stride_sg, stride_sn):
    """fp32 [BLOCK_N] scale and zero point of the group holding row k0 (a K tile lies in one)."""
    group = k0 // group_size
    scale = tl.load(scales_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def dequant_tile(
    codes_ptr, high_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, mask_k, mask_n, group_size,
    stride_ck, stride_cn, stride_hk, stride_hn, stride_sg, stride_sn,
    BITS: tl.constexpr,
):
    """fp32 [BLOCK_K, BLOCK_N] weight tile of rows offs_k (all in group k0 // group_size);
    rows outside mask_k (past K) are not loaded."""
    q = gathered_codes(codes_ptr, high_ptr, offs_k, offs_n, mask_k, mask_n, stride_ck, stride_cn, stride_hk,
                        stride_hn, BITS)
    scale, zero = group_scale_zero(scales_ptr, zeros_ptr, k0, group_size, offs_n, mask_n, stride_sg, stride_sn)
    return (q.to(tl.float32) - zero[None, :]) * scale[None, :]
