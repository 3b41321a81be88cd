"""The AMX int4 GEMM for prompt rows (int4_amx.c): built on first use, called through ctypes.

It reads the same int4pack bytes and bf16 scales/zeros as the fp32 native kernel
(`CpuInt4Layout`) and computes what the bf16 route (dequantize + oneDNN's bf16 GEMM) does: the
weight dequantized to bf16, x rounded to bf16, fp32 sums; but it dequantizes one 64-column
block at a time into a scratch that stays in cache, so from ~16 rows it is 2-3x faster than
both the fp32 kernel and the bf16 route (docs/kernels.md). Available where the compiler targets
AMX (a CPU with amx-tile and amx-bf16) and Linux lets the process use the tile registers;
`INLAID_NATIVE_AMX=0` turns it off. Elsewhere quant_matmul keeps the other routes.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from .native import load
from .quant_linear import CpuInt4Layout, QuantLinearError

TILE_ROWS = 16  # x is padded with zero rows to a multiple of this
TILE_K = 32  # K must be a multiple of this


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    library, reason = load("int4_amx", "INLAID_NATIVE_AMX")
    if library is None:
        return None, reason
    library.inlaid_amx_enable.restype = ctypes.c_int
    library.inlaid_amx_enable.argtypes = []
    library.inlaid_int4pack_mm_amx.restype = ctypes.c_int
    library.inlaid_int4pack_mm_amx.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    status = library.inlaid_amx_enable()  # once per process: Linux grants the tile registers
    if status == -2:
        return None, "this CPU (or compiler) has no AMX bf16"
    if status != 0:
        return None, "Linux refused this process the AMX tile registers (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return library, ""


def amx_available() -> bool:
    return _load()[0] is not None


def amx_unavailable_reason() -> str:
    """Why the AMX kernel is not available ('' when it is)."""
    return _load()[1]


def amx_fits(layout: CpuInt4Layout) -> bool:
    """Whether the AMX kernel takes this layout: the known int4pack bytes with N % 64 == 0
    (`dequantizable`), K % 32 == 0 and an even kernel group."""
    k = layout.packed.shape[1] * 2
    return layout.dequantizable and k % TILE_K == 0 and layout.kernel_group % 2 == 0 and amx_available()


def int4pack_mm_amx(x: Tensor, layout: CpuInt4Layout, threads: int = 1, out: Tensor | None = None) -> Tensor:
    """float32 [M, N] = bf16(x) @ bf16(W), fp32 sums. x: [M, K_pad] (any float dtype; permuted
    and padded as the layout needs); `out`: an optional float32 [M, N] contiguous buffer."""
    library = _load()[0]
    if library is None:
        raise QuantLinearError(f"the AMX int4 kernel is unavailable: {amx_unavailable_reason()}")
    packed, scales_and_zeros = layout.packed, layout.scales_and_zeros
    n, k = packed.shape[0], packed.shape[1] * 2
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu" or not x.is_floating_point():
        raise QuantLinearError(f"x must be a floating CPU [M, {k}], got {x.dtype} {x.device} {tuple(x.shape)}")
    if not amx_fits(layout) or scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous():
        raise QuantLinearError(f"the AMX int4 kernel cannot take this layout (K={k}, N={n}, group {layout.kernel_group})")
    m = x.shape[0]
    if out is not None and (out.dtype != torch.float32 or tuple(out.shape) != (m, n) or not out.is_contiguous()):
        raise QuantLinearError(f"out must be a contiguous float32 [{m}, {n}]")
    if m == 0:
        return torch.empty(0, n, dtype=torch.float32) if out is None else out
    padded_m = -(-m // TILE_ROWS) * TILE_ROWS
    x_bf16 = torch.empty(padded_m, k, dtype=torch.bfloat16)
    x_bf16[:m].copy_(x)  # rounds to bf16 (to nearest even), as x.to(torch.bfloat16) does
    x_bf16[m:].zero_()
    y = out if out is not None and padded_m == m else torch.empty(padded_m, n, dtype=torch.float32)
    status = library.inlaid_int4pack_mm_amx(x_bf16.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(),
                                            y.data_ptr(), padded_m, k, n, layout.kernel_group, threads)
    if status != 0:
        raise QuantLinearError(f"the AMX int4 kernel refused M={padded_m} K={k} N={n} group={layout.kernel_group} "
                               f"(status {status})")
    if out is not None and y is not out:
        return out.copy_(y[:m])
    return y[:m]
