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

from torch import Tensor

from .int4_native import BoundInt4Layout
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


class DotInt4Weight(BoundInt4Layout):
    """A layout bound to int4_dot.c once (int4_native.BoundInt4Layout: checks, pointers, sizes);
    `matmul` gives bf16(x) @ W."""

    kernel_name = "int4 dot-product kernel"

    def __init__(self, layout: CpuInt4Layout) -> None:
        library = _load()[0]
        if library is None:
            raise QuantLinearError(f"the int4 dot-product kernel is unavailable: {dot_kernel_unavailable_reason()}")
        if layout.kernel_group % 2:
            raise QuantLinearError(f"the int4 dot-product kernel needs an even group (got {layout.kernel_group})")
        super().__init__(layout, library.inlaid_int4pack_mm_dot)


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
