"""Arguments an outside kernel probe found accepted and then computed wrongly, or written out
of bounds, each now refused with a LoraArgumentError / QuantLinearError before anything is
written (the output poisoned beforehand must come back untouched):

* a negative slice offset: the native LoRA kernel wrote before `y` (heap corruption, exit 134)
  or into the previous row;
* `lora_apply` with `segments=` given read `slot_ranks` unchecked (rank -1 served rank R_max-1,
  1000 rank R_max), and did not check that y and x have the same rows and x the pools' K;
* `lora_expand` truncated an int32 `v`;
* `prepare_quant_linear` with an integer act_dtype truncated the weights and the bias
  (uint8: wrapped), float8 `x` came back float8, a float g_idx was truncated;
* `quant_matmul` of a `mode="triton"` linear on the CPU without the interpreter failed deep in
  Triton ("0 active drivers")."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels import lora_cpu
from inlaid.kernels.dispatch import lora_apply, lora_expand, lora_host_segments, lora_shrink, prepare_quant_linear
from inlaid.kernels.dispatch import quant_matmul
from inlaid.kernels.lora_meta import LoraArgumentError
from inlaid.kernels.lora_native import NativeLoraPools, native_lora_available
from inlaid.kernels.quant_linear import QuantLinearError
from inlaid.kernels.testing import random_gptq_layer, random_lora_case, stacked_pools

WIDTHS = [16, 8]


def _case():  # type: ignore[no-untyped-def]
    return random_lora_case([(0, 2), (1, 3), (-1, 1)], [[8, 4], [4, 8]], 24, WIDTHS, 8, seed=5)


def _apply(case, y, x=None, offsets=None, ranks=None, **options) -> None:  # type: ignore[no-untyped-def]
    lora_apply(y, case.x if x is None else x, case.a_pools, case.b_pools,
               case.slice_offsets if offsets is None else offsets, case.segment_starts, case.segment_slots,
               case.slot_ranks if ranks is None else ranks, case.slot_scales, **options)


@pytest.mark.parametrize("native_route", [False, True])
def test_lora_apply_refuses_bad_shapes_offsets_and_ranks_with_segments_too(monkeypatch, native_route) -> None:
    monkeypatch.setattr(lora_cpu, "USE_NATIVE", native_route)
    case = _case()
    segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 2)
    for options in ({}, {"segments": segments}):
        y = torch.full((case.num_tokens, sum(WIDTHS)), float("nan"))
        bad = [
            (dict(ranks=torch.full_like(case.slot_ranks, -1)), "slot_ranks must lie in"),  # served rank R_max - 1
            (dict(ranks=case.slot_ranks + 100), "slot_ranks must lie in"),
            (dict(offsets=[-1, 16]), "does not fit y"),
            (dict(offsets=[0, 20]), "does not fit y"),
            (dict(x=case.x[:, :20]), "pools' K"),
        ]
        for arguments, words in bad:
            with pytest.raises(LoraArgumentError, match=words):
                _apply(case, y, **arguments, **options)
        with pytest.raises(LoraArgumentError, match="same T|pools' K"):
            _apply(case, torch.full((case.num_tokens + 2, sum(WIDTHS)), float("nan")), **options)
        assert torch.isnan(y).all()  # nothing written by a refused call
        y.zero_()
        _apply(case, y, **options)  # the good call still runs
        assert torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.skipif(not native_lora_available(), reason="the native LoRA kernel is not built here")
def test_native_pools_refuse_a_negative_slice_offset() -> None:
    case = _case()
    stacked, _, b_views = stacked_pools(case)
    with pytest.raises(LoraArgumentError, match="slice_offsets must be >= 0"):
        NativeLoraPools(stacked, b_views, [-1, 16], case.slot_ranks, case.slot_scales)


def test_lora_expand_refuses_a_v_that_is_not_float32() -> None:
    case = _case()
    v = lora_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    y = torch.zeros(case.num_tokens, sum(WIDTHS))
    for bad_v in (v.to(torch.int32), v.half()):
        with pytest.raises(LoraArgumentError, match="v must be float32"):
            lora_expand(y, bad_v, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                        case.slot_ranks, case.slot_scales)
    with pytest.raises(LoraArgumentError, match="slot_scales must be floating-point"):
        lora_expand(y, v, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                    case.slot_ranks, case.slot_scales.to(torch.int32))
    assert torch.equal(y, torch.zeros_like(y))


def test_quantized_linears_refuse_activation_dtypes_they_cannot_compute_in() -> None:
    layer = random_gptq_layer(64, 32, 4, 32, bias=True, seed=2)
    for act_dtype in (torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn):
        for mode in ("auto", "dense", "dequant"):
            with pytest.raises(QuantLinearError, match="act_dtype must be one of"):
                prepare_quant_linear(layer.weights, "cpu", act_dtype, mode=mode)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    with pytest.raises(QuantLinearError, match="x must be float32, float16, bfloat16 or float64"):
        quant_matmul(torch.randn(2, 64).to(torch.float8_e4m3fn), prepared)
    fractional = layer.weights.__class__(**{**vars(layer.weights), "g_idx": torch.arange(64) / 32 + 0.7})
    with pytest.raises(QuantLinearError, match="g_idx must be integer"):
        prepare_quant_linear(fractional, "cpu", torch.float32)


def test_triton_mode_on_the_cpu_without_the_interpreter_is_refused_by_name() -> None:
    """A mode="triton" linear on the CPU: its first matmul failed deep in Triton ("0 active
    drivers"); an empty x launches nothing and is still answered. Run in a child process:
    this one may hold the interpreter."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, triton\n"  # imported without TRITON_INTERPRET: the compiled mode
        "from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul\n"
        "from inlaid.kernels.quant_linear import QuantLinearError\n"
        "from inlaid.kernels.testing import random_gptq_layer\n"
        "layer = random_gptq_layer(64, 32, bits=4, group_size=32, seed=0)\n"
        "prepared = prepare_quant_linear(layer.weights, 'cpu', torch.float32, mode='triton')\n"
        "assert quant_matmul(torch.randn(0, 64), prepared).shape == (0, 32)\n"
        "try:\n"
        "    quant_matmul(torch.randn(2, 64), prepared)\n"
        "except QuantLinearError as error:\n"
        "    print('refused:', error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: mode 'triton' runs on CUDA devices, or on CPU tensors with "
                                  "TRITON_INTERPRET=1"), done.stdout


@pytest.mark.parametrize("name, value", [("scales", float("nan")), ("scales", float("inf")), ("bias", float("nan"))])
def test_non_finite_scales_or_bias_are_refused_at_prepare(name: str, value: float) -> None:
    """A NaN scale made its columns' outputs NaN with no word: the checkpoint load refused it,
    a direct caller of prepare_quant_linear did not."""
    layer = random_gptq_layer(64, 32, 4, 32, bias=True, seed=3)
    poisoned = getattr(layer.weights, name).clone()
    poisoned.view(-1)[5] = value
    weights = layer.weights.__class__(**{**vars(layer.weights), name: poisoned})
    for mode in ("auto", "dense", "dequant"):
        with pytest.raises(QuantLinearError, match=f"{name} hold NaN or infinite values"):
            prepare_quant_linear(weights, "cpu", torch.float32, mode=mode)
    prepare_quant_linear(layer.weights, "cpu", torch.float32)  # the finite layer still prepares
