"""GPTQ checkpoint format: bit-exact pack/unpack and dequantization against scalar references."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels.gptq_format import (
    GPTQFormatError,
    default_g_idx,
    dequantize_gptq,
    num_groups,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)


def _scalar_pack_column(values: list[int], bits: int) -> list[int]:
    """Reference packer written word by word, the way GPTQ packers loop (unsigned words)."""
    words: list[int] = []
    if bits == 3:
        for block in range(0, len(values), 32):
            v = values[block : block + 32]
            w0 = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] << 30) & 0xFFFFFFFF)
            w1 = ((v[10] >> 2) & 1) | sum(v[11 + j] << (3 * j + 1) for j in range(10))
            w1 |= (v[21] << 31) & 0xFFFFFFFF
            w2 = ((v[21] >> 1) & 3) | sum(v[22 + j] << (3 * j + 2) for j in range(10))
            words += [w0, w1, w2]
    else:
        per_word = 32 // bits
        for start in range(0, len(values), per_word):
            words.append(sum(v << (bits * j) for j, v in enumerate(values[start : start + per_word])))
    return [w - 2**32 if w >= 2**31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_matches_scalar_packer_and_round_trips(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    k, n = 64, 5
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    q[0, 0], q[-1, -1] = 2**bits - 1, 2**bits - 1  # sign bit of the last word set
    packed = pack_qweight(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k * bits // 32, n)
    for col in range(n):
        expected = _scalar_pack_column(q[:, col].tolist(), bits)
        assert packed[:, col].tolist() == expected
    assert torch.equal(unpack_qweight(packed, bits, k), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qzeros_v1_convention_round_trips_every_value(bits: int) -> None:
    levels = 2**bits
    n = 32 * ((levels + 31) // 32)
    zeros = (torch.arange(3 * n, dtype=torch.int32) % levels).reshape(3, n)  # every z, z=0 included
    packed = pack_qzeros(zeros, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, n * bits // 32)
    stored = ((zeros.to(torch.int64) - 1) & (levels - 1)).tolist()
    for row in range(3):
        assert packed[row].tolist() == _scalar_pack_column(stored[row], bits)
    assert torch.equal(unpack_qzeros(packed, bits, n), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_float64_reference(bits: int, act_order: bool) -> None:
    gen = torch.Generator().manual_seed(10 * bits + act_order)
    k, n, group = 128, 32, 32
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=gen)
    scales = torch.rand((k // group, n), generator=gen, dtype=torch.float32) + 0.01
    g_idx = default_g_idx(k, group)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    w = dequantize_gptq(pack_qweight(q, bits), pack_qzeros(zeros, bits), scales, g_idx, bits)
    g = g_idx.long()
    reference = scales.double()[g] * (q.double() - zeros.double()[g])
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), reference, rtol=1e-6, atol=1e-6)
    if not act_order:
        w_none = dequantize_gptq(pack_qweight(q, bits), pack_qzeros(zeros, bits), scales, None, bits)
        assert torch.equal(w_none, w)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(GPTQFormatError, match="multiple of 32"):
        pack_qweight(torch.zeros((48, 4), dtype=torch.int32), 3)
    with pytest.raises(GPTQFormatError, match="multiple of 8"):
        pack_qweight(torch.zeros((12, 4), dtype=torch.int32), 4)
    with pytest.raises(GPTQFormatError, match=r"\[0, 16\)"):
        pack_qweight(torch.full((8, 4), 16, dtype=torch.int32), 4)
    with pytest.raises(GPTQFormatError, match="bits must be one of"):
        pack_qweight(torch.zeros((8, 4), dtype=torch.int32), 5)
    with pytest.raises(GPTQFormatError, match="out_features"):
        pack_qzeros(torch.zeros((2, 12), dtype=torch.int32), 4)
    with pytest.raises(GPTQFormatError, match="group_size must be positive or -1"):
        default_g_idx(100, 0)
    q = torch.zeros((576, 32), dtype=torch.int32)
    with pytest.raises(GPTQFormatError, match="give g_idx or group_size"):  # 5 groups cannot tile 576
        dequantize_gptq(pack_qweight(q, 4), pack_qzeros(torch.ones((5, 32), dtype=torch.int32), 4),
                        torch.ones((5, 32)), None, 4)
    with pytest.raises(GPTQFormatError, match="makes 9 groups"):
        dequantize_gptq(pack_qweight(q, 4), pack_qzeros(torch.ones((5, 32), dtype=torch.int32), 4),
                        torch.ones((5, 32)), None, 4, group_size=64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features,group_size", [(576, 32), (576, 128), (576, -1), (1536, 32), (1536, 128), (1536, -1)])
def test_groups_that_do_not_tile_k(in_features: int, group_size: int, bits: int) -> None:
    """G = ceil(K / group_size), the last group shorter (576 = 4.5 x 128): round trips and
    dequantization against float64, with g_idx stored, act-order, and g_idx left out."""
    expected_groups = {(576, 32): 18, (576, 128): 5, (576, -1): 1, (1536, 32): 48, (1536, 128): 12, (1536, -1): 1}
    n_groups = num_groups(in_features, group_size)
    assert n_groups == expected_groups[(in_features, group_size)]
    g_idx = default_g_idx(in_features, group_size)
    size = in_features if group_size == -1 else group_size
    counts = torch.bincount(g_idx.long(), minlength=n_groups).tolist()
    assert counts == [size] * (n_groups - 1) + [in_features - size * (n_groups - 1)]  # only the last is short
    gen = torch.Generator().manual_seed(in_features + bits + group_size)
    n = 64
    q = torch.randint(0, 2**bits, (in_features, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (n_groups, n), generator=gen, dtype=torch.int32)
    scales = torch.rand((n_groups, n), generator=gen) + 0.01
    qweight, qzeros = pack_qweight(q, bits), pack_qzeros(zeros, bits)
    assert torch.equal(unpack_qweight(qweight, bits, in_features), q)
    assert torch.equal(unpack_qzeros(qzeros, bits, n), zeros)
    for order in ("plain", "act-order"):
        groups = g_idx if order == "plain" else g_idx[torch.randperm(in_features, generator=gen)]
        g = groups.long()
        reference = scales.double()[g] * (q.double() - zeros.double()[g])
        w = dequantize_gptq(qweight, qzeros, scales, groups, bits)
        torch.testing.assert_close(w.double(), reference, rtol=1e-6, atol=1e-6)
    without_g_idx = dequantize_gptq(qweight, qzeros, scales, None, bits, group_size=group_size)
    assert torch.equal(without_g_idx, dequantize_gptq(qweight, qzeros, scales, g_idx, bits))
