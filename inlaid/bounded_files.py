"""Reading, hashing and copying files a client named, never more than a bound. Torch-free.

A path an admin call names may be a FIFO (its open blocks until a writer comes), a device
(`/dev/zero` reads for ever) or a huge sparse file, and may be swapped for one between a
check and the read that follows it: each function here opens without blocking, checks the
descriptor it will read (not the path again) is a regular file of at most `limit` bytes, and
reads at most `limit` + 1 bytes from it. An outside probe hung admin calls with a FIFO, had
/dev/zero hashed for ever and a 20 GB sparse file hashed for 28 s; a reviewer copied
/dev/zero into a state directory through a path re-pointed after its check.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

_CHUNK = 1 << 20
# The errno of a file over its bound: not EFBIG, which a write to a full or size-limited
# disk raises (a copy's callers tell the two apart).
TOO_LARGE = errno.E2BIG


def open_regular(path: str | Path, limit: int) -> int:
    """A read-only descriptor of `path`, opened without blocking; OSError (the path in its
    `filename`) unless it is a regular file of at most `limit` bytes. The caller closes it."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket?)", str(path))
        if status.st_size > limit:
            raise OSError(TOO_LARGE, f"{status.st_size} bytes, over the {limit} bytes allowed", str(path))
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _chunks(descriptor: int, limit: int, path: str | Path):  # type: ignore[no-untyped-def]
    """The file's bytes in chunks, OSError once more than `limit` arrived (it grew)."""
    total = 0
    while chunk := os.read(descriptor, min(_CHUNK, limit + 1 - total) or 1):
        total += len(chunk)
        if total > limit:
            raise OSError(TOO_LARGE, f"grew past the {limit} bytes allowed while it was read", str(path))
        yield chunk


def read_bounded(path: str | Path, limit: int) -> bytes:
    descriptor = open_regular(path, limit)
    try:
        return b"".join(_chunks(descriptor, limit, path))
    finally:
        os.close(descriptor)


def digest_bounded(path: str | Path, limit: int) -> str:
    """The sha256 (hex) of the file's bytes."""
    digest = hashlib.sha256()
    descriptor = open_regular(path, limit)
    try:
        for chunk in _chunks(descriptor, limit, path):
            digest.update(chunk)
    finally:
        os.close(descriptor)
    return digest.hexdigest()


def copy_bounded(source: str | Path, target: str | Path, limit: int) -> None:
    """Copy `source` to a new file `target` (refused if it exists); on any failure `target`
    is removed."""
    descriptor = open_regular(source, limit)
    try:
        with open(target, "xb") as out:
            try:
                for chunk in _chunks(descriptor, limit, source):
                    out.write(chunk)
            except BaseException:
                Path(target).unlink(missing_ok=True)
                raise
    finally:
        os.close(descriptor)
