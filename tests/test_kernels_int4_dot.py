"""The int4 dot-product kernel for few rows (kernels/int4_dot.c) against float64 products of x
rounded to bf16 and the exact weight (built from the layer's codes, nothing read back from the
packed bytes), on fresh random inputs with the output poisoned before each run; rows independent
of the batch; how quant_matmul routes decode and prompt rows to it; its refusals and switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inlaid.kernels import int4_dot, quant_cpu
from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.int4_dot import DotInt4Weight, dot_kernel_available, dot_kernel_unavailable_reason, int4pack_mm_dot
from inlaid.kernels.quant_linear import QuantLinearError
from inlaid.kernels.testing import random_gptq_layer
from test_kernels_int4_native import layout_float64, padded_input, relative_error

pytestmark = pytest.mark.skipif(not dot_kernel_available(),
                                reason=f"no dot-product kernel here: {dot_kernel_unavailable_reason()}")

CASES = [  # (K, N, bits, group size, act order): K = 600 is padded to 608 by the layout
    (576, 192, 4, 64, False), (576, 3072, 4, 128, False), (1536, 576, 4, 128, True),
    (600, 64, 4, 32, True), (256, 320, 3, 32, False), (384, 64, 2, -1, False),
]
ROWS = (1, 2, 7, 8, 9, 16, 17, 40)  # one pass of 8 rows, its remainders, several passes


def exact_product(x: torch.Tensor, layer, prepared) -> torch.Tensor:
    """float64 bf16(x) @ W: x permuted, padded and rounded to bf16 as the kernel does; W the
    exact weight the layout holds (never rounded)."""
    return padded_input(x, prepared).bfloat16().double() @ layout_float64(layer, prepared)


@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", CASES)
def test_dot_kernel_equals_float64_of_bf16_x_and_the_exact_weight(in_features: int, out_features: int, bits: int,
                                                                 group_size: int, act_order: bool) -> None:
    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order,
                              seed=in_features * 7 + out_features + bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert int4_dot.dot_kernel_fits(prepared.layout)
    for m in ROWS:
        x = torch.randn(m, in_features)
        kernel_input = quant_cpu._kernel_input(x, prepared.layout, prepared.input_perm, torch.float32)
        out = torch.full((m, out_features), float("nan"))
        got = int4pack_mm_dot(kernel_input, prepared.layout, out=out)
        assert got.data_ptr() == out.data_ptr()
        want = exact_product(x, layer, prepared)
        assert relative_error(got, want) < 1e-5, m
        # x's rounding is the kernel's only one: against fp32 activations it is bf16's error
        assert 1e-4 < relative_error(got, padded_input(x, prepared).double() @ layout_float64(layer, prepared)) < 1e-2


def test_rows_do_not_depend_on_the_batch_and_threads_split_the_columns() -> None:
    """Each row's bits are what it gets alone (a decode token's result does not depend on the
    sequences beside it), for every split between threads; nothing left unwritten."""
    layer = random_gptq_layer(576, 960, 4, 64, seed=31)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    x = torch.randn(19, 576)
    alone = torch.cat([int4pack_mm_dot(x[i:i + 1].contiguous(), prepared.layout) for i in range(19)])
    for threads in (1, 2, 3, 64):
        out = torch.full((19, 960), float("nan"))
        assert torch.equal(int4pack_mm_dot(x, prepared.layout, threads=threads, out=out), alone), threads


def halfway_values(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """float32 [m, k] of either sign whose low 16 bits are, in turn: exactly halfway with the
    kept bit even, halfway with it odd, just above halfway, just below."""
    bits = torch.randint(0x3F000000, 0x40800000, (m, k), dtype=torch.int64, generator=generator)
    low = torch.tensor([0x8000, 0x18000, 0x8001, 0x7FFF])[torch.arange(m * k).view(m, k) % 4]
    x = ((bits & ~0x1FFFF) | low).to(torch.int32).view(torch.float32)
    return (x * torch.where(torch.rand(m, k, generator=generator) < 0.5, -1.0, 1.0)).contiguous()


def test_x_is_rounded_to_nearest_even_as_torch_rounds_it() -> None:
    """Values halfway between two bf16 numbers (both parities of the kept bit), just above and
    below halfway: the kernel's product equals the one with torch's bf16 rounding of x."""
    layer = random_gptq_layer(256, 64, 4, 32, seed=4)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    x = halfway_values(4, 256, torch.Generator().manual_seed(3))
    got = int4pack_mm_dot(x, prepared.layout)
    assert relative_error(got, exact_product(x, layer, prepared)) < 1e-6


def test_kernel_reads_the_int4pack_bytes_as_documented() -> None:
    """Called directly on hand-made bytes (K = 34 with group 2: a K no layout has, and an x whose
    size is no multiple of 16, the conversion's tail, made of halfway values) against a float64
    reading of the layout documented at the top of int4_dot.c."""
    generator = torch.Generator().manual_seed(5)
    k, n, group, m = 34, 128, 2, 3
    packed = torch.randint(0, 256, (n // 64, k, 32), dtype=torch.uint8, generator=generator)
    scales_and_zeros = (torch.rand(k // group, n, 2, generator=generator) - 0.5).bfloat16()
    x = halfway_values(m, k, generator)
    codes = torch.empty(k, n, dtype=torch.float64)
    for block in range(n // 64):
        codes[:, block * 64: block * 64 + 32] = (packed[block] & 15).double()
        codes[:, block * 64 + 32: block * 64 + 64] = (packed[block] >> 4).double()
    scale = scales_and_zeros[..., 0].double().repeat_interleave(group, 0)
    zero = scales_and_zeros[..., 1].double().repeat_interleave(group, 0)
    want = x.bfloat16().double() @ ((codes - 8) * scale + zero)
    y = torch.full((m, n), float("nan"))
    library = int4_dot._load()[0]
    status = library.inlaid_int4pack_mm_dot(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(),
                                            y.data_ptr(), m, k, n, group, 1)
    assert status == 0 and relative_error(y, want) < 1e-5


def test_quant_matmul_routes_few_rows_to_it() -> None:
    """Decode rows below dense_min_m and prompt rows below prefill_dense_min_m take the kernel
    (bias and act order handled around it, x's dtype back); prompt rows from their bound take
    the bf16 route, whose weight is rounded to bf16 (not the kernel's exact one)."""
    from inlaid.kernels.int4_bf16 import bf16_kernel_backend

    layer = random_gptq_layer(1536, 576, 4, 128, act_order=True, bias=True, seed=23)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.few_rows_dot
    if bf16_kernel_backend() == "avx512-bf16":
        assert prepared.prefill_dense_min_m == quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS_AFTER_DOT
    bias = layer.weights.bias.double()
    for m in (1, 8, prepared.prefill_dense_min_m - 1, prepared.prefill_dense_min_m):
        x = torch.randn(m, 1536)
        want = exact_product(x, layer, prepared) + bias
        decode = quant_matmul(x, prepared)
        assert decode.dtype == torch.float32 and relative_error(decode, want) < 1e-5, m
        prompt_error = relative_error(quant_matmul(x, prepared, prefill=True), want)
        assert (prompt_error < 1e-5) == (m < prepared.prefill_dense_min_m), (m, prompt_error)
        assert quant_matmul(x.bfloat16(), prepared).dtype == torch.bfloat16
    x = torch.randn(5, 1536)
    kernel_input = quant_cpu._kernel_input(x, prepared.layout, prepared.input_perm, torch.float32)
    assert torch.equal(quant_matmul(x, prepared), int4pack_mm_dot(kernel_input, prepared.layout) + layer.weights.bias)


def test_layout_binding_is_made_once_and_follows_replaced_tensors() -> None:
    layer = random_gptq_layer(576, 192, 4, 64, seed=8)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    x = torch.randn(3, 576)
    first = quant_matmul(x, prepared)
    binding = prepared.layout._dot
    assert isinstance(binding, DotInt4Weight) and binding.bound_to(prepared.layout)
    assert torch.equal(quant_matmul(x, prepared), first) and prepared.layout._dot is binding
    other = prepare_quant_linear(random_gptq_layer(576, 192, 4, 64, seed=9).weights, "cpu", torch.float32)
    prepared.layout.packed, prepared.layout.scales_and_zeros = other.layout.packed, other.layout.scales_and_zeros
    assert not binding.bound_to(prepared.layout)
    assert torch.equal(quant_matmul(x, prepared), quant_matmul(x, other))
    assert prepared.layout._dot is not binding


def test_dot_kernel_refuses_what_it_cannot_take() -> None:
    layer = random_gptq_layer(256, 128, 4, 64, seed=2)
    layout = prepare_quant_linear(layer.weights, "cpu", torch.float32).layout
    x = torch.randn(4, 256)
    with pytest.raises(QuantLinearError, match="float32"):
        int4pack_mm_dot(x.bfloat16(), layout)
    with pytest.raises(QuantLinearError, match=r"\[M, 256\]"):
        int4pack_mm_dot(torch.randn(4, 200), layout)
    with pytest.raises(QuantLinearError, match="contiguous"):
        int4pack_mm_dot(torch.randn(256, 4).T, layout)
    with pytest.raises(QuantLinearError, match="out must be"):
        int4pack_mm_dot(x, layout, out=torch.empty(4, 64))
    narrow = prepare_quant_linear(random_gptq_layer(256, 48, 4, 64, seed=5).weights, "cpu", torch.float32)
    assert not narrow.few_rows_dot  # 48 columns: no whole 64-column block
    with pytest.raises(QuantLinearError, match="N % 64"):
        int4pack_mm_dot(x, narrow.layout)
    library = int4_dot._load()[0]
    y = torch.full((4, 128), float("nan"))
    for m, k, n, group in ((0, 256, 128, 64), (4, 256, 100, 64), (4, 256, 128, 3), (4, 250, 128, 64), (4, 256, 128, 0)):
        status = library.inlaid_int4pack_mm_dot(x.data_ptr(), layout.packed.data_ptr(),
                                                layout.scales_and_zeros.data_ptr(), y.data_ptr(), m, k, n, group, 1)
        assert status == -1, (m, k, n, group)
    assert torch.isnan(y).all()  # nothing written


def test_switch_turns_it_off() -> None:
    """INLAID_NATIVE_INT4_DOT=0 in a fresh process: no kernel, few rows back on the fp32 kernel,
    prompt rows on the bf16 kernel from its own bound."""
    code = ("import torch; from inlaid.kernels import int4_dot, quant_cpu; "
            "from inlaid.kernels.dispatch import prepare_quant_linear; "
            "from inlaid.kernels.testing import random_gptq_layer; "
            "p = prepare_quant_linear(random_gptq_layer(576, 192, 4, 64, seed=1).weights, 'cpu', torch.float32); "
            "print(int4_dot.dot_kernel_available(), p.few_rows_dot, p.prefill_dense_min_m); "
            "print(int4_dot.dot_kernel_unavailable_reason())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "INLAID_NATIVE_INT4_DOT": "0"})
    assert result.returncode == 0, result.stderr
    first, reason = result.stdout.strip().split("\n")
    available, few_rows_dot, bound = first.split()
    assert available == "False" and few_rows_dot == "False" and "INLAID_NATIVE_INT4_DOT=0" in reason
    assert int(bound) in (quant_cpu.PREFILL_BF16_KERNEL_MIN_ROWS, quant_cpu.PREFILL_DENSE_MIN_ROWS_NATIVE)

