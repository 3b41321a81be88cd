"""The native CPU int4 GEMM (int4_native.c): built on first use, called through ctypes.

torch's int4 CPU kernel dequantizes each weight tile again for every 4 rows of x; the native
kernel dequantizes once per call and reuses the tile for every row (int4_native.c says how).
It reads the same int4pack bytes and bf16 scales/zeros as torch's kernel (`CpuInt4Layout`),
so nothing more is stored, and it computes in fp32 (activations are not rounded to bf16).
How it is built and cached, and when it is not: native.py (`INLAID_NATIVE_INT4=0` turns it
off); then quant_matmul keeps torch's kernel.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .native import load
from .quant_linear import CpuInt4Layout, QuantLinearError


def _load() -> tuple[ctypes.CDLL | None, str]:
    library, reason = load("int4_native", "INLAID_NATIVE_INT4")
    if library is not None and library.inlaid_int4pack_mm.argtypes is None:
        library.inlaid_int4pack_mm.restype = ctypes.c_int
        library.inlaid_int4pack_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    return library, reason


def native_int4_available() -> bool:
    return _load()[0] is not None


def native_int4_unavailable_reason() -> str:
    """Why the native kernel is not available ('' when it is)."""
    return _load()[1]


def int4pack_mm(x: Tensor, layout: CpuInt4Layout, threads: int = 1, out: Tensor | None = None) -> Tensor:
    """float32 [M, N] = x @ W. x: float32 [M, K_pad], contiguous (permuted and padded as the
    layout needs); `out`: an optional float32 [M, N] contiguous buffer to write into."""
    library = _load()[0]
    if library is None:
        raise QuantLinearError(f"the native int4 kernel is unavailable: {native_int4_unavailable_reason()}")
    packed, scales_and_zeros = layout.packed, layout.scales_and_zeros
    n, k = packed.shape[0], packed.shape[1] * 2
    if not layout.dequantizable:
        raise QuantLinearError("the native int4 kernel needs N % 64 == 0 and torch's known int4pack layout")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous() or x.device.type != "cpu":
        raise QuantLinearError(f"x must be a contiguous CPU float32 [M, {k}], got {x.dtype} {tuple(x.shape)}")
    if scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous():
        raise QuantLinearError("scales_and_zeros must be contiguous bf16")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32) if out is None else out
    if y.dtype != torch.float32 or tuple(y.shape) != (m, n) or not y.is_contiguous():
        raise QuantLinearError(f"out must be a contiguous float32 [{m}, {n}]")
    if m == 0:
        return y
    status = library.inlaid_int4pack_mm(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(),
                                        m, k, n, layout.kernel_group, threads)
    if status != 0:
        raise QuantLinearError(f"the native int4 kernel refused M={m} K={k} N={n} group={layout.kernel_group}")
    return y
