"""The int4 dot-product kernel for few rows (int4_dot.c): built on first use, called through ctypes.

It reads the same int4pack bytes and bf16 scales/zeros as the fp32 native kernel
(`CpuInt4Layout`: nothing more is stored) and multiplies x, rounded to bf16, by the codes
themselves with AVX512-BF16 dot products, the scales and zeros applied once per group: the
weight's value is exact, x is rounded to bf16 (relative error ~1e-3 against fp32 activations,
the precision of the bf16 routes that prompt rows take). 1.4-2.2x faster than the fp32 kernel
at 1-16 rows on the default model's projections (docs/kernels.md). Available where the
compiler targets AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+ and Sapphire Rapids+);
`INLAID_NATIVE_INT4_DOT=0` turns it off, and quant_matmul's few rows take the fp32 kernel.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from .native import load
from .quant_linear import CpuInt4Layout, QuantLinearError


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    library, reason = load("int4_dot", "INLAID_NATIVE_INT4_DOT")
    if library is None:
        return None, reason
    library.inlaid_int4_dot_available.restype = ctypes.c_int
    library.inlaid_int4_dot_available.argtypes = []
    library.inlaid_int4pack_mm_dot.restype = ctypes.c_int
    library.inlaid_int4pack_mm_dot.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    if not library.inlaid_int4_dot_available():
        return None, "this CPU (or compiler) has no AVX512-BF16"
    return library, ""


def dot_kernel_available() -> bool:
    return _load()[0] is not None


def dot_kernel_unavailable_reason() -> str:
    """Why the dot-product kernel is not available ('' when it is)."""
    return _load()[1]


def dot_kernel_fits(layout: CpuInt4Layout) -> bool:
    """Whether the kernel takes this layout: the known int4pack bytes with N % 64 == 0
    (`dequantizable`) and an even kernel group."""
    return layout.dequantizable and layout.kernel_group % 2 == 0 and dot_kernel_available()


class DotInt4Weight:
    """One int4pack layout bound to int4_dot.c once (checks, pointers and sizes computed here, so
    a call checks only x: 120 calls a decode step of the default model). Bound to the layout's
    tensors: the layout must keep them (`bound_to` says whether it still does)."""

    def __init__(self, layout: CpuInt4Layout) -> None:
        library = _load()[0]
        if library is None:
            raise QuantLinearError(f"the int4 dot-product kernel is unavailable: {dot_kernel_unavailable_reason()}")
        packed, scales_and_zeros = layout.packed, layout.scales_and_zeros
        if not layout.dequantizable or layout.kernel_group % 2:
            raise QuantLinearError("the int4 dot-product kernel needs N % 64 == 0, torch's known int4pack layout "
                                   f"and an even group (got {layout.kernel_group})")
        if scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous():
            raise QuantLinearError("scales_and_zeros must be contiguous bf16")
        if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.device.type != "cpu":
            raise QuantLinearError("the int4pack bytes must be a contiguous CPU uint8 tensor")
        self.packed, self.scales_and_zeros = packed, scales_and_zeros
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self._function = library.inlaid_int4pack_mm_dot
        self._weight_arguments = (packed.data_ptr(), scales_and_zeros.data_ptr())
        self._group = layout.kernel_group

    def bound_to(self, layout: CpuInt4Layout) -> bool:
        return layout.packed is self.packed and layout.scales_and_zeros is self.scales_and_zeros

    def matmul(self, x: Tensor, threads: int = 1, out: Tensor | None = None) -> Tensor:
        """float32 [M, N] = bf16(x) @ W. x: float32 [M, K_pad], contiguous (permuted and padded
        as the layout needs); `out`: an optional float32 [M, N] contiguous buffer to write into."""
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
            raise QuantLinearError(f"the int4 dot-product kernel refused M={m} K={k} N={n} group={self._group} "
                                   f"(status {status})")
        return y


def dot_weight(layout: CpuInt4Layout) -> DotInt4Weight:
    """The layout's binding, made on first use and kept on the layout (`layout._dot`)."""
    bound = layout._dot
    if not (isinstance(bound, DotInt4Weight) and bound.bound_to(layout)):
        bound = layout._dot = DotInt4Weight(layout)
    return bound


def int4pack_mm_dot(x: Tensor, layout: CpuInt4Layout, threads: int = 1, out: Tensor | None = None) -> Tensor:
    """float32 [M, N] = bf16(x) @ W (the weight exact, fp32 sums). x: float32 [M, K_pad],
    contiguous (permuted and padded as the layout needs)."""
    return dot_weight(layout).matmul(x, threads, out)
