"""The oneDNN-packed dense matmul (kernels/dense_cpu.py) against float64 and F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inlaid.kernels.dense_cpu import PackedDenseWeight, dense_linear_reference, packing_supported

BF16 = torch.zeros(1, 1, dtype=torch.bfloat16)
needs_packing = pytest.mark.skipif(not packing_supported(BF16), reason="this CPU's oneDNN has no bf16")


def _check(packed: PackedDenseWeight, x: torch.Tensor) -> None:
    out = packed.linear(x)
    reference = x.double() @ packed.weight.double().T
    assert out.dtype == packed.weight.dtype and out.shape == reference.shape
    assert torch.isfinite(out).all()
    if reference.numel():
        # bf16 output: one rounding of each element (relative 2^-8), sums in float32 inside.
        assert (out.double() - reference).abs().max().item() <= 2**-7 * reference.abs().max().item()
    # Measured bit-identical to the plain weight's matmul; allow one bf16 rounding apart in
    # case another CPU's oneDNN blocks K differently for the two layouts.
    plain = dense_linear_reference(x, packed.weight)
    assert torch.allclose(out.float(), plain.float(), rtol=2**-7, atol=1e-6)


@needs_packing
@pytest.mark.parametrize("tokens,in_features,out_features", [(1, 64, 32), (16, 576, 192), (33, 100, 70), (640, 96, 48), (0, 64, 32)])
def test_packed_bf16_matches_float64_and_plain_linear(tokens, in_features, out_features):
    torch.manual_seed(tokens * 1000 + in_features)
    weight = (torch.randn(out_features, in_features) / in_features**0.5).to(torch.bfloat16)
    packed = PackedDenseWeight(weight)
    assert packed.packs
    _check(packed, torch.randn(tokens, in_features).to(torch.bfloat16))
    _check(packed, torch.randn(tokens + 3, in_features).to(torch.bfloat16))  # the packed copy is reused


@needs_packing
def test_writes_reach_the_matmul_only_after_invalidate():
    torch.manual_seed(0)
    combined = torch.randn(40, 80).to(torch.bfloat16)
    base = combined[:, :64]  # a view, like the base inside FusedExpandWeight's matrix
    packed = PackedDenseWeight(combined)
    x = torch.randn(7, 80).to(torch.bfloat16)
    before = packed.linear(x)
    combined[:, 64:].fill_(float("nan"))  # poison the columns, then write the real values
    combined[:, 64:] = torch.randn(40, 16).to(torch.bfloat16)
    assert torch.equal(packed.linear(x), before)  # still the old packing: writes need invalidate()
    packed.invalidate()
    _check(packed, x)
    assert not torch.equal(packed.linear(x), before)
    _check(PackedDenseWeight(base.contiguous()), x[:, :64])


def test_other_dtypes_fall_back_to_plain_linear():
    torch.manual_seed(1)
    weight = torch.randn(24, 48)
    packed = PackedDenseWeight(weight)
    assert not packed.packs  # float32 stays on the MKL kernels transformers uses (exact parity)
    x = torch.randn(5, 48)
    assert torch.equal(packed.linear(x), F.linear(x, weight))


def test_bad_inputs_are_rejected():
    packed = PackedDenseWeight(torch.zeros(8, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be"):
        packed.linear(torch.zeros(2, 16))  # float32 x against a bf16 weight
    with pytest.raises(ValueError, match="x must be"):
        packed.linear(torch.zeros(2, 15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        PackedDenseWeight(torch.zeros(8, dtype=torch.bfloat16))
