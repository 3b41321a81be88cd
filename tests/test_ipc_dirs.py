"""The server's private ipc directories: a later start removes those a killed server left,
never a live one's (`inlaid/serve/ipc_dirs.py`)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.serve.ipc_dirs import OWNER_FILE, private_ipc_dir, process_alive, remove_dead_dirs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def _directory(root: Path, kind: str, pid: int | str, tag: str = "x", owner: bool = True) -> Path:
    path = root / f"inlaid-{kind}-{pid}-{tag}"
    path.mkdir()
    if owner:
        (path / OWNER_FILE).write_bytes(b"")  # nobody holds its lock: as a killed owner's
    return path


def test_dead_owners_directories_go_live_ones_stay(tmp_path):
    dead = _dead_pid()
    assert not process_alive(dead) and process_alive(os.getpid())
    gone = _directory(tmp_path, "ipc", dead)
    gone_requantizer = _directory(tmp_path, "requantizer", dead)
    live = _directory(tmp_path, "ipc", os.getpid())
    before_the_lock = _directory(tmp_path, "ipc", dead, "old", owner=False)  # nothing proves it dead
    foreign = tmp_path / f"inlaid-server-{dead}-x"  # another of Inlaid's directories, not an ipc one
    foreign.mkdir()
    odd = [_directory(tmp_path, "ipc", name) for name in ("notapid", "²", "4294967296", "99999999999999999999")]

    assert remove_dead_dirs("ipc", str(tmp_path)) == [gone]
    assert remove_dead_dirs("requantizer", str(tmp_path)) == [gone_requantizer]
    assert not gone.exists() and not gone_requantizer.exists()
    assert all(path.exists() for path in (live, before_the_lock, foreign, *odd))


def test_a_held_owner_lock_keeps_the_directory_whatever_its_pid(tmp_path):
    # A /tmp shared by containers with separate pid namespaces: the owner's pid means nothing
    # here, but the owner holds its lock (whether or not its sockets are bound yet).
    dead = _dead_pid()
    held = _directory(tmp_path, "requantizer", dead, "held")
    descriptor = os.open(held / OWNER_FILE, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        assert remove_dead_dirs("requantizer", str(tmp_path)) == []
        assert held.exists()
    finally:
        os.close(descriptor)  # the owner dies: its lock goes with it
    assert remove_dead_dirs("requantizer", str(tmp_path)) == [held]


@pytest.fixture
def short_tmp(tmp_path):
    """A temporary directory short enough for socket paths below it (pytest's own may not be:
    `ipc_root` would pass it over)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ipc-test-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_private_ipc_dir_locks_what_it_makes_and_sweeps_every_kind(short_tmp, monkeypatch):
    tmp_path = short_tmp
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR is read once and cached
    dead = _dead_pid()
    left = [_directory(tmp_path, kind, dead) for kind in ("ipc", "requantizer")]
    (tmp_path / f"inlaid-ipc-{'9' * 30}-x").mkdir()  # a pid os.kill cannot take: kept, no failure
    made = Path(private_ipc_dir("requantizer"))
    assert made.parent == tmp_path and made.name.startswith(f"inlaid-requantizer-{os.getpid()}-")
    assert not any(path.exists() for path in left)
    # Its lock is held by this process: another process (another pid namespace, say) cannot take it.
    probe = subprocess.run([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(made / OWNER_FILE)!r}, os.O_RDONLY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")])
    assert probe.returncode == 3
    with pytest.raises(ValueError, match="kind"):
        private_ipc_dir("../elsewhere")


def test_a_socket_whose_file_was_removed_listens_again_in_a_locked_directory(tmp_path):
    """A /tmp cleaner removed the directory of a bound ipc socket: a process started after that
    could never connect. The socket is bound again, its directory made again with its lock (a
    later start's cleanup keeps it while this process lives)."""
    import logging
    import shutil

    import zmq

    from inlaid.serve.ipc_dirs import listen_again_if_gone

    logger = logging.getLogger("test")
    directory = tmp_path / f"inlaid-ipc-{_dead_pid()}-x"  # only the lock can keep it from the cleanup
    directory.mkdir()
    address = f"ipc://{directory}/child.ipc"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    try:
        router.bind(address)
        assert not listen_again_if_gone(router, address, logger)  # the file is there: nothing to do
        shutil.rmtree(directory)
        assert listen_again_if_gone(router, address, logger)
        assert (directory / "child.ipc").exists() and (directory / OWNER_FILE).exists()
        assert remove_dead_dirs("ipc", str(tmp_path)) == [] and directory.exists()  # its lock is held
        dealer = context.socket(zmq.DEALER)
        dealer.connect(address)
        dealer.send(b"hello")
        assert router.poll(5000) and router.recv_multipart()[1] == b"hello"
        dealer.close(0)
        # A first bind (the requantizer's, at its first job): nothing to say while its directory is there;
        # made again where it is gone.
        first = context.socket(zmq.ROUTER)
        first_address = f"ipc://{directory}/first.ipc"
        assert not listen_again_if_gone(first, first_address, logger, first=True)
        assert not (directory / "first.ipc").exists()
        first.close(0)
        shutil.rmtree(directory)
        first = context.socket(zmq.ROUTER)
        assert listen_again_if_gone(first, first_address, logger, first=True)
        assert (directory / "first.ipc").exists() and (directory / OWNER_FILE).exists()
        first.close(0)
        for nothing_to_restore in ("ipc://@inlaid-abstract-test", "tcp://127.0.0.1:1", "ipc://relative.ipc"):
            listen_again_if_gone(router, nothing_to_restore, logger)  # no file of ours: no-op, no error
        assert not Path("relative.ipc").exists()
    finally:
        router.close(0)
        context.term()


def test_a_temporary_directory_too_deep_for_a_socket_path_is_passed_over(tmp_path, short_tmp, monkeypatch):
    """A deep $TMPDIR (an HPC job's, a test's under pytest-xdist) made every socket path pass
    the kernel's 107 bytes: `inlaid serve` could not start ("ipc path ... is longer than 107
    characters"). The ipc directories then go to a short system temporary directory, and the
    clean-up looks there too. (The short directories stand in for /tmp here: a server starting
    beside this test sweeps the real one.)"""
    import tempfile

    import inlaid.serve.ipc_dirs as ipc_dirs
    from inlaid.addresses import IPC_PATH_BYTES

    deep = tmp_path / ("d" * 60) / ("e" * 30)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    monkeypatch.setattr(ipc_dirs, "_SHORT_ROOTS", (str(short_tmp / "missing"), str(short_tmp)))
    assert ipc_dirs.ipc_root() == str(short_tmp)  # the first short one that exists and is writable
    made = Path(private_ipc_dir("requantizer"))
    assert made.parent == short_tmp
    assert len(os.fsencode(made / "requantizer.ipc")) <= IPC_PATH_BYTES
    assert len(os.fsencode(Path(private_ipc_dir("ipc")) / "executor-63.ipc")) <= IPC_PATH_BYTES
    left = _directory(short_tmp, "requantizer", _dead_pid(), tag="deep-test")
    assert left in remove_dead_dirs("requantizer")  # the default roots include the short one
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))  # short enough: used as it is
    assert ipc_dirs.ipc_root() == str(short_tmp)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    monkeypatch.setattr(ipc_dirs, "_SHORT_ROOTS", ())  # nowhere shorter: the deep one (the bind says why)
    assert ipc_dirs.ipc_root() == str(deep)
