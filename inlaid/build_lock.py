"""One builder of a cached artifact at a time (the default model's conversion, a suite
checkpoint): an exclusive `flock` on `<artifact>.lock` beside it. A process that must wait
says so once on stderr, naming the holder's pid (each holder writes its own into the lock
file): a silent wait looked like a hang (`inlaid quantize --suite` sat 30 s+ on one).

`exclusive_run` is the same lock for a user's output directory (`inlaid quantize --out`),
refused at once instead of awaited: two runs on one --out each deleted and wrote the
other's layers, and both ended "finished" with a mix of two methods' weights."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import sys
import tempfile
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
                print(f"waiting for another process building {artifact}{_holder(lock)} ...", file=sys.stderr,
                      flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _claim(lock)
        yield


def _holder(lock) -> str:  # type: ignore[no-untyped-def]
    """The words ' (pid N)' naming the process holding `lock` (its first line, `_claim`'s), or ''."""
    lock.seek(0)
    holder = lock.read().split("\n", 1)[0].strip()
    return f" (pid {holder})" if holder.isdigit() else ""


def _claim(lock, *notes: str) -> None:  # type: ignore[no-untyped-def]
    """Write this process's pid (then `notes`, a line each) into the lock it now holds."""
    lock.seek(0)
    lock.truncate()
    lock.write("".join(f"{line}\n" for line in (os.getpid(), *notes)))
    lock.flush()


RUN_LOCK_BASE = Path("/tmp")  # where run_lock_dir makes this user's directory (tests point it elsewhere)


@contextlib.contextmanager
def exclusive_run(target: Path, busy_error: type[Exception], option: str = "--out") -> Iterator[None]:
    """Hold `target`'s run lock for the block, or raise `busy_error` at once naming the holder's
    pid. The lock is keyed on `target`'s real path (symlinks resolved: one directory under two
    names is one lock) and lives in `run_lock_dir()`, not beside `target` (whose parent may be
    read-only); its file is removed at the end. Not covered: two users, or two processes
    that see different /tmp directories (a service's private /tmp), on one `target`."""
    real = os.path.realpath(Path(target).expanduser())
    lock_dir = run_lock_dir(busy_error)
    lock_path = lock_dir / (hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".lock")
    while True:
        try:  # never through a link planted at the lock's name
            handle = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "a+")
        except OSError as error:
            raise busy_error(f"cannot open the run lock {lock_path} for {option} {target}: "
                             f"{error.strerror or error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise busy_error(f"another run{holder} is writing {option} {target}: wait for it to end, or choose "
                             f"another {option}") from None
        # The previous holder removes the file as it ends: one opened before that is no lock.
        try:
            current = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    try:
        _claim(handle, real)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def run_lock_dir(refusal: type[Exception]) -> Path:
    """This user's directory of run locks, `/tmp/inlaid-run-locks-<uid>` (the same whatever
    TMPDIR says; the system's temporary directory where /tmp is missing): made mode 0700, and
    refused (`refusal`, one line) unless it is a real directory of this user's that nobody else
    may write: another user could plant links there or block the runs."""
    base = RUN_LOCK_BASE if RUN_LOCK_BASE.is_dir() else Path(tempfile.gettempdir())
    directory = base / f"inlaid-run-locks-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        status = os.lstat(directory)
    except OSError as error:
        raise refusal(f"cannot make the run-lock directory {directory}: {error.strerror or error}") from None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise refusal(f"the run-lock directory {directory} is not a directory of this user's that only it may "
                      "write; remove it (it is made again)")
    return directory
