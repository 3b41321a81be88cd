"""Private temporary directories for the server's ipc sockets, and the removal of those a
killed server left behind (and of the shared memory a killed requantizer left: at the end).

A server removes its directories in a `finally` on a normal exit; a SIGKILLed coordinator
(the OOM killer, `kill -9`) cannot. Each directory's name carries its owner's pid
(`inlaid-<kind>-<pid>-XXXX`), and its owner holds an exclusive `flock` on the file `.owner`
inside for as long as it lives (the kernel drops the lock when the process dies, a zombie
included). A later start removes a directory only when both say its owner is gone: the pid
is no live process here, and the lock can be taken. The lock alone decides where /tmp is
shared by containers with separate pid namespaces (a pid there means nothing here), also
for a directory whose sockets are not bound yet (the requantizer's, until its first job).
A directory without `.owner` (made before this scheme) is left alone. Cleaning up is best
effort: nothing it meets fails a server's start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zmq

log = logging.getLogger("inlaid.serve")

_PREFIX = "inlaid-"
# The coordinator's (executor sockets) and the re-quantization jobs' (the requantizer's).
KINDS = ("ipc", "requantizer")
OWNER_FILE = ".owner"
# The longest path under the root: "/inlaid-requantizer-<pid>-XXXXXXXX/" (a pid has at most 7
# digits on Linux) and the longest socket name, "executor-63.ipc" or "requantizer.ipc".
_LONGEST_BELOW_ROOT = len("/inlaid-requantizer-4194304-xxxxxxxx/") + len("executor-63.ipc")
_SHORT_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")


def private_ipc_dir(kind: str) -> str:
    """A new directory `<ipc_root()>/inlaid-<kind>-<pid>-XXXX` ($TMPDIR, or a short system
    temporary directory where $TMPDIR is too deep) for this process's ipc sockets
    (`kind` one of KINDS), locked as this process's, after removing the directories (of
    every kind) dead owners left."""
    if kind not in KINDS:
        raise ValueError(f"ipc directory kind {kind!r}: one of {KINDS}")
    for each in KINDS:
        try:
            remove_dead_dirs(each)
        except Exception as error:  # noqa: BLE001  (best effort: never a reason not to start)
            log.warning("could not clean up stale ipc directories", extra={"kind": each, "error": repr(error)})
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{kind}-{os.getpid()}-", dir=ipc_root())
    _claim(path)
    return path


def ipc_root() -> str:
    """Where the ipc directories go: the temporary directory, unless its path is so long that a
    socket's would pass the kernel's limit (a deep $TMPDIR: an HPC job's, a test's; the server
    then failed to start, "ipc path ... is longer than 107 characters"); then the first short
    system temporary directory this process can write. Same answer for every process of a
    server (they share the environment)."""
    from inlaid.addresses import IPC_PATH_BYTES

    root = tempfile.gettempdir()
    if len(os.fsencode(root)) + _LONGEST_BELOW_ROOT <= IPC_PATH_BYTES:
        return root
    for short in _SHORT_ROOTS:
        if os.path.isdir(short) and os.access(short, os.W_OK | os.X_OK):
            return short
    return root  # nowhere shorter: the bind says why, naming the path


def _claim(path: str) -> None:
    """Hold `path`'s owner lock for the rest of this process's life. Locked under another name,
    then renamed: a cleaner never meets an unlocked `.owner`."""
    locking = os.path.join(path, OWNER_FILE + ".new")
    descriptor = os.open(locking, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.rename(locking, os.path.join(path, OWNER_FILE))
    # `descriptor` is never closed: the lock is held until the process exits (or dies).


def listen_again_if_gone(sock: zmq.Socket, address: str, logger: logging.Logger | logging.LoggerAdapter,
                         first: bool = False) -> bool:
    """Bind `sock` again at `address` where its ipc socket file was removed while the server
    ran (a /tmp cleaner, an operator's rm): connections made before outlive the file, but a
    child started after it could never connect (a probe: health said `starting` until the
    start timeout, every request held). A removed directory is made again, with its owner lock
    (else a later start's cleanup would leave it behind after a crash). Abstract (`ipc://@name`)
    and tcp addresses have no file. `first`: not bound yet (no file is expected), only a removed
    directory is made again. Whether it bound `sock`; OSError where it cannot listen."""
    path = address[len("ipc://"):] if address.startswith("ipc://") else ""
    if not path or path.startswith("@") or not os.path.dirname(path) or os.path.exists(path):
        return False
    directory = os.path.dirname(path)
    if first and os.path.isdir(directory):
        return False
    import zmq  # here: the predictor reads process_alive from this module, and needs no ZeroMQ

    logger.warning("an ipc socket's file is gone; listening on it again", extra={"path": path})
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700)
            _claim(directory)
        try:
            sock.unbind(address)
        except zmq.ZMQError:
            pass  # nothing bound there any more: bind afresh
        sock.bind(address)
    except zmq.ZMQError as error:
        raise OSError(f"cannot listen again on {address}: {error}") from None
    return True


def remove_dead_dirs(kind: str, root: str | None = None) -> list[Path]:
    """Remove the `kind` directories under `root` (default: the temporary directory, and
    `ipc_root()` where that is another) whose owner is gone; returns them."""
    removed = []
    prefix = f"{_PREFIX}{kind}-"
    roots = [root] if root else list(dict.fromkeys((tempfile.gettempdir(), ipc_root())))
    for path in (found for each in roots for found in Path(each).glob(f"{prefix}*-*")):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not (pid.isascii() and pid.isdigit()) or path.is_symlink() or not path.is_dir():
            continue
        if process_alive(int(pid)) or not _owner_gone(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (not a zombie). Another user's process, or a pid
    the kernel cannot even take: alive (kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc here: alive, as the kernel said
        return True


def _owner_gone(directory: Path) -> bool:
    """Whether nobody holds the directory's owner lock (its owner died). No lock file, or
    one that cannot be opened (another user's): not proven, kept."""
    owner = directory / OWNER_FILE
    if owner.is_symlink():
        return False
    try:
        descriptor = os.open(owner, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its owner lives (in this pid namespace or another)
    except OSError:
        return False
    finally:
        os.close(descriptor)  # releases the lock if it was taken
    return True


def segment_prefix(pid: int) -> str:
    """How the names of the shared-memory segments process `pid` exports begin: one
    definition for the name made (`layer_transport.export_shm`) and the name swept (below)."""
    return f"{_PREFIX}{pid}-"


def remove_segments_of(pid: int, shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink the shared-memory segments a dead child `pid` exported (`inlaid-<pid>-*`);
    their names. Its resource tracker unlinks those it registered when it dies, but Python
    registers a segment only after creating and mapping it, and starts the tracker at the
    first one: a requantizer SIGKILLed in between left its layer in RAM (tmpfs) until reboot
    (a probe: 3 of 43 kills timed at a handover). Only for a child the caller saw die, so the
    pid is that child's. No /dev/shm (not Linux): nothing."""
    removed = []
    for path in Path(shm_dir).glob(f"{segment_prefix(pid)}*"):
        try:
            path.unlink()
        except FileNotFoundError:  # its tracker was first
            continue
        removed.append(path.name)
    return removed
