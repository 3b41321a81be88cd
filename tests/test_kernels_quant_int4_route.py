"""The CPU int4 route of low-bit GEMM: int4pack unpacking, the many-rows dequantize route, kernel groups and K padding."""

from __future__ import annotations

import sys

import pytest
import torch

from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.quant_linear import QuantLinearError
from inlaid.kernels.testing import random_gptq_layer
from test_kernels_quant import reference, relative_error


def test_int4pack_bytes_unpack_to_the_codes() -> None:
    """unpack_int4pack reads torch's CPU int4pack layout back into the codes it was given, for
    several block counts (the many-rows route stands on it), into a poisoned buffer."""
    from inlaid.kernels import quant_cpu

    assert quant_cpu.int4pack_layout_is_known()
    for n, k in ((64, 32), (192, 576), (960, 64)):
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        out = torch.full((k, n), 255, dtype=torch.uint8)
        assert torch.equal(quant_cpu.unpack_int4pack(packed, n, k, out=out).to(torch.int32), codes.T)


MANY_ROWS_CASES = [  # (K, N, bits, group size, act order): K = 600 pads inside the route
    (576, 192, 4, 128, False), (576, 64, 3, 64, True), (1536, 128, 4, -1, False),
    (600, 64, 4, 32, True), (256, 64, 2, 32, False),
]


@pytest.mark.parametrize("in_features,out_features,bits,group_size,act_order", MANY_ROWS_CASES)
def test_int4_many_rows_route_matches_reference(in_features: int, out_features: int, bits: int,
                                                group_size: int, act_order: bool) -> None:
    """From dense_min_m rows on, the int4 path dequantizes the int4pack bytes to bf16 and runs a
    bf16 GEMM: equal to the float64 reference within bf16 rounding (of the weights too), and to
    the int4 kernel on the same rows; the reused weight buffer is poisoned before every call."""
    from inlaid.kernels import quant_cpu

    from inlaid.kernels.dense_cpu import native_bf16

    layer = random_gptq_layer(in_features, out_features, bits, group_size, act_order=act_order,
                              bias=act_order, seed=in_features + out_features + bits)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    # Switched on where the CPU has native bf16 only (emulated bf16 is slower than the kernel),
    # from more rows where the native kernel serves the rows below; its results are checked everywhere.
    below = quant_cpu.DENSE_MIN_ROWS_NATIVE if prepared.native_min_m < sys.maxsize else quant_cpu.DENSE_MIN_ROWS
    assert prepared.kind == "int4" and prepared.dense_min_m == (below if native_bf16() else sys.maxsize)
    prepared.dense_min_m = quant_cpu.DENSE_MIN_ROWS
    for m in (prepared.dense_min_m, 130, 257):
        for buffers in quant_cpu._scratch.__dict__.get("weights", {}).values():
            buffers[0].fill_(255)
            buffers[1].fill_(float("nan"))
        x = torch.randn(m, in_features)
        out = quant_matmul(x, prepared)
        assert out.shape == (m, out_features) and out.dtype == torch.float32
        assert relative_error(out, reference(layer, x)) < 1e-2, m
        kernel = quant_cpu.int4_matmul(x, prepared.layout, prepared.input_perm).float()
        if prepared.bias is not None:
            kernel += prepared.bias
        assert relative_error(out, kernel.double()) < 1e-2, m
    prepared.dense_min_m = prepared.native_min_m = 10**9  # torch's kernel on the same rows: a switch only
    assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < 1e-2


def test_int4_many_rows_route_needs_whole_column_blocks() -> None:
    """N % 64 != 0: no route (the int4pack layout's blocks are 64 columns), the kernel at every M."""
    from inlaid.kernels import quant_cpu

    layer = random_gptq_layer(256, 48, 4, 64, seed=5)
    prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    assert prepared.kind == "int4" and not prepared.layout.dequantizable
    x = torch.randn(200, 256)
    assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < 1e-2
    with pytest.raises(QuantLinearError, match="no dequantize route"):
        quant_cpu.int4_dequant_matmul(x, prepared.layout, None)


def test_int4_kernel_group_divides_k_and_the_checkpoint_group() -> None:
    from inlaid.kernels.quant_cpu import kernel_group_for

    assert kernel_group_for(128, 576) == (64, 0)  # 576 = 9 x 64: no padding, scales repeated twice
    assert kernel_group_for(576, 576) == (64, 0)  # one group spanning K
    assert kernel_group_for(128, 1536) == (128, 0)
    assert kernel_group_for(1536, 1536) == (256, 0)
    assert kernel_group_for(128, 600) == (32, 8)  # no kernel group divides K = 600: pad to 608
    assert kernel_group_for(48, 576) is None  # no kernel group fits inside a 48-row group


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_k_off_the_kernel_grid_pads_inside_the_int4_route(bits: int, group_size: int) -> None:
    """K = 600 (4-bit packs it; no int4 kernel group divides it): the int4 route pads K with
    zero input columns internally; the checkpoint tensors stay as they were."""
    layer = random_gptq_layer(600, 32, bits, group_size, act_order=group_size == 128, seed=11 + bits)
    stored = layer.weights.qweight.clone()
    if bits == 4:
        prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32)
        assert prepared.kind == "int4" and prepared.layout.pad == 8
    else:
        prepared = prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="dequant")
    x = torch.randn(5, 600)
    assert relative_error(quant_matmul(x, prepared), reference(layer, x)) < (1e-2 if bits == 4 else 1e-5)
    assert torch.equal(layer.weights.qweight, stored)
