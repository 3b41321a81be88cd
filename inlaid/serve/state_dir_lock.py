"""One server per state directory: the lock a server holds on its `server.state_dir`.

Two servers that shared one directory both resumed the same re-quantization job, both wrote
its layers and registry.json, and collected each other's files as garbage. The first to open
it holds an exclusive `flock` on `STATE_DIR/server.lock` for its lifetime (as
inlaid/serve/ipc_dirs.py does: the kernel drops it when the process dies, SIGKILL included,
so a restart never meets a stale lock); the second is refused, naming the holder's pid.
Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "server.lock"


class StateDirError(RuntimeError):
    """The state directory is unusable (unreadable registry, or built on another base)."""


class StateDirInUseError(StateDirError):
    """Another process (another server) holds the state directory's lock."""


@dataclass
class StateDirLock:
    """This process's lock on a state directory: `descriptor` is never closed, so the lock
    lasts as long as the process (a child started by exec does not inherit it: Python's
    descriptors are not inheritable)."""

    lock_file: Path
    descriptor: int


# Every state directory this process has locked, by (device, inode): flock locks belong to an
# open file description, so a second open + flock in this process would refuse this process
# itself (the CLI locks before the coordinator's TaskStore opens the directory; tests open
# several stores on one directory).
_held_locks: dict[tuple[int, int], StateDirLock] = {}
_held_locks_guard = threading.Lock()


def lock_state_dir(state_dir: str | Path) -> StateDirLock:
    """Take (or return this process's) exclusive lock on `state_dir`, creating the directory.
    StateDirInUseError, naming the directory and the holder's pid, if another process holds it."""
    root = Path(state_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        identity = os.stat(root)
    except OSError as error:
        raise StateDirError(f"{root} cannot be used as a state directory: {error}") from error
    key = (identity.st_dev, identity.st_ino)
    with _held_locks_guard:
        held = _held_locks.get(key)
        lock_file = root / LOCK_FILE
        if held is not None:
            if _same_file(held.descriptor, lock_file):
                return held
            # The directory (or its lock file) was removed and another got its inode number:
            # the lock held is on a file no longer there.
            os.close(held.descriptor)
            del _held_locks[key]
        try:
            descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:  # a symbolic link planted there (ELOOP), no permission...
            raise StateDirError(f"{root} cannot be used as a state directory: its lock file {lock_file} cannot "
                                f"be opened: {error}") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirInUseError(
                    f"{root} is in use by another inlaid server (pid {holder}, written in {lock_file}): one server "
                    "per state directory; stop that server first, or use another server.state_dir") from None
            raise StateDirError(f"{root} cannot be used as a state directory: its lock file {lock_file} cannot "
                                f"be locked: {error}") from error
        # Ours: the pid, for the message a second server gives (a dead holder's stale pid is
        # simply overwritten; the kernel released its lock).
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        held = _held_locks[key] = StateDirLock(lock_file, descriptor)
        return held


def _lock_holder(descriptor: int) -> str:
    """The pid the lock file names ("unknown" if its holder has not written it yet)."""
    try:
        text = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether the open `descriptor` is the file at `path` now."""
    try:
        opened, there = os.fstat(descriptor), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) == (there.st_dev, there.st_ino)
