"""The tiled Triton GEMM's compile-time variants (kernels/quant_triton.py): UNPACK_ONCE (each
packed word of a K tile loaded once, unpacked in registers, reshaped to [BLOCK_K, BLOCK_N]) x
FACTORED (the dot on raw codes, the group's scale and zero after it). Every combination,
interpreted on the CPU, against a float64 reference built from the unpacked codes themselves
(`GPTQLayer.dense_float64`, never from the unpacking under test), written into a NaN-filled
output, on fresh random layers and inputs (the seed is in every failure message)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from inlaid.kernels.interpret import enable_triton_interpreter

INTERPRETED_HERE = enable_triton_interpreter()
if INTERPRETED_HERE:
    from inlaid.kernels import quant_triton
from inlaid.kernels.dispatch import prepare_quant_linear
from inlaid.kernels.testing import random_gptq_layer

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED_HERE, reason="triton already loaded in compiled mode: run in a child process"
)

VARIANTS = [{"unpack_once": u, "factored": f} for u, f in itertools.product((0, 1), repeat=2)]
VARIANT_IDS = [f"unpack{v['unpack_once']}-factored{v['factored']}" for v in VARIANTS]

# (K, N, group size, act order, config override, rows). The tiled kernel only (dense_min_m
# out of reach); N = 96 leaves a masked column block at block_n 64.
CASES = [
    # default configs: M = 3 and 16 the decode config (BLOCK_M 16), 33 the prefill one (BLOCK_M 64)
    (192, 96, 64, True, {}, (3, 16, 33)),
    # split-K (atomics) over 16-row tiles: one packed word a tile at 2-/3-bit, both halves of
    # a 3-bit top-bit word
    (192, 64, 64, False, {"block_k": 16, "block_n": 32, "split_k": 3}, (5,)),
    # 96 = 1.5 tiles of 64: the second (short) group's tile is masked past K, split-K
    (96, 32, 64, True, {"block_k": 64, "split_k": 2}, (3, 33)),
    # one group over K = 160: 2.5 tiles of 64, the last one masked
    (160, 32, -1, False, {"block_k": 64, "block_n": 32}, (17,)),
    # SmolLM2's K = 576 at group 128 (4.5 groups): _block_k_for takes 64, two tiles a group
    (576, 32, 128, True, {}, (3,)),
]
# 4- and 8-bit only (K = 600 packs neither 2- nor 3-bit): no tile dividing group 128 divides
# K, so _block_k_for's own 128 leaves a masked 88-row tail
TAIL_CASE = (600, 32, 128, True, {}, (3,))


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def run_poisoned(x: torch.Tensor, layer, prepared, **config: int) -> torch.Tensor:  # noqa: ANN001
    """The tiled kernel written into a NaN-filled output: every element must be overwritten."""
    out = torch.full((x.shape[0], layer.weights.out_features), float("nan"), dtype=x.dtype)
    got = quant_triton.triton_quant_matmul(x, prepared.layout, prepared.bits, prepared.input_perm, 10**9,
                                           out=out, **config)
    assert got.data_ptr() == out.data_ptr()
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double() - want).norm() / want.norm())


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_triton_interp_variants_match_float64(bits: int, variant: dict[str, int]) -> None:
    cases = CASES + ([TAIL_CASE] if bits in (4, 8) else [])
    for in_features, out_features, group_size, act_order, config, rows in cases:
        seed = fresh_seed()
        layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order, seed=seed)
        prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
        assert (prepared.input_perm is not None) == act_order
        weight = layer.dense_float64()
        for m in rows:
            x = torch.randn(m, in_features)
            error = relative_error(run_poisoned(x, layer, prepared, **variant, **config), x.double() @ weight)
            # fp32 sums (ieee dot): up to 4e-7 measured, factored 8-bit (x . q - zero * sum(x) cancels)
            assert error < 5e-6, (in_features, group_size, act_order, config, m, seed, error)


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_triton_interp_variants_fp16_activations(variant: dict[str, int]) -> None:
    """8-bit codes (up to 255: exact in fp16 for the factored dot), scales and zeros stored in
    fp16; against float64 of the fp16 activations. (Not bf16: the interpreter's tl.dot on
    bf16 tiles returns garbage, the default tiled kernel's included.)"""
    seed = fresh_seed()
    layer = random_gptq_layer(128, 64, 8, 64, act_order=True, seed=seed)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float16, mode="triton")
    x = torch.randn(5, 128).to(torch.float16)
    out = run_poisoned(x, layer, prepared, **variant, split_k=2)
    assert out.dtype == torch.float16
    # scales rounded to fp16 (and the dequantized weight too, unless factored), the output too
    assert relative_error(out, x.double() @ layer.dense_float64()) < 3e-3, seed


@needs_interpreter
def test_triton_interp_variant_options_reach_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """unpack_once / factored / num_stages overrides become the tiled kernel's constexprs and
    launch options; without them the kernel runs as before (both off, Triton's num_stages)."""
    launched: list[dict] = []

    class Spy:
        def __init__(self, kernel) -> None:  # noqa: ANN001
            self.kernel = kernel

        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                keys = ("UNPACK_ONCE", "FACTORED", "num_stages", "num_warps")
                launched.append({key: kwargs.get(key) for key in keys})
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(quant_triton, "_quant_gemm_kernel", Spy(quant_triton._quant_gemm_kernel))
    layer = random_gptq_layer(64, 32, 4, 32, seed=fresh_seed())
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="triton")
    x = torch.randn(4, 64)
    for override, expected in (({}, (False, False, None, 4)),
                               ({"unpack_once": 1, "num_stages": 3}, (True, False, 3, 4)),
                               ({"factored": 1, "num_warps": 8}, (False, True, None, 8))):
        launched.clear()
        assert relative_error(run_poisoned(x, layer, prepared, **override), x.double() @ layer.dense_float64()) < 5e-6
        assert [tuple(launch.values()) for launch in launched] == [expected], override


def test_default_configs_leave_the_variants_off() -> None:
    """The defaults switch only after a GPU measurement: no default names either option."""
    from inlaid.kernels.quant_triton import default_gemm_config

    for m in (1, 2, 4, 16, 17, 33, 128):
        for k, group in ((4096, 128), (576, 128), (11008, 128)):
            config = default_gemm_config(m, 4096, k, group, torch.device("cpu"))
            assert not config.get("unpack_once") and not config.get("factored") and "num_stages" not in config


def test_triton_interp_in_child_process() -> None:
    """Where triton was already imported in compiled mode, interpret the kernels in a child."""
    if INTERPRETED_HERE:
        pytest.skip("the interpreted tests ran in this process")
    from inlaid.kernels.testing import check_interpreted_in_child

    check_interpreted_in_child(str(Path(__file__)))
