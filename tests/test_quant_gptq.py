"""GPTQ core against independent references: brute-force OBS in float64, RTN, exact sums."""

from __future__ import annotations

import pytest
import torch

from inlaid.quant.errors import CholeskyFailedError, InvalidQuantSpecError, NonFiniteHessianError
from inlaid.quant.gptq import gptq_quantize, rtn_quantize
from inlaid.quant.grid import find_grid
from inlaid.quant.hessian import HessianAccumulator, reconstruction_error
from inlaid.quant.spec import QuantSpec


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py



def _correlated_inputs(tokens: int, features: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=dtype) / features**0.5
    scales = torch.rand(features, generator=generator, dtype=dtype) * 3 + 0.1
    return (torch.randn(tokens, features, generator=generator, dtype=dtype) * scales) @ mixing


def _hessian64(inputs: torch.Tensor) -> torch.Tensor:
    x = inputs.to(torch.float64)
    return 2.0 * x.T @ x / x.shape[0]


def test_hessian_accumulator_is_running_token_average() -> None:
    inputs = _correlated_inputs(1000, 48, seed=1)
    accumulator = HessianAccumulator(48)
    for chunk in torch.split(inputs, [1, 299, 0, 400, 300]):
        accumulator.add(chunk.reshape(1, -1, 48) if chunk.shape[0] else chunk)
    assert accumulator.tokens == 1000
    assert accumulator.hessian.dtype == torch.float32
    torch.testing.assert_close(accumulator.hessian.double(), _hessian64(inputs), rtol=1e-5, atol=1e-5)
    left, right = HessianAccumulator(48), HessianAccumulator(48)
    left.add(inputs[:100])
    right.add(inputs[100:])
    left.merge(right)
    torch.testing.assert_close(left.hessian.double(), _hessian64(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=128),
        QuantSpec(bits=3, group_size=64),
        QuantSpec(bits=3, group_size=-1),
        QuantSpec(bits=2, group_size=32, symmetric=True),
        QuantSpec(bits=8, group_size=128),
        QuantSpec(bits=3, group_size=128, act_order=True),
        QuantSpec(bits=3, group_size=32, act_order=True, static_groups=False),
        QuantSpec(bits=4, group_size=64, mse_clip=True, block_size=48),
    ],
    ids=lambda s: f"b{s.bits}g{s.group_size}{'s' if s.symmetric else ''}{'A' if s.act_order else ''}"
    f"{'' if s.static_groups else 'dyn'}{'C' if s.mse_clip else ''}",
)
def test_gptq_error_below_rtn_on_random_layers(spec: QuantSpec) -> None:
    for seed, (rows, cols) in enumerate([(96, 256), (160, 200)]):
        weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(100 + seed))
        inputs = _correlated_inputs(2048, cols, seed=seed)
        hessian = _hessian64(inputs).float()
        gptq = gptq_quantize(weight, hessian, spec)
        rtn = rtn_quantize(weight, spec)
        assert int(gptq.codes.max()) <= spec.max_q
        # The error measured directly on the data: ||(W-Q)X||², not through the Hessian.
        x = inputs.double().T
        w = weight.double()
        gptq_error = torch.linalg.norm((w - gptq.dequantize(torch.float64)) @ x) ** 2
        rtn_error = torch.linalg.norm((w - rtn.dequantize(torch.float64)) @ x) ** 2
        assert gptq_error < 0.9 * rtn_error, (float(gptq_error), float(rtn_error))
        # reconstruction_error is the same ratio computed from H
        ratio = float(gptq_error / torch.linalg.norm(w @ x) ** 2)
        assert reconstruction_error(weight, gptq.dequantize(), hessian) == pytest.approx(ratio, rel=1e-4)


