"""The bf16 int4 GEMM for prompt rows (int4_bf16.c): built on first use, called through ctypes.

It reads the same int4pack bytes and bf16 scales/zeros as the fp32 native kernel
(`CpuInt4Layout`) and computes what the bf16 route (dequantize + oneDNN's bf16 GEMM) does: the
weight dequantized to bf16, x rounded to bf16, fp32 sums; but it dequantizes one panel of
64-column blocks at a time into a scratch that stays in cache and multiplies there, on one of
two back-ends:
  "amx"          Intel AMX tiles (a CPU with amx-tile and amx-bf16, and Linux granting the
                 process the tile registers); `INLAID_NATIVE_AMX=0` turns this one off;
  "avx512-bf16"  AVX512-BF16 dot products (AMD Zen 4+, Intel Cooper Lake+; also on AMX CPUs).
AMX is preferred where both are. From ~16 rows either is faster than the fp32 kernel and the
bf16 route (docs/kernels.md). `INLAID_NATIVE_BF16=0` turns the kernel off; elsewhere
quant_matmul keeps the other routes.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from .native import load
from .quant_linear import CpuInt4Layout, QuantLinearError

TILE_ROWS = 16  # the AMX back-end: x is padded with zero rows to a multiple of this
TILE_K = 32  # K must be a multiple of this
BACKENDS = {"amx": 1, "avx512-bf16": 2}  # the C file's BACKEND_AMX / BACKEND_DOT


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, tuple[str, ...], str]:
    """(library, the back-ends this process may use, best first, why none is usable)."""
    library, reason = load("int4_bf16", "INLAID_NATIVE_BF16")
    if library is None:
        return None, (), reason
    library.inlaid_amx_enable.restype = ctypes.c_int
    library.inlaid_amx_enable.argtypes = []
    library.inlaid_int4_bf16_backends.restype = ctypes.c_int
    library.inlaid_int4_bf16_backends.argtypes = []
    library.inlaid_int4pack_mm_bf16.restype = ctypes.c_int
    library.inlaid_int4pack_mm_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
    built = library.inlaid_int4_bf16_backends()
    usable: list[str] = []
    refusals: list[str] = []
    if built & BACKENDS["amx"]:
        if os.environ.get("INLAID_NATIVE_AMX", "1") == "0":
            refusals.append("AMX disabled by INLAID_NATIVE_AMX=0")
        elif library.inlaid_amx_enable() != 0:  # once per process: Linux grants the tile registers
            refusals.append("Linux refused this process the AMX tile registers (arch_prctl ARCH_REQ_XCOMP_PERM)")
        else:
            usable.append("amx")
    else:
        refusals.append("this CPU (or compiler) has no AMX bf16")
    if built & BACKENDS["avx512-bf16"]:
        usable.append("avx512-bf16")
    else:
        refusals.append("no AVX512-BF16")
    return (library if usable else None), tuple(usable), "; ".join(refusals)


def bf16_kernel_backends() -> tuple[str, ...]:
    """The back-ends this process may use, the preferred first (empty: the kernel is unavailable)."""
    return _load()[1]


def bf16_kernel_backend() -> str:
    """The back-end `int4pack_mm_bf16` uses by default ('' when none)."""
    backends = bf16_kernel_backends()
    return backends[0] if backends else ""


def bf16_kernel_available() -> bool:
    return _load()[0] is not None


def bf16_kernel_unavailable_reason() -> str:
    """Why a back-end is not used ('' when both are)."""
    return _load()[2]


def bf16_kernel_fits(layout: CpuInt4Layout) -> bool:
    """Whether the kernel takes this layout: the known int4pack bytes with N % 64 == 0
    (`dequantizable`), K % 32 == 0 and an even kernel group."""
    k = layout.packed.shape[1] * 2
    return layout.dequantizable and k % TILE_K == 0 and layout.kernel_group % 2 == 0 and bf16_kernel_available()


def int4pack_mm_bf16(x: Tensor, layout: CpuInt4Layout, threads: int = 1, out: Tensor | None = None,
                     backend: str | None = None) -> Tensor:
    """float32 [M, N] = bf16(x) @ bf16(W), fp32 sums. x: [M, K_pad] (any float dtype; permuted
    and padded as the layout needs); `out`: an optional float32 [M, N] contiguous buffer;
    `backend`: one of `bf16_kernel_backends()` (default: the first)."""
    library = _load()[0]
    if library is None:
        raise QuantLinearError(f"the bf16 int4 kernel is unavailable: {bf16_kernel_unavailable_reason()}")
    backend = backend or bf16_kernel_backend()
    if backend not in bf16_kernel_backends():
        raise QuantLinearError(f"the bf16 int4 kernel has no {backend!r} back-end here "
                               f"(usable: {', '.join(bf16_kernel_backends())}; {bf16_kernel_unavailable_reason()})")
    packed, scales_and_zeros = layout.packed, layout.scales_and_zeros
    n, k = packed.shape[0], packed.shape[1] * 2
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu" or not x.is_floating_point():
        raise QuantLinearError(f"x must be a floating CPU [M, {k}], got {x.dtype} {x.device} {tuple(x.shape)}")
    if not bf16_kernel_fits(layout) or scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous():
        raise QuantLinearError(f"the bf16 int4 kernel cannot take this layout (K={k}, N={n}, group {layout.kernel_group})")
    m = x.shape[0]
    if out is not None and (out.dtype != torch.float32 or tuple(out.shape) != (m, n) or not out.is_contiguous()):
        raise QuantLinearError(f"out must be a contiguous float32 [{m}, {n}]")
    if m == 0:
        return torch.empty(0, n, dtype=torch.float32) if out is None else out
    padded_m = -(-m // TILE_ROWS) * TILE_ROWS if backend == "amx" else m
    x_bf16 = torch.empty(padded_m, k, dtype=torch.bfloat16)
    x_bf16[:m].copy_(x)  # rounds to bf16 (to nearest even), as x.to(torch.bfloat16) does
    x_bf16[m:].zero_()
    y = out if out is not None and padded_m == m else torch.empty(padded_m, n, dtype=torch.float32)
    status = library.inlaid_int4pack_mm_bf16(x_bf16.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(),
                                             y.data_ptr(), padded_m, k, n, layout.kernel_group, threads,
                                             BACKENDS[backend])
    if status != 0:
        raise QuantLinearError(f"the bf16 int4 kernel ({backend}) refused M={padded_m} K={k} N={n} "
                               f"group={layout.kernel_group} (status {status})")
    if out is not None and y is not out:
        return out.copy_(y[:m])
    return y[:m]
