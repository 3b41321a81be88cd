"""The native CPU int4 GEMM (int4_native.c): built on first use, called through ctypes.

torch's int4 CPU kernel dequantizes each weight tile again for every 4 rows of x; the native
kernel dequantizes once per call and reuses the tile for every row (int4_native.c says how).
It reads the same int4pack bytes and bf16 scales/zeros as torch's kernel (`CpuInt4Layout`),
so nothing more is stored, and it computes in fp32 (activations are not rounded to bf16).

The C file is compiled with the system's C compiler (`$CC`, else `cc`) and `-march=native`
into a shared library cached under `$INLAID_NATIVE_DIR` (default `~/.cache/inlaid/native/`),
named by a digest of the source, the flags, the compiler's version and this CPU's feature
flags: a cache shared between machines never hands one a library built for another CPU.
It has no Python or torch headers to include, so it builds in about a second. Where there
is no compiler, or the build fails, or `INLAID_NATIVE_INT4=0`, `native_int4_available()`
is False (the reason in `native_int4_unavailable_reason()`) and quant_matmul keeps torch's
kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .quant_linear import CpuInt4Layout, QuantLinearError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_native.c")
CFLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=gnu11"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), version.encode(), platform.machine().encode(),
                 _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    root = Path(os.environ.get("INLAID_NATIVE_DIR") or Path.home() / ".cache" / "inlaid" / "native")
    return root / f"int4_native-{digest.hexdigest()[:20]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: servers starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *CFLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("INLAID_NATIVE_INT4", "1") == "0":
        return None, "disabled by INLAID_NATIVE_INT4=0"
    if platform.system() != "Linux":
        return None, f"built only on Linux, not {platform.system()}"
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler!r} not found)"
    try:
        target = _library_path(compiler)
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("native int4 kernel unavailable, torch's int4 kernel serves every M: %s", error)
        return None, str(error)
    function = library.inlaid_int4pack_mm
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    return library, ""


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
