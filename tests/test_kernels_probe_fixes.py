"""Regression tests for what an outside probe found (each failed before its fix):

* the CPU masked LoRA route (`lora_apply(..., stacked_a=...)` without `compact`) read the pools'
  padding past each rank and ignored `slot_ranks` (garbage there changed y, NaN made it NaN,
  a rank-0 slot still added its LoRA);
* the compact route multiplied an unused slot's columns by a 0 mask (0 x NaN = NaN: one
  non-finite weight in a loaded slot no token uses turned every row NaN);
* the Triton quantized GEMM divided by zero on an empty batch (M = 0);
* `quant_matmul` took an integer x and returned a truncated integer result.

Every check is against the float64 reference (kernels/lora_reference.py, the GPTQ layer's own
float64 weight) on fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels.interpret import enable_triton_interpreter

# As tests/test_kernels_quant.py: interpreted Triton where this process still can be. The
# tests below launch no kernel (an empty batch returns before any launch), so they hold in a
# process where triton was already imported in compiled mode too.
enable_triton_interpreter()
from inlaid.kernels import lora_cpu  # noqa: E402
from inlaid.kernels.dispatch import (  # noqa: E402
    build_compact_pools,
    lora_apply,
    lora_host_segments,
    prepare_quant_linear,
    quant_matmul,
)
from inlaid.kernels.lora_compact_cpu import lora_apply_compact  # noqa: E402
from inlaid.kernels.lora_reference import lora_expand_reference, lora_shrink_reference  # noqa: E402
from inlaid.kernels.quant_linear import QuantLinearError  # noqa: E402
from inlaid.kernels.testing import LoraCase, random_gptq_layer, random_lora_case, stacked_pools  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.fixture(autouse=True)
def _torch_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's routes, as without the native kernel (fp16/bf16 pools never take it anyway)."""
    monkeypatch.setattr(lora_cpu, "USE_NATIVE", False)


