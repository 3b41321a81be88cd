"""The native CPU int4 GEMM (kernels/int4_native.c) against float64 references built from
the codes themselves, on fresh random inputs with the output poisoned before each run; how
quant_matmul routes to it; its build and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inlaid.kernels import quant_cpu
from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.int4_native import int4pack_mm, native_int4_available, native_int4_unavailable_reason
from inlaid.kernels.quant_linear import PreparedQuantLinear, QuantLinearError
from inlaid.kernels.testing import GPTQLayer, random_gptq_layer

pytestmark = pytest.mark.skipif(not native_int4_available(),
                                reason=f"native int4 kernel not built here: {native_int4_unavailable_reason()}")

CASES = [  # (K, N, bits, group size, act order): K = 600 is padded to 608 by the layout
    (576, 192, 4, 64, False), (576, 3072, 4, 64, False), (1536, 576, 4, 128, True),
    (600, 64, 4, 32, True), (256, 128, 3, 32, False), (384, 64, 2, -1, False),
]
ROWS = (1, 2, 3, 4, 5, 6, 7, 13, 64, 130)  # the in-register route (<= 4 rows) and the slab route


def layout_float64(layer: GPTQLayer, prepared: PreparedQuantLinear) -> torch.Tensor:
    """W [K_pad, N] in the layout's sorted-K order, float64, from the layer's own codes and the
    layout's bf16 scales and zeros: (q + shift - 8) * scale + zero per kernel group (the
    kernel's inputs; nothing read back from the packed bytes); padding rows are zero."""
    layout = prepared.layout
    perm = prepared.input_perm if prepared.input_perm is not None else torch.arange(layer.codes.shape[0])
    shift = 8 - 2 ** (layer.weights.bits - 1)
    codes = (layer.codes[perm] + shift - 8).double()
    codes = torch.cat([codes, torch.zeros(layout.pad, codes.shape[1], dtype=torch.float64)])
    pairs = layout.scales_and_zeros.double().repeat_interleave(layout.kernel_group, dim=0)
    weight = codes * pairs[..., 0] + pairs[..., 1]
    weight[codes.shape[0] - layout.pad:] = 0.0
    return weight


def padded_input(x: torch.Tensor, prepared: PreparedQuantLinear) -> torch.Tensor:
    if prepared.input_perm is not None:
        x = x[:, prepared.input_perm]
    return torch.nn.functional.pad(x, (0, prepared.layout.pad)).contiguous()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", CASES)
