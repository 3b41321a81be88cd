"""Private temporary directories for the server's ipc sockets, and the removal of those a
killed server left behind.

A server removes its directories in a `finally` on a normal exit; a SIGKILLed coordinator
(the OOM killer, `kill -9`) cannot. Each directory's name carries its owner's pid
(`inlaid-<kind>-<pid>-XXXX`), so a later start removes those whose owner is gone. Gone
means both: the pid is not a live process here (a zombie counts as gone: a killed
coordinator stays one until its parent reaps it), and no socket in the directory accepts a
connection. The second test keeps a live server's sockets when the pid test cannot be
trusted: a /tmp shared by containers with separate pid namespaces.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

_PREFIX = "inlaid-"
# The coordinator's (executor sockets) and the re-quantization jobs' (the requantizer's).
KINDS = ("ipc", "requantizer")
# Refused, or no socket file: nobody listens. Any other failure proves nothing.
_NOBODY_LISTENS = {errno.ECONNREFUSED, errno.ENOENT}


def private_ipc_dir(kind: str) -> str:
    """A new directory `$TMPDIR/inlaid-<kind>-<pid>-XXXX` for this process's ipc sockets
    (`kind` one of KINDS), after removing the directories (of every kind) dead owners left."""
    if kind not in KINDS:
        raise ValueError(f"ipc directory kind {kind!r}: one of {KINDS}")
    for each in KINDS:
        remove_dead_dirs(each)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{kind}-{os.getpid()}-")


def remove_dead_dirs(kind: str, root: str | None = None) -> list[Path]:
    """Remove the `kind` directories under `root` (default: the temporary directory) whose
    owner is gone; returns them."""
    removed = []
    prefix = f"{_PREFIX}{kind}-"
    for path in Path(root or tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        if process_alive(int(pid)) or _a_socket_listens(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (not a zombie). Another user's process: alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc here: alive, as the kernel said
        return True


def _a_socket_listens(directory: Path) -> bool:
    """Whether a Unix socket in `directory` accepts a connection (something still serves
    there). A file that is not a socket, or one refused, does not count; any other error
    (permissions) counts as listening: keep what cannot be proven dead."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return True
    for entry in entries:
        try:
            if not entry.is_socket():
                continue
        except OSError:
            return True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(entry))
            except OSError as error:
                if error.errno in _NOBODY_LISTENS:
                    continue
                return True
            return True
    return False
