"""The oneDNN-packed dense matmul (kernels/dense_cpu.py) against float64 and F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inlaid.kernels.dense_cpu import PackedDenseWeight, dense_linear_reference, packing_supported

DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not packing_supported(torch.zeros(1, 1, dtype=torch.bfloat16)), reason="this CPU's oneDNN has no bf16")),
    pytest.param(torch.float32, marks=pytest.mark.skipif(
        not packing_supported(torch.zeros(1, 1)), reason="torch built without oneDNN")),
]
# Relative error of one output element against float64: bf16 rounds the output once
# (2^-8, with margin); float32 sums in float32 (K <= 640 terms).
TOLERANCE = {torch.bfloat16: 2**-7, torch.float32: 1e-5}


def _check(packed: PackedDenseWeight, x: torch.Tensor) -> None:
    out = packed.linear(x)
    reference = x.double() @ packed.weight.double().T
    assert out.dtype == packed.weight.dtype and out.shape == reference.shape
    assert torch.isfinite(out).all()
    tolerance = TOLERANCE[packed.weight.dtype]
    if reference.numel():
        assert (out.double() - reference).abs().max().item() <= tolerance * reference.abs().max().item()
    # bf16: measured bit-identical to the plain weight's matmul; allow one rounding apart in
    # case another CPU's oneDNN blocks K differently for the two layouts. float32: oneDNN
    # and MKL sum in different orders.
    plain = dense_linear_reference(x, packed.weight).double()
    if plain.numel():
        assert (out.double() - plain).abs().max().item() <= tolerance * plain.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,in_features,out_features", [(1, 64, 32), (16, 576, 192), (33, 100, 70), (640, 96, 48), (0, 64, 32)])
def test_packed_matches_float64_and_plain_linear(dtype, tokens, in_features, out_features):
    torch.manual_seed(tokens * 1000 + in_features)
    weight = (torch.randn(out_features, in_features) / in_features**0.5).to(dtype)
    packed = PackedDenseWeight(weight)
    assert packed.packs
    _check(packed, torch.randn(tokens, in_features).to(dtype))
    _check(packed, torch.randn(tokens + 3, in_features).to(dtype))  # the packed copy is reused


@pytest.mark.parametrize("dtype", DTYPES)
def test_writes_reach_the_matmul_only_after_invalidate(dtype):
    torch.manual_seed(0)
    combined = torch.randn(40, 80).to(dtype)
    base = combined[:, :64]  # a view, like the base inside FusedExpandWeight's matrix
    packed = PackedDenseWeight(combined)
    x = torch.randn(7, 80).to(dtype)
    before = packed.linear(x)
    combined[:, 64:].fill_(float("nan"))  # poison the columns, then write the real values
    combined[:, 64:] = torch.randn(40, 16).to(dtype)
    assert torch.equal(packed.linear(x), before)  # still the old packing: writes need invalidate()
    packed.invalidate()
    _check(packed, x)
    assert not torch.equal(packed.linear(x), before)
    _check(PackedDenseWeight(base.contiguous()), x[:, :64])


def test_unpacked_weights_use_plain_linear():
    torch.manual_seed(1)
    for weight, pack in ((torch.randn(24, 48).to(torch.float16), True), (torch.randn(24, 48), False)):
        packed = PackedDenseWeight(weight, pack=pack)
        assert not packed.packs  # float16 is never packed; pack=False (EngineConfig.pack_weights)
        x = torch.randn(5, 48).to(weight.dtype)
        assert torch.equal(packed.linear(x), F.linear(x, weight))


def test_bad_inputs_are_rejected():
    packed = PackedDenseWeight(torch.zeros(8, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be"):
        packed.linear(torch.zeros(2, 16))  # float32 x against a bf16 weight
    with pytest.raises(ValueError, match="x must be"):
        packed.linear(torch.zeros(2, 15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        PackedDenseWeight(torch.zeros(8, dtype=torch.bfloat16))