def _brute_force_obs(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, order: torch.Tensor):
    """Sequential OBS in float64 without any inverse factor: after fixing each column to its
    quantized value, set the free columns to argmin (W'-W) H (W'-W)ᵀ by a direct solve."""
    original = weight.clone()
    current = weight.clone()
    cols = weight.shape[1]
    group = spec.effective_group_size(cols)
    codes = torch.zeros_like(weight)
    static = spec.group_size == -1 or (spec.act_order and spec.static_groups)
    grids = [find_grid(original[:, g * group : (g + 1) * group], spec) for g in range(spec.num_groups(cols))]
    grid = None
    for position in range(cols):
        column = int(order[position])
        if static:
            grid = grids[column // group]
        elif position % group == 0:
            grid = find_grid(current[:, order[position : position + group]], spec)
        codes[:, column] = grid.quantize(current[:, column], spec.max_q)
        current[:, column] = grid.dequantize(codes[:, column])
        fixed, free = order[: position + 1], order[position + 1 :]
        if len(free) == 0:
            break
        delta_fixed = current[:, fixed] - original[:, fixed]
        h_ff = hessian[free][:, free]
        h_fp = hessian[free][:, fixed]
        delta_free = -torch.linalg.solve(h_ff, h_fp @ delta_fixed.T).T
        current[:, free] = original[:, free] + delta_free
    return codes, current


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, group_size=-1, damp_percent=0.0, block_size=4),
        QuantSpec(bits=2, group_size=4, damp_percent=0.0, block_size=8),
        # groups of 6 straddle blocks of 4: grids need the pending lazy updates
        QuantSpec(bits=3, group_size=6, damp_percent=0.0, block_size=4),
        QuantSpec(bits=3, group_size=4, damp_percent=0.0, block_size=5, act_order=True),
        QuantSpec(bits=3, group_size=4, damp_percent=0.0, block_size=5, act_order=True, static_groups=False),
    ],
    ids=["perchannel", "g4", "g6-straddle", "actorder-static", "actorder-dynamic"],
)
def test_column_updates_match_brute_force_obs_float64(spec: QuantSpec) -> None:
    rows, cols = 7, 13
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    inputs = _correlated_inputs(200, cols, seed=3, dtype=torch.float64)
    hessian = _hessian64(inputs)
    result = gptq_quantize(weight, hessian, spec)
    order = (
        torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        if spec.act_order
        else torch.arange(cols)
    )
    expected_codes, expected_weight = _brute_force_obs(weight, hessian, spec, order)
    assert torch.equal(result.codes.double(), expected_codes)
    torch.testing.assert_close(result.dequantize(torch.float64), expected_weight, rtol=0, atol=1e-12)


def test_dead_columns_are_rounded_and_isolated() -> None:
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    inputs = _correlated_inputs(512, 64, seed=5)
    dead = torch.tensor([3, 17, 40])
    inputs[:, dead] = 0.0
    hessian = _hessian64(inputs).float()
    spec = QuantSpec(bits=3, group_size=-1)
    result = gptq_quantize(weight, hessian, spec)
    rtn = rtn_quantize(weight, spec)
    assert torch.isfinite(result.dequantize()).all()
    # dead columns receive no compensation: they equal round-to-nearest of the original
    assert torch.equal(result.codes[:, dead], rtn.codes[:, dead])
    live_error = reconstruction_error(weight, result.dequantize(), hessian)
    assert live_error < reconstruction_error(weight, rtn.dequantize(), hessian)


def test_dampening_grows_on_failed_cholesky_and_nonfinite_is_rejected() -> None:
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(8))
    vectors = torch.randn(24, 3, generator=torch.Generator().manual_seed(9))
    rank_deficient = vectors @ vectors.T - 1e-3 * torch.eye(24)  # slightly indefinite
    result = gptq_quantize(weight, rank_deficient, QuantSpec(bits=4, group_size=-1, damp_percent=0.0))
    assert result.damp > 0
    assert torch.isfinite(result.dequantize()).all()
    broken = torch.eye(24)
    broken[2, 5] = float("nan")
    with pytest.raises(NonFiniteHessianError):
        gptq_quantize(weight, broken, QuantSpec(bits=4))
    with pytest.raises(CholeskyFailedError):
        gptq_quantize(weight, -1e30 * torch.eye(24), QuantSpec(bits=4))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_codes_zeros_and_scales_are_storable(bits: int, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, group_size=16, symmetric=symmetric)
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(bits))
    weight[0, :16] = weight[0, :16].abs()  # a group starting at 0: zero would be 0
    weight[1, :16] = 0.0  # an all-zero group
    result = rtn_quantize(weight, spec)
    assert int(result.codes.max()) <= spec.max_q
    assert torch.equal(result.scales, result.scales.half().float())
    assert int(result.zeros.min()) >= 1 and int(result.zeros.max()) <= spec.max_q  # v1 qzeros store z-1
    if symmetric:
        assert bool((result.zeros == 2 ** (bits - 1)).all())
    # round-to-nearest error bounded by half a step (scales are rounded up to fp16)
    step = result.scales[result.g_idx.long()].T
    assert bool(((result.dequantize() - weight).abs() <= step * 0.5 * (1 + 1e-5) + 1e-6).all())


def test_mse_clip_never_worse_per_row() -> None:
    columns = torch.randn(64, 128, generator=torch.Generator().manual_seed(11))
    columns[:, 0] *= 8  # outliers make clipping worthwhile
    plain = QuantSpec(bits=3)
    clipped = QuantSpec(bits=3, mse_clip=True, clip_norm=2.0)
    plain_error = (find_grid(columns, plain).fake_quantize(columns, 7) - columns).pow(2).sum(1)
    clip_error = (find_grid(columns, clipped).fake_quantize(columns, 7) - columns).pow(2).sum(1)
    assert bool((clip_error <= plain_error + 1e-6).all())
    assert float(clip_error.sum()) < 0.95 * float(plain_error.sum())


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(InvalidQuantSpecError):
        QuantSpec(bits=5)
    with pytest.raises(InvalidQuantSpecError):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), QuantSpec())