def test_native_kernel_equals_float64_of_its_layout(in_features: int, out_features: int, bits: int,
                                                    group_size: int, act_order: bool) -> None:
    """fp32 accuracy against the exact weight the layout holds, at every row count (both
    routes, K chunk and row block remainders), with a NaN-poisoned output each time."""
    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order,
                              seed=in_features * 7 + out_features + bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.kind == "int4" and prepared.layout.dequantizable
    weight = layout_float64(layer, prepared)
    for m in ROWS:
        x = padded_input(torch.randn(m, in_features), prepared)
        out = torch.full((m, out_features), float("nan"))
        got = int4pack_mm(x, prepared.layout, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert relative_error(got, x.double() @ weight) < 1e-5, m


@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", CASES)
def test_the_layouts_scales_zeros_and_order_are_the_checkpoints(in_features: int, out_features: int, bits: int,
                                                                 group_size: int, act_order: bool) -> None:
    """layout_float64 reads the layout's scales, zeros and input order, which prepare_int4
    made: here they are checked against the checkpoint's own (scales[g] * (codes - zeros[g]),
    float64, in the original input order), within the bf16 rounding of a scale and a zero."""
    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order,
                              seed=in_features * 7 + out_features + bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    in_layout_order = layout_float64(layer, prepared)[:in_features]
    perm = prepared.input_perm if prepared.input_perm is not None else torch.arange(in_features)
    assert sorted(perm.tolist()) == list(range(in_features))
    weight = torch.empty_like(in_layout_order)
    weight[perm] = in_layout_order
    assert relative_error(weight, layer.dense_float64()) < 5e-3  # 1.7e-3 measured; a wrong order: 1.4


def test_native_kernel_threads_split_columns_without_changing_a_bit() -> None:
    layer = random_gptq_layer(576, 960, 4, 64, seed=11)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    for m in (3, 17):
        x = padded_input(torch.randn(m, 576), prepared)
        one = int4pack_mm(x, prepared.layout, threads=1)
        for threads in (2, 3, 64):
            assert torch.equal(int4pack_mm(x, prepared.layout, threads=threads), one), (m, threads)


def test_quant_matmul_takes_the_native_kernel_between_its_bounds() -> None:
    """Below native_min_m torch's kernel (bf16 activations: ~1e-3 from the layout's exact
    result), from it up to dense_min_m the native kernel (fp32: ~1e-7), with bias and
    act-order handled by quant_matmul, in x's dtype; every row count of a decode batch (from
    1 row) takes the native kernel in the engine where the dot-product kernel does not build
    (turned off here; its own routing: test_kernels_int4_dot.py)."""
    layer = random_gptq_layer(576, 192, 4, 64, act_order=True, bias=True, seed=3)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    prepared.few_rows_dot = False
    assert prepared.native_min_m == quant_cpu.NATIVE_MIN_ROWS < prepared.dense_min_m
    prepared.native_min_m = 3  # a bound with rows on both sides (the engine's is 1: every M)
    weight = layout_float64(layer, prepared)
    for m in (1, 2, 3, 40):
        x = torch.randn(m, 576)
        want = padded_input(x, prepared).double() @ weight + layer.weights.bias.double()
        error = relative_error(quant_matmul(x, prepared), want)
        assert (error < 1e-5) == (m >= prepared.native_min_m), (m, error)
        assert quant_matmul(x.bfloat16(), prepared).dtype == torch.bfloat16


def test_native_kernel_refuses_what_it_cannot_read() -> None:
    layer = random_gptq_layer(256, 128, 4, 64, seed=2)
    layout = prepare_quant_linear(layer.weights, "cpu", torch.float32).layout
    x = torch.randn(4, 256)
    with pytest.raises(QuantLinearError, match="float32"):
        int4pack_mm(x.bfloat16(), layout)
    with pytest.raises(QuantLinearError, match=r"\[M, 256\]"):
        int4pack_mm(torch.randn(4, 200), layout)
    with pytest.raises(QuantLinearError, match="contiguous"):
        int4pack_mm(torch.randn(256, 4).T, layout)
    with pytest.raises(QuantLinearError, match="out must be"):
        int4pack_mm(x, layout, out=torch.empty(4, 64))
    narrow = prepare_quant_linear(random_gptq_layer(256, 48, 4, 64, seed=5).weights, "cpu", torch.float32)
    assert narrow.native_min_m == sys.maxsize  # 48 columns: no whole 64-column block
    with pytest.raises(QuantLinearError, match="N % 64"):
        int4pack_mm(x, narrow.layout)


def test_native_kernel_builds_into_its_cache_and_can_be_switched_off(tmp_path: Path) -> None:
    """A fresh cache dir gets one library (built, then found); INLAID_NATIVE_INT4=0 turns the
    kernel off and quant_matmul falls back to torch's kernel at every row count."""
    probe = ("from inlaid.kernels.int4_native import native_int4_available as a, native_int4_unavailable_reason as r;"
             "from inlaid.kernels import quant_cpu, dispatch; from inlaid.kernels.testing import random_gptq_layer;"
             "import torch; p = dispatch.prepare_quant_linear(random_gptq_layer(256, 64, 4, 64).weights, 'cpu',"
             " torch.float32); print(a(), p.native_min_m, p.dense_min_m, r())")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "INLAID_NATIVE_DIR": str(tmp_path)}
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=root,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[:2] == ["True", str(quant_cpu.NATIVE_MIN_ROWS)]
        assert len(list(tmp_path.glob("int4_native-*.so"))) == 1
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=300,
                            env={**env, "INLAID_NATIVE_INT4": "0"})
    assert result.returncode == 0, result.stderr
    available, native_min_m, dense_min_m, *reason = result.stdout.split()
    assert (available, native_min_m) == ("False", str(sys.maxsize)) and "INLAID_NATIVE_INT4=0" in " ".join(reason)
    assert int(dense_min_m) in (quant_cpu.DENSE_MIN_ROWS, sys.maxsize)


def test_layout_binding_is_made_once_and_follows_replaced_tensors() -> None:
    """quant_matmul binds a layout to the kernel on its first call and reuses the binding; a
    layout whose tensors are replaced (a layer handed over) is bound again, never computed
    with the old pointers."""
    from inlaid.kernels.int4_native import NativeInt4Weight

    layer = random_gptq_layer(576, 192, 4, 64, seed=8)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    prepared.few_rows_dot = False  # the native kernel's binding (the dot kernel's: test_kernels_int4_dot.py)
    x = torch.randn(3, 576)
    first = quant_matmul(x, prepared)
    binding = prepared.layout._native
    assert isinstance(binding, NativeInt4Weight) and binding.bound_to(prepared.layout)
    assert torch.equal(quant_matmul(x, prepared), first) and prepared.layout._native is binding
    other = prepare_quant_linear(random_gptq_layer(576, 192, 4, 64, seed=9).weights, "cpu", torch.float32)
    other.few_rows_dot = False
    prepared.layout.packed, prepared.layout.scales_and_zeros = other.layout.packed, other.layout.scales_and_zeros
    assert not binding.bound_to(prepared.layout)
    torch.testing.assert_close(quant_matmul(x, prepared), quant_matmul(x, other), rtol=0, atol=0)
    assert prepared.layout._native is not binding


