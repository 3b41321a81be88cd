"""Native CPU kernels (`kernels/*.c`): built on first use with the system's C compiler and
called through ctypes.

Each C file is compiled with `$CC` (else `cc`) and `-march=native` into a shared library
cached under `$INLAID_NATIVE_DIR` (default `~/.cache/inlaid/native/`), named by a digest of
the source, the headers beside it (`native_vectors.h`), the flags, the compiler's version and
this CPU's feature flags: a cache shared between machines never hands one a library built
for another CPU. The files include no Python or torch headers, so each builds in about a
second. Where there is no compiler, the build fails, the system is not Linux, or the kernel's
switch is "0" (`INLAID_NATIVE_INT4=0`, `INLAID_NATIVE_INT4_DOT=0`, `INLAID_NATIVE_BF16=0`,
`INLAID_NATIVE_LORA=0`, `INLAID_NATIVE_ATTENTION=0`), `load` returns None and the reason, and
the callers keep their other routes.
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

log = logging.getLogger(__name__)

CFLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=gnu11"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(source: Path, compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]  # what the sources include
    for part in (source.read_bytes(), *headers, " ".join(CFLAGS).encode(), version.encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    root = Path(os.environ.get("INLAID_NATIVE_DIR") or Path.home() / ".cache" / "inlaid" / "native")
    return root / f"{source.stem}-{digest.hexdigest()[:20]}.so"


def _build(source: Path, compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: servers starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *CFLAGS, "-o", str(built), str(source)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)


@functools.lru_cache(maxsize=None)
def load(stem: str, switch: str) -> tuple[ctypes.CDLL | None, str]:
    """(the library built from kernels/<stem>.c, "") or (None, why not); `switch`: the
    environment variable that turns this kernel off with "0"."""
    if os.environ.get(switch, "1") == "0":
        return None, f"disabled by {switch}=0"
    if platform.system() != "Linux":
        return None, f"built only on Linux, not {platform.system()}"
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler!r} not found)"
    source = Path(__file__).with_name(f"{stem}.c")
    try:
        target = _library_path(source, compiler)
        if not target.exists():
            _build(source, compiler, target)
        return ctypes.CDLL(str(target)), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("native kernel %s unavailable, torch's routes serve instead: %s", stem, error)
        return None, str(error)
