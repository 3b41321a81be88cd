"""The AMX int4 GEMM for prompt rows (kernels/int4_amx.c) against float64 products of its bf16
operands, built from the codes themselves, on fresh random inputs with the output poisoned
before each run; how quant_matmul routes prompt rows to it; its refusals."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels import int4_amx, quant_cpu
from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.int4_amx import amx_available, amx_unavailable_reason, int4pack_mm_amx
from inlaid.kernels.quant_linear import PreparedQuantLinear, QuantLinearError
from inlaid.kernels.testing import GPTQLayer, random_gptq_layer
from test_kernels_int4_native import layout_float64, padded_input, relative_error

pytestmark = pytest.mark.skipif(not amx_available(), reason=f"no AMX kernel here: {amx_unavailable_reason()}")

CASES = [  # (K, N, bits, group size, act order): K = 600 is padded to 608 by the layout
    (576, 192, 4, 64, False), (576, 3072, 4, 64, False), (1536, 576, 4, 128, True),
    (600, 64, 4, 32, True), (256, 320, 3, 32, False), (384, 64, 2, -1, False),
]
ROWS = (1, 15, 16, 17, 32, 33, 64, 130)  # one tile of rows, padded ones, 32-row pairs and a 16-row remainder


def bf16_operands(layer: GPTQLayer, prepared: PreparedQuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, W) as the kernel multiplies them, float64: x permuted, padded and rounded to bf16;
    W the exact weight the layout holds (`layout_float64`: from the layer's own codes, nothing
    read back from the packed bytes) rounded once to fp32, as the kernel's sum is, then to bf16."""
    weight = layout_float64(layer, prepared).float().bfloat16().double()
    return padded_input(x, prepared).bfloat16().double(), weight


