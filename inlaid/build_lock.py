"""One builder of a cached artifact at a time (the default model's conversion, a suite
checkpoint): an exclusive `flock` on `<artifact>.lock` beside it. A process that must wait
says so once on stderr, naming the holder's pid (each holder writes its own into the lock
file): a silent wait looked like a hang (`inlaid quantize --suite` sat 30 s+ on one)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def build_lock(artifact: Path, *, quiet: bool = False) -> Iterator[None]:
    """Hold `artifact`'s build lock for the block; `quiet`: wait without saying so. The
    caller checks again, once it holds the lock, whether the artifact was finished meanwhile."""
    with open(artifact.with_name(artifact.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                lock.seek(0)
                holder = lock.read().strip()
                pid = f" (pid {holder})" if holder.isdigit() else ""
                print(f"waiting for another process building {artifact}{pid} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
