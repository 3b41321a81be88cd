"""Low-bit weight-only GEMM on GPTQ layers: every CPU path (int4, dequant, dense) and the
Triton kernels (interpreted on the CPU) against a float64 reference built from the codes
themselves (never from the unpacking under test), on fresh random inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inlaid.kernels.interpret import enable_triton_interpreter

INTERPRETED_HERE = enable_triton_interpreter()
if INTERPRETED_HERE:
    from inlaid.kernels import quant_triton
from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.quant_linear import QuantLinearError, QuantLinearWeights
from inlaid.kernels.testing import GPTQLayer, random_gptq_layer

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED_HERE, reason="triton already loaded in compiled mode: run in a child process"
)


def reference(layer: GPTQLayer, x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ layer.dense_float64()
    if layer.weights.bias is not None:
        out += layer.weights.bias.double()
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double() - want).norm() / want.norm())


# ------------------------------------------------------------------------------- CPU paths

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_int4_path_matches_reference(bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    seed = bits * 1000 + group_size % 997 + 10 * symmetric + act_order
    layer = random_gptq_layer(256, 64, bits, group_size, symmetric=symmetric, act_order=act_order,
                              bias=act_order, seed=seed)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.kind == "int4"
    for m in (1, 7):
        x = torch.randn(m, 256)
        out = quant_matmul(x, prepared)
        assert out.shape == (m, 64) and out.dtype == torch.float32
        # bf16 activations inside torch's int4 kernel: ~3e-3 relative error is its rounding
        assert relative_error(out, reference(layer, x)) < 1e-2


@pytest.mark.parametrize("mode", ["dense", "dequant"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_exact_paths_match_reference(mode: str, bits: int, act_order: bool) -> None:
    layer = random_gptq_layer(128, 64, bits, 32, act_order=act_order, bias=True, seed=bits + 50 * act_order)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode=mode)
    x = torch.randn(5, 128)
    assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < 1e-6


def test_bf16_activations_return_bf16() -> None:
    layer = random_gptq_layer(128, 32, 4, 64, seed=3)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.bfloat16)
    x = torch.randn(3, 128)
    out = quant_matmul(x.to(torch.bfloat16), prepared)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference(layer, x)) < 1.5e-2


def test_shapes_the_int4_kernel_refuses_fall_back_to_dequant() -> None:
    layer = random_gptq_layer(64, 40, 4, 32, seed=4)  # N % 16 != 0
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.kind == "dequant"
    x = torch.randn(2, 64)
    assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < 1e-6
    with pytest.raises(QuantLinearError, match="N % 16"):
        prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="int4")


def test_uneven_act_order_groups_use_the_general_path() -> None:
    """A g_idx whose groups are not all group_size rows (legal, unusual) still multiplies right."""
    layer = random_gptq_layer(128, 32, 4, 32, seed=5)
    g_idx = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(5))
    layer.g_idx = g_idx
    layer.weights.g_idx = g_idx.to(torch.int32)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.kind == "dequant"
    x = torch.randn(3, 128)
    assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < 1e-6


def test_bad_layers_raise_clear_errors() -> None:
    layer = random_gptq_layer(96, 32, 4, 32, seed=6)
    w = layer.weights
    bad_group = QuantLinearWeights(w.qweight, w.qzeros[:1], w.scales[:1], None, 4, 64, 96, 32)
    with pytest.raises(QuantLinearError, match="not a multiple of group_size"):
        prepare_quant_linear(bad_group, "cpu", torch.float32)
    with pytest.raises(QuantLinearError, match="qweight must be"):
        prepare_quant_linear(QuantLinearWeights(w.qweight[:-1], w.qzeros, w.scales, None, 4, 32, 96, 32),
                             "cpu", torch.float32)
    with pytest.raises(QuantLinearError, match="bits must be one of"):
        prepare_quant_linear(QuantLinearWeights(w.qweight, w.qzeros, w.scales, None, 5, 32, 96, 32),
                             "cpu", torch.float32)
    prepared = prepare_quant_linear(w, "cpu", torch.float32)
    with pytest.raises(QuantLinearError, match=r"x must be \[M, 96\]"):
        quant_matmul(torch.randn(2, 64), prepared)


# ------------------------------------------------------ Triton kernels under TRITON_INTERPRET=1

@needs_interpreter
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_interp_gemm_matches_reference(bits: int, group_size: int, act_order: bool) -> None:
    layer = random_gptq_layer(128, 64, bits, group_size, symmetric=bits == 3, act_order=act_order,
                              bias=True, seed=bits * 100 + group_size % 97 + act_order)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    prepared.dense_min_m = 48
    # M=1, 16: decode config (split-K atomics); 33: tiled GEMM; 48: dequant kernel + matmul
    for m in (1, 16, 33, 48):
        x = torch.randn(m, 128)
        assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < 1e-5, m


@needs_interpreter
@pytest.mark.parametrize("config", [
    {"block_m": 16, "block_n": 32, "block_k": 32, "split_k": 1},
    {"block_m": 16, "block_n": 64, "block_k": 16, "split_k": 3},
    {"block_m": 32, "block_n": 16, "block_k": 64, "split_k": 2},
])
def test_triton_interp_tile_configs(config: dict[str, int]) -> None:
    layer = random_gptq_layer(256, 64, 4, 64, act_order=True, seed=9)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    x = torch.randn(5, 256)
    out = quant_triton.triton_quant_matmul(x, prepared.layout, 4, prepared.input_perm, 10**9, **config)
    assert layer.weights.bias is None  # the raw launcher adds no bias
    assert relative_error(out, reference(layer, x)) < 1e-5


@needs_interpreter
def test_triton_interp_fp16_activations() -> None:
    layer = random_gptq_layer(128, 64, 3, 32, act_order=True, seed=12)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float16, mode="triton")
    x = torch.randn(4, 128)
    out = quant_matmul(x.to(torch.float16), prepared)
    assert out.dtype == torch.float16
    assert relative_error(out, reference(layer, x)) < 3e-3


def test_triton_interp_in_child_process() -> None:
    """Where triton was already imported in compiled mode, interpret the kernels in a child."""
    if INTERPRETED_HERE:
        pytest.skip("the interpreted tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton_interp", str(Path(__file__))],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("mode", ["int4", "dequant"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fused_slices_equal_the_float64_reference_of_each_slice(mode: str, bits: int) -> None:
    """q|k|v concatenated along N at load time: one call, each slice's columns exact."""
    from inlaid.kernels.dispatch import fuse_quant_slices

    layers = [random_gptq_layer(64, width, bits, 32, bias=(i == 1), seed=10 * bits + i)
              for i, width in enumerate([64, 32, 32])]
    fused = fuse_quant_slices([layer.weights for layer in layers])
    assert fused is not None and fused.out_features == 128
    for seed in range(2):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed))
        got = quant_matmul(x, prepare_quant_linear(fused, "cpu", torch.float32, mode=mode))
        columns = 0
        for layer in layers:
            width = layer.weights.out_features
            assert relative_error(got[:, columns : columns + width], reference(layer, x)) < 1e-2
            columns += width


def test_fusing_refuses_slices_that_cannot_share_a_call() -> None:
    from inlaid.kernels.dispatch import fuse_quant_slices

    plain = random_gptq_layer(64, 32, 4, 32, seed=1).weights
    assert fuse_quant_slices([plain, random_gptq_layer(64, 32, 3, 32, seed=2).weights]) is None
    assert fuse_quant_slices([plain, random_gptq_layer(64, 32, 4, 64, seed=3).weights]) is None
    reordered = random_gptq_layer(64, 32, 4, 32, act_order=True, seed=4).weights
    assert fuse_quant_slices([plain, reordered]) is None