@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", CASES)
def test_native_dequantization_is_bit_identical_to_torchs(in_features: int, out_features: int, bits: int,
                                                           group_size: int, act_order: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 route's weight, dequantized by the kernel in one pass, equals the one torch's
    ops (unpack, subtract, addcmul) give, bit for bit, on every shape; the output buffer is
    NaN-poisoned first."""
    from inlaid.kernels import int4_native

    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order, seed=21)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    if not prepared.layout.dequantizable:
        pytest.skip("N % 64 != 0: no bf16 route")
    k_pad = prepared.layout.packed.shape[1] * 2
    native = int4_native.native_weight(prepared.layout).dequantize_bf16(
        torch.full((k_pad, out_features), float("nan"), dtype=torch.bfloat16))
    monkeypatch.setattr(int4_native, "native_int4_available", lambda: False)
    torchs = quant_cpu.dequantize_int4pack(prepared.layout)
    assert torch.equal(native.view(torch.int16), torchs.view(torch.int16))


def test_prompt_rows_take_the_bf16_route_from_their_own_bound() -> None:
    """quant_matmul(prefill=True) takes the bf16 route from prefill_dense_min_m rows (bf16
    activations: ~1e-3 from the exact result), decode rows only from dense_min_m; a
    projection's decode rows give the same bits whether or not prompt rows share the call
    (LoraLinear splits them), and the prompt rows what the prefill route gives them alone. The
    fewer rows on the fp32 kernel here (the dot-product kernel's: test_kernels_int4_dot.py)."""
    from inlaid.engine.lora import LoraLinear

    layer = random_gptq_layer(576, 192, 4, 64, seed=13)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    prepared.few_rows_dot = False
    if prepared.dense_min_m == sys.maxsize:
        pytest.skip("no native bf16 on this CPU: no bf16 route")
    assert prepared.native_min_m <= 1 and prepared.prefill_dense_min_m < prepared.dense_min_m
    prepared.prefill_dense_min_m = 20
    weight = layout_float64(layer, prepared)
    prompt = torch.randn(24, 576)
    exact = padded_input(prompt, prepared).double() @ weight
    assert relative_error(quant_matmul(prompt, prepared), exact) < 1e-5  # decode rows: native
    assert 1e-5 < relative_error(quant_matmul(prompt, prepared, prefill=True), exact) < 1e-2  # bf16 route
    assert relative_error(quant_matmul(prompt[:19], prepared, prefill=True), exact[:19]) < 1e-5  # below its bound
    decode = torch.randn(5, 576)
    mixed = LoraLinear._quantized_matmul(torch.cat([decode, prompt]), prepared, prompt_rows_start=5)
    assert torch.equal(mixed[:5], quant_matmul(decode, prepared))
    assert torch.equal(mixed[5:], quant_matmul(prompt, prepared, prefill=True))
    alone = LoraLinear._quantized_matmul(decode, prepared, prompt_rows_start=None)
    assert torch.equal(alone, mixed[:5])


@pytest.mark.parametrize("route", ["torch kernel", "native", "dot", "bf16 route"])
def test_quant_matmul_writes_its_result_into_out(route: str) -> None:
    """quant_matmul(out=...) returns `out` holding exactly what the call without it returns
    (bias included; the fp32 kernels write into it, the bf16 routes' results are converted
    into it), on every route, `out` NaN-poisoned first; the result is also checked against the
    float64 product of the layout (the bf16 routes round x and the weight: ~1e-3). A wrong
    `out` is refused before anything is written."""
    from inlaid.kernels.int4_dot import dot_kernel_fits

    layer = random_gptq_layer(576, 192, 4, 64, act_order=True, bias=True, seed=41)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    prepared.few_rows_dot = route == "dot"
    prepared.native_min_m = 1 if route == "native" else sys.maxsize
    if route == "dot" and not dot_kernel_fits(prepared.layout):
        pytest.skip("the dot-product kernel does not build here")
    if route == "bf16 route":
        prepared.dense_min_m = 1
    weight = layout_float64(layer, prepared)
    for m in (1, 7, 33):
        x = torch.randn(m, 576)
        want = quant_matmul(x, prepared)
        out = torch.full((m, 192), float("nan"))
        got = quant_matmul(x, prepared, out=out)
        assert got is out and torch.equal(out, want), (route, m)
        exact = padded_input(x, prepared).double() @ weight + layer.weights.bias.double()
        assert relative_error(out, exact) < (1e-5 if route == "native" else 1e-2), (route, m)
    x = torch.randn(4, 576)
    for wrong in (torch.zeros(4, 191), torch.zeros(4, 192, dtype=torch.float64), torch.zeros(192, 4).t()):
        before = wrong.clone()
        with pytest.raises(QuantLinearError, match="out must be"):
            quant_matmul(x, prepared, out=wrong)
        assert torch.equal(wrong, before)
