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
        library.inlaid_int4pack_dequant_bf16.restype = ctypes.c_int
        library.inlaid_int4pack_dequant_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    return library, reason


def native_int4_available() -> bool:
    return _load()[0] is not None


def native_int4_unavailable_reason() -> str:
    """Why the native kernel is not available ('' when it is)."""
    return _load()[1]


class BoundInt4Layout:
    """One int4pack layout bound to a native kernel's entry point once (int4_native.c here,
    int4_dot.c's `DotInt4Weight`): its checks, pointers and sizes are computed here, so a call
    checks only x (~20 us less a call than checking everything each time: 120 calls a decode
    step of the default model). Bound to the layout's tensors: the layout must keep them
    (`bound_to` says whether it still does). The entry point takes (x, packed,
    scales_and_zeros, y, M, K, N, group, threads) and returns 0 or a refusal."""

    kernel_name = "native int4 kernel"

    def __init__(self, layout: CpuInt4Layout, function: ctypes._CFuncPtr) -> None:
        if not layout.dequantizable:
            raise QuantLinearError(f"the {self.kernel_name} needs N % 64 == 0 and torch's known int4pack layout")
        packed, scales_and_zeros = layout.packed, layout.scales_and_zeros
        if scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous():
            raise QuantLinearError("scales_and_zeros must be contiguous bf16")
        if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.device.type != "cpu":
            raise QuantLinearError("the int4pack bytes must be a contiguous CPU uint8 tensor")
        self.packed, self.scales_and_zeros = packed, scales_and_zeros
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self._function = function
        self._weight_arguments = (packed.data_ptr(), scales_and_zeros.data_ptr())
        self._group = layout.kernel_group

    def bound_to(self, layout: CpuInt4Layout) -> bool:
        return layout.packed is self.packed and layout.scales_and_zeros is self.scales_and_zeros

    def matmul(self, x: Tensor, threads: int = 1, out: Tensor | None = None) -> Tensor:
        """float32 [M, N] = x @ W (in the kernel's precision). x: float32 [M, K_pad], contiguous
        (permuted and padded as the layout needs); `out`: an optional float32 [M, N] contiguous
        buffer to write into."""
        n, k = self.out_features, self.in_features
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous() or x.device.type != "cpu":
            raise QuantLinearError(f"x must be a contiguous CPU float32 [M, {k}], got {x.dtype} {tuple(x.shape)}")
        m = x.shape[0]
        y = torch.empty(m, n, dtype=torch.float32) if out is None else out
        if out is not None and (y.dtype != torch.float32 or tuple(y.shape) != (m, n) or not y.is_contiguous()):
            raise QuantLinearError(f"out must be a contiguous float32 [{m}, {n}]")
        if m == 0:
            return y
        status = self._function(x.data_ptr(), *self._weight_arguments, y.data_ptr(), m, k, n, self._group, threads)
        if status != 0:
            raise QuantLinearError(f"the {self.kernel_name} refused M={m} K={k} N={n} group={self._group} "
                                   f"(status {status})")
        return y


class NativeInt4Weight(BoundInt4Layout):
    """A layout bound to int4_native.c: its fp32 GEMM and its bf16 dequantization."""

    def __init__(self, layout: CpuInt4Layout) -> None:
        library = _load()[0]
        if library is None:
            raise QuantLinearError(f"the native int4 kernel is unavailable: {native_int4_unavailable_reason()}")
        super().__init__(layout, library.inlaid_int4pack_mm)
        self._dequantize = library.inlaid_int4pack_dequant_bf16

    def dequantize_bf16(self, out: Tensor) -> Tensor:
        """out bf16 [K_pad, N] = (q - 8) * scale + zero, in fp32 then rounded once to bf16 (the
        value torch's addcmul on the bf16 codes and scales gives; ~7x faster)."""
        n, k = self.out_features, self.in_features
        if out.dtype != torch.bfloat16 or tuple(out.shape) != (k, n) or not out.is_contiguous():
            raise QuantLinearError(f"out must be a contiguous bf16 [{k}, {n}]")
        if self._dequantize(*self._weight_arguments, out.data_ptr(), k, n, self._group) != 0:
            raise QuantLinearError(f"the native int4 dequantization refused K={k} N={n} group={self._group}")
        return out


def native_weight(layout: CpuInt4Layout) -> NativeInt4Weight:
    """The layout's binding, made on first use and kept on the layout (`layout._native`)."""
    native = layout._native
    if not (isinstance(native, NativeInt4Weight) and native.bound_to(layout)):
        native = layout._native = NativeInt4Weight(layout)
    return native


def int4pack_mm(x: Tensor, layout: CpuInt4Layout, threads: int = 1, out: Tensor | None = None) -> Tensor:
    """float32 [M, N] = x @ W. x: float32 [M, K_pad], contiguous (permuted and padded as the
    layout needs); `out`: an optional float32 [M, N] contiguous buffer to write into."""
    return native_weight(layout).matmul(x, threads, out)
