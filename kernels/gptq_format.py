"""The standard GPTQ checkpoint format (AutoGPTQ / GPTQModel compatible), in plain torch.

Tensors of one quantized linear layer with `in_features = K`, `out_features = N`,
`G` groups along K:

    qweight  int32 [K * bits // 32, N]   codes packed along K (the input dimension)
    qzeros   int32 [G, N * bits // 32]   zero points packed along N, "v1" convention:
                                          the stored value is (z - 1) masked to `bits`
    scales   float [G, N]
    g_idx    int32 [K]                    group of each input row (act-order permutes it)

    W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])      (nn.Linear.weight = W.T)

Groups need not tile K: G = ceil(K / group_size), g_idx[k] = k // group_size without
act-order, and the last group is shorter (SmolLM2's K = 576 = 4.5 x 128 at group 128).

Packing is a little-endian bit stream: value j of a packed run sits at bit `j * bits`
of the concatenated int32 words (word 0 holds bits 0..31). For bits 2/4/8 no value crosses
a word; for 3 bits 32 values span three words and values 10 and 21 straddle word
boundaries -- exactly the layout of AutoGPTQ's 3-bit packer.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD_MASK = 0xFFFFFFFF


class GPTQFormatError(ValueError):
    """A tensor does not fit the GPTQ checkpoint format (bad bits, shape or value range)."""


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise GPTQFormatError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _pack_multiple(bits: int) -> int:
    """How many values make a whole number of int32 words."""
    return 32 if bits == 3 else 32 // bits


def _bit_positions(count: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index and bit shift of each of `count` packed values."""
    bit_offset = torch.arange(count, device=device, dtype=torch.int64) * bits
    return bit_offset // 32, bit_offset % 32


