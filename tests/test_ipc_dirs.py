"""The server's private ipc directories: a later start removes those a killed server left,
never a live one's (`inlaid/serve/ipc_dirs.py`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.serve.ipc_dirs import private_ipc_dir, process_alive, remove_dead_dirs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def _directory(root: Path, kind: str, pid: int, tag: str = "x") -> Path:
    path = root / f"inlaid-{kind}-{pid}-{tag}"
    path.mkdir()
    (path / "executor-0.ipc").write_bytes(b"")  # not a socket: proves nothing either way
    return path


def test_dead_owners_directories_go_live_ones_stay(tmp_path):
    dead = _dead_pid()
    assert not process_alive(dead) and process_alive(os.getpid())
    gone = _directory(tmp_path, "ipc", dead)
    gone_requantizer = _directory(tmp_path, "requantizer", dead)
    live = _directory(tmp_path, "ipc", os.getpid())
    foreign = tmp_path / f"inlaid-server-{dead}-x"  # another of Inlaid's directories, not an ipc one
    foreign.mkdir()
    odd = tmp_path / "inlaid-ipc-notapid-x"
    odd.mkdir()

    assert remove_dead_dirs("ipc", str(tmp_path)) == [gone]
    assert remove_dead_dirs("requantizer", str(tmp_path)) == [gone_requantizer]
    assert not gone.exists() and not gone_requantizer.exists()
    assert live.exists() and foreign.exists() and odd.exists()


def test_a_directory_whose_socket_still_listens_is_kept_whatever_its_pid(tmp_path):
    # A /tmp shared by containers with separate pid namespaces: the owner's pid means
    # nothing here, but its socket still accepts connections.
    short = Path(os.path.realpath("/tmp")) / f"ipct-{os.getpid()}"  # a Unix socket path must stay short
    short.mkdir(exist_ok=True)
    try:
        dead = _dead_pid()
        serving = short / f"inlaid-ipc-{dead}-a"
        stale = short / f"inlaid-ipc-{dead}-b"
        serving.mkdir()
        stale.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(serving / "executor-0.ipc"))
            listener.listen()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as closed:  # bound, never listening: refused
                closed.bind(str(stale / "executor-0.ipc"))
            assert remove_dead_dirs("ipc", str(short)) == [stale]
            assert serving.exists()
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_private_ipc_dir_names_its_owner_and_sweeps_every_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR is read once and cached
    dead = _dead_pid()
    left = [_directory(tmp_path, kind, dead) for kind in ("ipc", "requantizer")]
    made = Path(private_ipc_dir("requantizer"))
    assert made.parent == tmp_path and made.name.startswith(f"inlaid-requantizer-{os.getpid()}-")
    assert not any(path.exists() for path in left)
    with pytest.raises(ValueError, match="kind"):
        private_ipc_dir("../elsewhere")
