"""Low-bit weight-only GEMM on GPTQ layers: every CPU path (int4, dequant, dense) and the
Triton kernels (interpreted on the CPU) against a float64 reference built from the codes
themselves (never from the unpacking under test), on fresh random inputs."""

from __future__ import annotations

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


def triton_poisoned(x: torch.Tensor, prepared, **config: int) -> torch.Tensor:
    """The Triton path written into a NaN-filled output: every element must be overwritten."""
    out = torch.full((x.shape[0], prepared.out_features), float("nan"), dtype=x.dtype)
    got = quant_triton.triton_quant_matmul(x, prepared.layout, prepared.bits, prepared.input_perm,
                                           prepared.dense_min_m, out=out, **config)
    assert got.data_ptr() == out.data_ptr()
    return out if prepared.bias is None else out + prepared.bias


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
    for m in (1, 5, 33):
        x = torch.randn(m, 128)
        out = torch.full((m, 64), float("nan"))  # poisoned: every element must be written
        assert quant_matmul(x, prepared, out=out) is out
        assert relative_error(out, reference(layer, x)) < 1e-6


@pytest.mark.parametrize("mode", ["auto", "dense", "dequant", "triton"])
def test_no_rows_give_an_empty_result_on_every_path(mode: str) -> None:
    """M = 0 (a step whose rows all take another route): a [0, N] result in x's dtype."""
    if mode == "triton" and not INTERPRETED_HERE:
        pytest.skip("triton already loaded in compiled mode")
    layer = random_gptq_layer(256, 64, 4, 32, bias=True, seed=3)
    for dtype in (torch.float32,) if mode == "triton" else (torch.float32, torch.bfloat16):
        prepared = prepare_quant_linear(layer.weights, "cpu", dtype, mode=mode)
        out = quant_matmul(torch.randn(0, 256).to(dtype), prepared)
        assert out.shape == (0, 64) and out.dtype == dtype, (mode, dtype)


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
    # group 64 over K = 96 makes ceil(96 / 64) = 2 groups (the last one 32 rows): one row of
    # zeros/scales is one too few
    too_few_groups = QuantLinearWeights(w.qweight, w.qzeros[:1], w.scales[:1], None, 4, 64, 96, 32)
    with pytest.raises(QuantLinearError, match=r"qzeros must be torch.int32 \(2, 4\)"):
        prepare_quant_linear(too_few_groups, "cpu", torch.float32)
    with pytest.raises(QuantLinearError, match="group_size must be positive or -1"):
        prepare_quant_linear(QuantLinearWeights(w.qweight, w.qzeros, w.scales, None, 4, 0, 96, 32),
                             "cpu", torch.float32)
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
    # M=1, 2: GEMV kernel; 3, 16: tiled decode config (split-K atomics); 33: tiled GEMM; 48:
    # dequant kernel + matmul
    for m in (1, 2, 3, 16, 33, 48):
        x = torch.randn(m, 128)
        assert relative_error(triton_poisoned(x, prepared), reference(layer, x)) < 1e-5, m


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
    prepared.dense_min_m = 10**9
    out = triton_poisoned(x, prepared, **config)
    assert relative_error(out, reference(layer, x)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("config", [
    {"gemv": 1, "block_n": 32, "block_k": 16, "split_k": 1},  # 3-bit: top bits from both halves of a word
    {"gemv": 1, "block_n": 64, "block_k": 32, "split_k": 3},
    {"gemv": 1, "block_n": 128, "block_k": 128, "split_k": 2},  # 576 = 4.5 tiles of 128: a masked tail
    {"gemv": 0, "block_m": 16, "block_n": 32, "block_k": 32, "split_k": 2},  # the tiled kernel at GEMV sizes
])
def test_triton_interp_gemv_configs(bits: int, config: dict[str, int]) -> None:
    """Three GEMV tiles and the tiled kernel, act-order, a K that its groups do not tile (576
    at group 128 is 4.5 groups: the last tile is masked at block_k 128; 3-bit at block_k 16
    reads one 32-bit top-bit word for two 16-code words), every row of M = 1 and 4 (past
    GEMV_MAX_M: the kernel takes any M) exact against float64."""
    layer = random_gptq_layer(576, 96, bits, 128, symmetric=bits == 3, act_order=True, bias=True, seed=bits + 31)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    for m in (1, 4):
        x = torch.randn(m, 576)
        assert relative_error(triton_poisoned(x, prepared, **config), reference(layer, x)) < 1e-5, m


@needs_interpreter
def test_decode_rows_take_the_gemv_kernel_unless_a_tile_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to GEMV_MAX_M rows the GEMV kernel runs; an override naming a tiled-kernel tile
    (block_m) or gemv=0 runs the tiled kernel with a full tile config (BLOCK_M 16 at least)."""
    launched: list[tuple[str, int | None]] = []

    class Spy:
        def __init__(self, name: str, kernel) -> None:  # noqa: ANN001
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                launched.append((self.name, kwargs.get("BLOCK_M")))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(quant_triton, "_quant_gemv_kernel", Spy("gemv", quant_triton._quant_gemv_kernel))
    monkeypatch.setattr(quant_triton, "_quant_gemm_kernel", Spy("tiled", quant_triton._quant_gemm_kernel))
    layer = random_gptq_layer(128, 64, 4, 32, seed=14)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    for m, override, expected in ((quant_triton.GEMV_MAX_M, {}, ("gemv", None)),
                                  (quant_triton.GEMV_MAX_M + 1, {}, ("tiled", 16)),
                                  (1, {"block_m": 16, "block_n": 32}, ("tiled", 16)),
                                  (1, {"gemv": 0}, ("tiled", 16))):
        launched.clear()
        x = torch.randn(m, 128)
        assert relative_error(triton_poisoned(x, prepared, **override), reference(layer, x)) < 1e-5
        assert launched == [expected], (m, override)


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
    from inlaid.kernels.testing import check_interpreted_in_child

    check_interpreted_in_child(str(Path(__file__)))


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


# ------------------------------------------- groups that do not tile K (SmolLM2: K = 576)
# G = ceil(K / group_size) groups, the last one shorter: K = 576 at group 128 is 4.5 groups.
# K = 1536 is tiled by 32 and 128; -1 is one group over K.

RAGGED_SHAPES = [(576, 32), (576, 128), (576, -1), (1536, 32), (1536, 128), (1536, -1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features,group_size", RAGGED_SHAPES)
def test_groups_not_tiling_k_on_every_cpu_path(in_features: int, group_size: int, bits: int) -> None:
    for act_order in (False, True):
        layer = random_gptq_layer(in_features, 64, bits, group_size, act_order=act_order, bias=act_order,
                                  seed=in_features + 7 * bits + group_size % 89 + act_order)
        modes = ["dense", "dequant"] + (["int4", "auto"] if bits <= 4 else ["auto"])
        for mode in modes:
            prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode=mode)
            if mode == "auto":  # the int4 kernel takes every layer it can hold
                assert prepared.kind == ("int4" if bits <= 4 else "dequant")
            for m in (1, 9):
                x = torch.randn(m, in_features)
                # int4: bf16 activations; the others sum K products in float32
                bound = 1e-2 if prepared.kind == "int4" else 1e-5
                assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < bound, (mode, act_order, m)


@needs_interpreter
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features,group_size", RAGGED_SHAPES)
def test_triton_interp_groups_not_tiling_k(in_features: int, group_size: int, bits: int) -> None:
    act_order = bits in (3, 4)
    layer = random_gptq_layer(in_features, 32, bits, group_size, symmetric=bits == 2, act_order=act_order,
                              bias=True, seed=3 * in_features + bits + group_size % 83)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    prepared.dense_min_m = 24
    # M = 1: the GEMV kernel; 17: tiled GEMM (at K = 576: the interpreter is slow); 24:
    # dequant kernel + matmul
    for m in (1, 17, 24) if in_features == 576 else (1, 24):
        x = torch.randn(m, in_features)
        assert relative_error(triton_poisoned(x, prepared), reference(layer, x)) < 1e-5, m


@needs_interpreter
@pytest.mark.parametrize("bits", [4, 8])
def test_triton_interp_masks_a_k_tail(bits: int) -> None:
    """K = 600 with group 128: no K tile dividing the group divides K, the last tile is masked
    (in the GEMV, the GEMM and the dequantization kernel, each into a poisoned buffer)."""
    layer = random_gptq_layer(600, 32, bits, 128, act_order=True, seed=bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    assert prepared.layout.in_features == 600
    for m, dense_min_m in ((1, 10**9), (3, 10**9), (3, 1)):
        prepared.dense_min_m = dense_min_m
        x = torch.randn(m, 600)
        assert relative_error(triton_poisoned(x, prepared), reference(layer, x)) < 1e-5
    poisoned = torch.full((600, 32), float("nan"))
    weight = quant_triton.dequantize_triton(prepared.layout, bits, torch.float32, out=poisoned)
    sorted_rows = prepared.input_perm if prepared.input_perm is not None else torch.arange(600)
    torch.testing.assert_close(weight.double(), layer.dense_float64()[sorted_rows], rtol=0, atol=1e-6)