def _to_int32_words(words_u32: Tensor) -> Tensor:
    """int64 tensor holding unsigned 32-bit words -> int32 with the same bit pattern."""
    signed = torch.where(words_u32 >= 2**31, words_u32 - 2**32, words_u32)
    return signed.to(torch.int32)


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack int [L, C] along dim 0 into int32 [L * bits // 32, C]."""
    length = values.shape[0]
    v = values.to(torch.int64)
    word, shift = _bit_positions(length, bits, v.device)
    n_words = length * bits // 32
    # One spare word absorbs the (always zero) spill of the last value.
    out = torch.zeros((n_words + 1, v.shape[1]), dtype=torch.int64, device=v.device)
    low = (v << shift[:, None]) & _WORD_MASK
    high = v >> (32 - shift)[:, None]  # bits that spill into the next word (0 if none)
    # The bit fields are disjoint, so adding them equals OR-ing them.
    out.index_add_(0, word, low)
    out.index_add_(0, word + 1, high)
    return _to_int32_words(out[:n_words])


def _unpack_rows(packed: Tensor, bits: int, length: int) -> Tensor:
    """Unpack int32 [L * bits // 32, C] along dim 0 into int32 [L, C]."""
    words = packed.to(torch.int64) & _WORD_MASK
    words = torch.cat([words, torch.zeros_like(words[:1])], dim=0)
    word, shift = _bit_positions(length, bits, packed.device)
    mask = (1 << bits) - 1
    low = words[word] >> shift[:, None]
    # When shift == 0 the next word shifted by 32 has no bits inside `mask`.
    high = words[word + 1] << (32 - shift)[:, None]
    return ((low | high) & mask).to(torch.int32)


def _check_codes(values: Tensor, bits: int, what: str) -> None:
    if values.dim() != 2:
        raise GPTQFormatError(f"{what} must be 2-D, got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise GPTQFormatError(f"{what} must be an integer tensor, got {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise GPTQFormatError(
            f"{what} values must lie in [0, {2**bits}) for {bits}-bit, "
            f"got range [{int(values.min())}, {int(values.max())}]"
        )


def pack_qweight(q: Tensor, bits: int) -> Tensor:
    """Codes int [K, N] in [0, 2**bits) -> GPTQ `qweight` int32 [K * bits // 32, N]."""
    _check_bits(bits)
    _check_codes(q, bits, "q")
    multiple = _pack_multiple(bits)
    if q.shape[0] % multiple:
        raise GPTQFormatError(
            f"in_features (K = {q.shape[0]}) must be a multiple of {multiple} to pack {bits}-bit codes"
        )
    return _pack_rows(q, bits)


def unpack_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """GPTQ `qweight` int32 [K * bits // 32, N] -> codes int32 [K, N]."""
    _check_bits(bits)
    if qweight.dim() != 2:
        raise GPTQFormatError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
    if in_features % _pack_multiple(bits) or qweight.shape[0] != in_features * bits // 32:
        raise GPTQFormatError(
            f"qweight has {qweight.shape[0]} rows; {bits}-bit with in_features={in_features} "
            f"needs {in_features * bits // 32} (and K a multiple of {_pack_multiple(bits)})"
        )
    return _unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros: Tensor, bits: int) -> Tensor:
    """True zero points int [G, N] in [0, 2**bits) -> GPTQ `qzeros` int32 [G, N * bits // 32].

    Stores (z - 1) & mask (the v1 convention every GPTQ loader expects)."""
    _check_bits(bits)
    _check_codes(zeros, bits, "zeros")
    multiple = _pack_multiple(bits)
    if zeros.shape[1] % multiple:
        raise GPTQFormatError(
            f"out_features (N = {zeros.shape[1]}) must be a multiple of {multiple} to pack {bits}-bit zeros"
        )
    stored = (zeros.to(torch.int64) - 1) & ((1 << bits) - 1)
    return _pack_rows(stored.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    """GPTQ `qzeros` int32 [G, N * bits // 32] -> true zero points int32 [G, N]."""
    _check_bits(bits)
    if qzeros.dim() != 2:
        raise GPTQFormatError(f"qzeros must be 2-D, got shape {tuple(qzeros.shape)}")
    if out_features % _pack_multiple(bits) or qzeros.shape[1] != out_features * bits // 32:
        raise GPTQFormatError(
            f"qzeros has {qzeros.shape[1]} columns; {bits}-bit with out_features={out_features} "
            f"needs {out_features * bits // 32} (and N a multiple of {_pack_multiple(bits)})"
        )
    stored = _unpack_rows(qzeros.t(), bits, out_features).t()
    return ((stored + 1) & ((1 << bits) - 1)).contiguous()


def _group_rows(in_features: int, group_size: int) -> int:
    size = in_features if group_size == -1 else group_size
    if size <= 0:
        raise GPTQFormatError(f"group_size must be positive or -1, got {group_size}")
    return size


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / group_size) (1 for group_size -1): the last group may be shorter."""
    size = _group_rows(in_features, group_size)
    return -(-in_features // size)


def default_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> Tensor:
    """g_idx int32 [K] without act-order: k // group_size (group_size -1 = one group)."""
    size = _group_rows(in_features, group_size)
    return torch.arange(in_features, device=device, dtype=torch.int32) // size


def dequantize_gptq(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None, bits: int,
    group_size: int | None = None,
) -> Tensor:
    """Dense float32 W [K, N] with W[k, n] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k].

    g_idx None means g = k // group_size; without group_size the G groups must then tile K
    (K // G rows each: a ragged last group needs g_idx or group_size). nn.Linear.weight = W.T."""
    _check_bits(bits)
    in_features = qweight.shape[0] * 32 // bits
    out_features = qweight.shape[1]
    if scales.dim() != 2 or scales.shape[1] != out_features:
        raise GPTQFormatError(
            f"scales must be [G, {out_features}], got shape {tuple(scales.shape)}"
        )
    n_groups = scales.shape[0]
    if qzeros.shape[0] != n_groups:
        raise GPTQFormatError(f"qzeros has {qzeros.shape[0]} groups, scales has {n_groups}")
    if g_idx is None:
        if group_size is None:
            if n_groups == 0 or in_features % n_groups:
                raise GPTQFormatError(
                    f"K={in_features} is not divisible into {n_groups} groups: give g_idx or group_size"
                )
            group_size = in_features // n_groups
        if num_groups(in_features, group_size) != n_groups:
            raise GPTQFormatError(
                f"group_size {group_size} makes {num_groups(in_features, group_size)} groups of K={in_features}, "
                f"scales has {n_groups}"
            )
        g_idx = default_g_idx(in_features, group_size, qweight.device)
    if g_idx.shape != (in_features,):
        raise GPTQFormatError(f"g_idx must be [{in_features}], got shape {tuple(g_idx.shape)}")
    g = g_idx.to(torch.int64)
    if in_features and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise GPTQFormatError(f"g_idx values must lie in [0, {n_groups})")
    codes = unpack_qweight(qweight, bits, in_features).to(torch.float32)
    zeros = unpack_qzeros(qzeros, bits, out_features).to(torch.float32)
    return scales.to(torch.float32)[g] * (codes - zeros[g])