def _reference(case: LoraCase, y_before: torch.Tensor) -> torch.Tensor:
    v = lora_shrink_reference(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    return lora_expand_reference(y_before, v, case.b_pools, case.slice_offsets, case.segment_starts,
                                 case.segment_slots, case.slot_ranks, case.slot_scales)


def _assert_matches(case: LoraCase, y_before: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> None:
    want = _reference(case, y_before)
    got = y.double()
    assert torch.isfinite(got).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    untouched = want == y_before.double()  # no adapter (slot -1, or rank 0 on that slice): bit-identical
    assert torch.equal(got[untouched], y_before.double()[untouched])


def _poison_padding(pool: torch.Tensor, ranks: list[int], rank_dim: int, value: str, gen: torch.Generator) -> None:
    """Overwrite each slot's entries past its rank (rank_dim: 1 for A [S, R, K], 2 for B
    [S, N, R]) with NaN or with large finite garbage."""
    for slot, rank in enumerate(ranks):
        pad = pool[slot, rank:] if rank_dim == 1 else pool[slot, :, rank:]
        if value == "nan":
            pad.fill_(float("nan"))
        else:
            pad.copy_((torch.randn(pad.shape, generator=gen) * 300).to(pool.dtype))


# (requests [(slot, tokens)], ranks [n_slices][S], K, widths, R_max): decode-sized steps of
# several adapters, mixed ranks, a slot with rank 0 on one slice (3) and on all of them (4).
MASKED_SHAPES = {
    "three_slices": ([(0, 1), (1, 2), (3, 1), (-1, 1), (4, 1), (2, 1), (5, 1)],
                     [[8, 16, 4, 0, 0, 16], [16, 4, 8, 8, 0, 2], [2, 8, 16, 16, 0, 8]], 40, [32, 16, 24], 16),
    "one_slice_full_and_zero": ([(1, 1), (2, 1), (0, 2)], [[32, 0, 32]], 24, [8], 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("poison", ["garbage", "nan"])
@pytest.mark.parametrize("b_layout", ["engine", "contiguous"])
@pytest.mark.parametrize("shape", sorted(MASKED_SHAPES))
def test_masked_route_never_reads_padding_and_honours_rank_zero(
    dtype: torch.dtype, poison: str, b_layout: str, shape: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`lora_apply(..., stacked_a=...)` without compact pools: whatever lies past each slot's
    rank (finite garbage, NaN) must not change y, and a rank-0 slot adds nothing."""
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", 10**9)
    taken: list[int] = []
    real = getattr(lora_cpu, "compact_step_pools", None)
    monkeypatch.setattr(lora_cpu, "compact_step_pools", lambda *args: (taken.append(1), real(*args))[1], raising=False)
    requests, ranks, k, widths, r_max = MASKED_SHAPES[shape]
    gen = torch.Generator().manual_seed(7)
    for seed in range(2):
        case = random_lora_case(requests, ranks, k, widths, r_max, dtype=dtype, seed=seed + 31 * len(shape))
        stacked, a_views, b_views = stacked_pools(case, zero_padding=False)
        for i, (a, b) in enumerate(zip(a_views, b_views)):
            _poison_padding(a, ranks[i], 1, poison, gen)
            _poison_padding(b, ranks[i], 2, poison, gen)
        if b_layout == "contiguous":  # [S, N, R] storage: the native kernel never takes it
            b_views = [b.contiguous() for b in b_views]
        segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, len(ranks[0]))
        assert segments.masked_path
        y = torch.randn((case.num_tokens, sum(widths)), generator=gen).to(dtype)
        y_before = y.clone()
        lora_apply(y, case.x, a_views, b_views, case.slice_offsets, case.segment_starts, case.segment_slots,
                   case.slot_ranks, case.slot_scales, segments=segments, stacked_a=stacked)
        _assert_matches(case, y_before, y, dtype)
        # The same without prebuilt segments (lora_apply builds them and checks the metadata).
        y2 = y_before.clone()
        lora_apply(y2, case.x, a_views, b_views, case.slice_offsets, case.segment_starts, case.segment_slots,
                   case.slot_ranks, case.slot_scales, stacked_a=stacked)
        assert torch.equal(y2, y)
    assert taken or dtype == torch.float16  # float16 runs per adapter in float32 (test_kernels_lora_wide.py)


@pytest.mark.parametrize("half", ["a", "b"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_route_ignores_non_finite_weights_of_unused_slots(
    half: str, value: float, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loaded slot that no token of the step uses is never read into y: a NaN or inf in its
    A or B leaves every row finite and equal to the reference."""
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", 10**9)
    monkeypatch.setattr(lora_cpu, "COMPACT_MIN_ACTIVE_SHARE", 0.0)
    taken: list[int] = []
    monkeypatch.setattr(lora_cpu, "lora_apply_compact", lambda *args: (taken.append(1), lora_apply_compact(*args)))
    ranks = [[4, 8, 4, 2, 8], [8, 4, 0, 4, 4]]
    requests = [(0, 1), (3, 2), (-1, 1), (1, 1), (3, 1)]  # slots 2 and 4 loaded, not used
    for seed, unused in ((0, 2), (1, 4)):
        case = random_lora_case(requests, ranks, 32, [16, 8], 8, dtype=dtype, seed=seed)
        stacked, _, b_views = stacked_pools(case)  # clean padding: only the unused slot is bad
        if half == "a":  # slice 0's first row of the slot: within its rank (ranks[0][unused] > 0)
            stacked[unused, 0, 0] = value
        else:
            b_views[0][unused, 0, 0] = value
        compact = build_compact_pools(stacked, b_views, case.slot_ranks, case.slot_scales)
        assert not compact.finite  # the copy saw it: the safe form of the route runs
        segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 5)
        y = torch.randn((case.num_tokens, 24)).to(dtype)
        y_before = y.clone()
        lora_apply(y, case.x, case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts,
                   case.segment_slots, case.slot_ranks, case.slot_scales, segments=segments, compact=compact)
        _assert_matches(case, y_before, y, dtype)
    assert len(taken) == 2


# ------------------------------------------------------------------------ quantized GEMM

@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_quant_gemm_of_an_empty_batch(bits: int, dtype: torch.dtype) -> None:
    """M = 0: an empty [0, N] in x's dtype, as every CPU path returns (no kernel launch, so
    this holds in a compiled-mode process as well)."""
    layer = random_gptq_layer(64, 32, bits, 32, bias=True, seed=bits)
    x = torch.randn(0, 64).to(dtype)
    for mode in ("triton", "dequant", "dense"):
        prepared = prepare_quant_linear(layer.weights, "cpu", dtype, mode=mode)
        got = quant_matmul(x, prepared)
        assert got.shape == (0, 32) and got.dtype == dtype, mode
        out = torch.empty(0, 32, dtype=dtype)
        assert quant_matmul(x, prepared, out=out) is out


def test_triton_lora_kernels_with_no_tokens() -> None:
    """T = 0 in the Triton SGMV launchers: nothing to do, nothing launched."""
    from inlaid.kernels import lora_triton

    case = random_lora_case([(0, 0), (1, 0)], [[4, 8]], 32, [16], 8, seed=3)
    v = torch.empty(1, 0, 8)
    assert lora_triton.sgmv_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots,
                                   case.slot_ranks, v) is v
    y = torch.empty(0, 16)
    lora_triton.sgmv_expand(y, v, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                            case.slot_ranks, case.slot_scales)


@pytest.mark.parametrize("mode", ["auto", "dequant", "dense", "triton"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_quant_matmul_refuses_non_floating_x(mode: str, dtype: torch.dtype) -> None:
    """An integer x was multiplied and truncated to an integer result; it is refused with the
    checks' error type (QuantLinearError, a ValueError) naming the dtype."""
    layer = random_gptq_layer(64, 32, 4, 32, seed=11)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode=mode)
    x = torch.ones(2, 64, dtype=dtype)
    with pytest.raises(QuantLinearError, match=str(dtype).replace("torch.", "")):
        quant_matmul(x, prepared)


def test_float64_x_keeps_its_dtype_at_the_routes_precision() -> None:
    """Documented in quant_matmul: float64 in, float64 out; exact on dequant prepared for
    float64, the int4 route's bf16 precision on the default CPU path."""
    layer = random_gptq_layer(128, 64, 4, 32, seed=12)
    x = torch.randn(3, 128, dtype=torch.float64)
    want = x @ layer.dense_float64()
    exact = quant_matmul(x, prepare_quant_linear(layer.weights, "cpu", torch.float64, mode="dequant"))
    assert exact.dtype == torch.float64
    assert float((exact - want).norm() / want.norm()) < 1e-12
    default = quant_matmul(x, prepare_quant_linear(layer.weights, "cpu", torch.float32))
    assert default.dtype == torch.float64
    assert float((default - want).norm() / want.norm()) < 1e-2