@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", CASES)
def test_amx_kernel_equals_float64_of_its_bf16_operands(in_features: int, out_features: int, bits: int,
                                                       group_size: int, act_order: bool) -> None:
    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order,
                              seed=in_features * 5 + out_features + bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert int4_amx.amx_fits(prepared.layout)
    for m in ROWS:
        x = torch.randn(m, in_features)
        x_operand, weight = bf16_operands(layer, prepared, x)
        kernel_input = quant_cpu._kernel_input(x, prepared.layout, prepared.input_perm, torch.float32)
        out = torch.full((m, out_features), float("nan"))
        got = int4pack_mm_amx(kernel_input, prepared.layout, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert relative_error(got, x_operand @ weight) < 1e-5, m


def test_amx_kernel_writes_every_row_and_column_it_owns() -> None:
    """Called directly (no wrapper), on a NaN-poisoned output and 16-row multiples, split
    between threads: every element written, every split giving the same bits."""
    layer = random_gptq_layer(576, 960, 4, 64, seed=21)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    library = int4_amx._load()[0]
    layout = prepared.layout
    for m in (16, 48, 96):
        x = torch.randn(m, 576).bfloat16()
        results = []
        for threads in (1, 2, 3, 64):
            y = torch.full((m, 960), float("nan"))
            status = library.inlaid_int4pack_mm_amx(x.data_ptr(), layout.packed.data_ptr(),
                                                    layout.scales_and_zeros.data_ptr(), y.data_ptr(), m, 576, 960,
                                                    layout.kernel_group, threads)
            assert status == 0 and torch.isfinite(y).all(), (m, threads)
            results.append(y)
        assert all(torch.equal(y, results[0]) for y in results[1:]), m
        x_operand, weight = bf16_operands(layer, prepared, x.float())
        assert relative_error(results[0], x_operand @ weight) < 1e-5


def test_prompt_rows_take_the_amx_kernel_from_its_bound() -> None:
    """quant_matmul(prefill=True) takes the AMX kernel from PREFILL_AMX_MIN_ROWS prompt rows
    (bias and act order handled around it, x's dtype back), the fp32 native kernel below;
    decode rows keep the fp32 kernel at the same row counts."""
    layer = random_gptq_layer(1536, 576, 4, 128, act_order=True, bias=True, seed=23)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.prefill_dense_min_m == quant_cpu.PREFILL_AMX_MIN_ROWS < prepared.dense_min_m
    bias = layer.weights.bias.double()
    for m in (quant_cpu.PREFILL_AMX_MIN_ROWS - 1, quant_cpu.PREFILL_AMX_MIN_ROWS, 40):
        x = torch.randn(m, 1536)
        x_operand, weight = bf16_operands(layer, prepared, x)
        prompt = quant_matmul(x, prepared, prefill=True)
        decode = quant_matmul(x, prepared)
        assert prompt.dtype == torch.float32
        amx_error = relative_error(prompt, x_operand @ weight + bias)
        assert (amx_error < 1e-5) == (m >= quant_cpu.PREFILL_AMX_MIN_ROWS), (m, amx_error)
        assert relative_error(decode, x_operand @ weight + bias) > 1e-5  # fp32 activations: not the bf16 product
    x = torch.randn(20, 1536)
    kernel_input = quant_cpu._kernel_input(x, prepared.layout, prepared.input_perm, torch.float32)
    assert torch.equal(quant_matmul(x, prepared, prefill=True),
                       int4pack_mm_amx(kernel_input, prepared.layout) + layer.weights.bias)


def test_amx_kernel_refuses_what_it_cannot_take() -> None:
    layer = random_gptq_layer(256, 128, 4, 64, seed=2)
    layout = prepare_quant_linear(layer.weights, "cpu", torch.float32).layout
    with pytest.raises(QuantLinearError, match=r"\[M, 256\]"):
        int4pack_mm_amx(torch.randn(4, 200), layout)
    with pytest.raises(QuantLinearError, match="floating"):
        int4pack_mm_amx(torch.ones(4, 256, dtype=torch.int32), layout)
    with pytest.raises(QuantLinearError, match="out must be"):
        int4pack_mm_amx(torch.randn(4, 256), layout, out=torch.empty(4, 64))
    narrow = prepare_quant_linear(random_gptq_layer(256, 48, 4, 64, seed=5).weights, "cpu", torch.float32)
    assert not int4_amx.amx_fits(narrow.layout)  # 48 columns: no whole 64-column block
    with pytest.raises(QuantLinearError, match="cannot take this layout"):
        int4pack_mm_amx(torch.randn(4, 256), narrow.layout)
    library = int4_amx._load()[0]
    y = torch.full((17, 128), float("nan"))
    x = torch.randn(17, 256).bfloat16()
    for m, k, n, group in ((17, 256, 128, 64), (16, 250, 128, 50), (16, 256, 100, 64), (16, 256, 128, 3)):
        status = library.inlaid_int4pack_mm_amx(x.data_ptr(), layout.packed.data_ptr(),
                                                layout.scales_and_zeros.data_ptr(), y.data_ptr(), m, k, n, group, 1)
        assert status == -1, (m, k, n, group)
    assert torch.isnan(y).all()  # nothing written


def test_amx_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """INLAID_NATIVE_AMX=0 in a fresh process: no AMX, prompt rows back on the bf16 route's
    oneDNN GEMM from its own bound."""
    import subprocess
    import sys

    code = ("import torch; from inlaid.kernels import int4_amx, quant_cpu; "
            "from inlaid.kernels.dispatch import prepare_quant_linear; "
            "from inlaid.kernels.testing import random_gptq_layer; "
            "p = prepare_quant_linear(random_gptq_layer(576, 192, 4, 64, seed=1).weights, 'cpu', torch.float32); "
            "print(int4_amx.amx_available(), int4_amx.amx_unavailable_reason(), p.prefill_dense_min_m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "INLAID_NATIVE_AMX": "0"})
    assert result.returncode == 0, result.stderr
    available, *reason, bound = result.stdout.split()
    assert available == "False" and "INLAID_NATIVE_AMX=0" in " ".join(reason)
    assert int(bound) == quant_cpu.PREFILL_DENSE_MIN_ROWS_NATIVE
