"""Weights written through safetensors get the mode an ordinary file would.

safetensors creates its files 0600 whatever the umask (its writer opens them so), while
every other file the project writes gets 0666 less the umask (0644 usually): a converted
model, a quantized checkpoint or a trained adapter could then be read by its owner only,
and a server run as another user (a service account) was refused its own weights.
"""

from __future__ import annotations

import os
from pathlib import Path

# Most systems' default, used where the process's umask cannot be read without changing it.
_DEFAULT_UMASK = 0o022


def current_umask() -> int:
    """The process's umask, read from /proc (Linux): `os.umask` can only read it by setting
    it, which races with any other thread creating a file meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_UMASK


def as_umask_allows(*paths: str | os.PathLike[str]) -> None:
    """Give each file the mode `open()` would have created it with (0666 less the umask)."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)
