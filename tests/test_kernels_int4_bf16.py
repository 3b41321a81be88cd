"""The bf16 int4 GEMM for prompt rows (kernels/int4_bf16.c), each back-end this machine has (AMX
tiles, AVX512-BF16 dot products), against float64 products of its bf16 operands, built from the
codes themselves, on fresh random inputs with the output poisoned before each run; how
quant_matmul routes prompt rows to it; its refusals."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels import int4_bf16, quant_cpu
from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.int4_bf16 import (BACKENDS, bf16_kernel_available, bf16_kernel_backends,
                                      bf16_kernel_unavailable_reason, int4pack_mm_bf16)
from inlaid.kernels.quant_linear import PreparedQuantLinear, QuantLinearError
from inlaid.kernels.testing import GPTQLayer, random_gptq_layer
from test_kernels_int4_native import layout_float64, padded_input, relative_error

pytestmark = pytest.mark.skipif(not bf16_kernel_available(),
                                reason=f"no bf16 kernel here: {bf16_kernel_unavailable_reason()}")
BACKENDS_HERE = bf16_kernel_backends()

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


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", CASES)
def test_bf16_kernel_equals_float64_of_its_bf16_operands(in_features: int, out_features: int, bits: int,
                                                        group_size: int, act_order: bool, backend: str) -> None:
    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order,
                              seed=in_features * 5 + out_features + bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert int4_bf16.bf16_kernel_fits(prepared.layout)
    for m in ROWS:
        x = torch.randn(m, in_features)
        x_operand, weight = bf16_operands(layer, prepared, x)
        kernel_input = quant_cpu._kernel_input(x, prepared.layout, prepared.input_perm, torch.float32)
        out = torch.full((m, out_features), float("nan"))
        got = int4pack_mm_bf16(kernel_input, prepared.layout, out=out, backend=backend)
        assert got.data_ptr() == out.data_ptr()
        assert relative_error(got, x_operand @ weight) < 1e-5, m


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bf16_kernel_writes_every_row_and_column_it_owns(backend: str) -> None:
    """Called directly (no wrapper), on a NaN-poisoned output (16-row multiples for AMX; any rows
    for the dot products: the 6-row passes' remainders), split between threads: every element
    written, every split giving the same bits."""
    layer = random_gptq_layer(576, 960, 4, 64, seed=21)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    library = int4_bf16._load()[0]
    layout = prepared.layout
    for m in (16, 48, 96) if backend == "amx" else (1, 5, 6, 7, 13, 48, 97):
        x = torch.randn(m, 576).bfloat16()
        results = []
        for threads in (1, 2, 3, 64):
            y = torch.full((m, 960), float("nan"))
            status = library.inlaid_int4pack_mm_bf16(x.data_ptr(), layout.packed.data_ptr(),
                                                     layout.scales_and_zeros.data_ptr(), y.data_ptr(), m, 576, 960,
                                                     layout.kernel_group, threads, BACKENDS[backend])
            assert status == 0 and torch.isfinite(y).all(), (m, threads)
            results.append(y)
        assert all(torch.equal(y, results[0]) for y in results[1:]), m
        x_operand, weight = bf16_operands(layer, prepared, x.float())
        assert relative_error(results[0], x_operand @ weight) < 1e-5


def test_prompt_rows_take_the_bf16_kernel_from_its_bound() -> None:
    """quant_matmul(prefill=True) takes the bf16 kernel (its preferred back-end) from
    PREFILL_BF16_KERNEL_MIN_ROWS prompt rows (bias and act order handled around it, x's dtype
    back), the fp32 native kernel below; decode rows keep the fp32 kernel at the same row counts
    (the dot-product kernel turned off here: with it, prompt rows start later on AVX512-BF16,
    test_kernels_int4_dot.py)."""
    layer = random_gptq_layer(1536, 576, 4, 128, act_order=True, bias=True, seed=23)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.prefill_dense_min_m == quant_cpu.prefill_dense_min_rows(prepared.layout)
    prepared.few_rows_dot = False
    prepared.prefill_dense_min_m = quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS
    assert prepared.prefill_dense_min_m < prepared.dense_min_m
    bias = layer.weights.bias.double()
    for m in (quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS - 1, quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS, 40):
        x = torch.randn(m, 1536)
        x_operand, weight = bf16_operands(layer, prepared, x)
        prompt = quant_matmul(x, prepared, prefill=True)
        decode = quant_matmul(x, prepared)
        assert prompt.dtype == torch.float32
        bf16_error = relative_error(prompt, x_operand @ weight + bias)
        assert (bf16_error < 1e-5) == (m >= quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS), (m, bf16_error)
        assert relative_error(decode, x_operand @ weight + bias) > 1e-5  # fp32 activations: not the bf16 product
    x = torch.randn(20, 1536)
    kernel_input = quant_cpu._kernel_input(x, prepared.layout, prepared.input_perm, torch.float32)
    assert torch.equal(quant_matmul(x, prepared, prefill=True),
                       int4pack_mm_bf16(kernel_input, prepared.layout) + layer.weights.bias)


def test_bf16_kernel_refuses_what_it_cannot_take() -> None:
    layer = random_gptq_layer(256, 128, 4, 64, seed=2)
    layout = prepare_quant_linear(layer.weights, "cpu", torch.float32).layout
    with pytest.raises(QuantLinearError, match=r"\[M, 256\]"):
        int4pack_mm_bf16(torch.randn(4, 200), layout)
    with pytest.raises(QuantLinearError, match="floating"):
        int4pack_mm_bf16(torch.ones(4, 256, dtype=torch.int32), layout)
    with pytest.raises(QuantLinearError, match="out must be"):
        int4pack_mm_bf16(torch.randn(4, 256), layout, out=torch.empty(4, 64))
    with pytest.raises(QuantLinearError, match="no 'tpu' back-end"):
        int4pack_mm_bf16(torch.randn(4, 256), layout, backend="tpu")
    narrow = prepare_quant_linear(random_gptq_layer(256, 48, 4, 64, seed=5).weights, "cpu", torch.float32)
    assert not int4_bf16.bf16_kernel_fits(narrow.layout)  # 48 columns: no whole 64-column block
    with pytest.raises(QuantLinearError, match="cannot take this layout"):
        int4pack_mm_bf16(torch.randn(4, 256), narrow.layout)
    library = int4_bf16._load()[0]
    y = torch.full((17, 128), float("nan"))
    x = torch.randn(17, 256).bfloat16()
    refused = [(0, 256, 128, 64, "avx512-bf16"), (16, 250, 128, 50, "avx512-bf16"), (16, 256, 100, 64, "avx512-bf16"),
               (16, 256, 128, 3, "avx512-bf16"), (17, 256, 128, 64, "amx")]  # AMX: 16-row multiples only
    for m, k, n, group, backend in refused:
        if backend not in BACKENDS_HERE:
            continue
        status = library.inlaid_int4pack_mm_bf16(x.data_ptr(), layout.packed.data_ptr(),
                                                 layout.scales_and_zeros.data_ptr(), y.data_ptr(), m, k, n, group, 1,
                                                 BACKENDS[backend])
        assert status == -1, (m, k, n, group, backend)
    for backend_code in (0, 3):  # not a back-end
        assert library.inlaid_int4pack_mm_bf16(x.data_ptr(), layout.packed.data_ptr(),
                                               layout.scales_and_zeros.data_ptr(), y.data_ptr(), 16, 256, 128, 64,
                                               1, backend_code) == -1
    built = library.inlaid_int4_bf16_backends()
    for name, code in BACKENDS.items():
        if not built & code:  # a back-end this build lacks
            assert library.inlaid_int4pack_mm_bf16(x.data_ptr(), layout.packed.data_ptr(),
                                                   layout.scales_and_zeros.data_ptr(), y.data_ptr(), 16, 256, 128,
                                                   64, 1, code) == -2, name
    assert torch.isnan(y).all()  # nothing written


def _in_fresh_process(environment: dict[str, str]) -> tuple[str, str, int]:
    """(the back-ends, why not the others, prompt rows' bf16 bound) in a fresh process."""
    import os
    import subprocess
    import sys

    code = ("import torch; from inlaid.kernels import int4_bf16, quant_cpu; "
            "from inlaid.kernels.dispatch import prepare_quant_linear; "
            "from inlaid.kernels.testing import random_gptq_layer; "
            "p = prepare_quant_linear(random_gptq_layer(576, 192, 4, 64, seed=1).weights, 'cpu', torch.float32); "
            "print(','.join(int4_bf16.bf16_kernel_backends()) or '-'); print(int4_bf16.bf16_kernel_unavailable_reason()); "
            "print(p.prefill_dense_min_m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **environment})
    assert result.returncode == 0, result.stderr
    backends, reason, bound = result.stdout.strip().split("\n")
    return backends, reason, int(bound)


def test_bf16_switch_turns_it_off() -> None:
    """INLAID_NATIVE_BF16=0: no back-end, prompt rows back on the bf16 route's oneDNN GEMM from
    its own bound."""
    backends, reason, bound = _in_fresh_process({"INLAID_NATIVE_BF16": "0"})
    assert backends == "-" and "INLAID_NATIVE_BF16=0" in reason
    assert bound == quant_cpu.PREFILL_DENSE_MIN_ROWS_NATIVE


def test_amx_switch_turns_only_amx_off() -> None:
    """INLAID_NATIVE_AMX=0: the AVX512-BF16 back-end alone where this CPU has it (nothing else)."""
    backends, reason, bound = _in_fresh_process({"INLAID_NATIVE_AMX": "0"})
    assert "amx" not in backends.split(",")
    if "avx512-bf16" in BACKENDS_HERE:  # the dot-product kernel serves the rows below it
        assert backends == "avx512-bf16" and bound == quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS_AFTER_DOT
    else:
        assert backends == "-" and bound == quant_cpu.PREFILL_DENSE_MIN_ROWS_NATIVE
    if "amx" in BACKENDS_HERE:
        assert "INLAID_NATIVE_AMX=0" in reason
