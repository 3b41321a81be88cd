"""One server per state directory, against what an outside probe found: a second `inlaid
serve` on a running server's server.state_dir started without complaint, both resumed the
same re-quantization job and wrote registry.json through one fixed temporary name, and one
of them failed with FileNotFoundError (its job stalled)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.serve.task_store import REGISTRY_FILE, StateDirError, TaskStore

BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}
SERVE_PORT = 21611  # this engineer's range (21600-21799); the refused server binds nothing anyway

# A process that opens the state directory as the coordinator does, then waits to be killed.
HOLDER = """
import json, sys, time
from inlaid.serve.task_store import TaskStore
store = TaskStore(sys.argv[1], json.loads(sys.argv[2]))
store.save()
print("holding", flush=True)
time.sleep(600)
"""


def _start_holder(root: Path, base: dict[str, str | None] = BASE) -> subprocess.Popen[str]:
    """A process holding `root` as a server of `base` does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), json.dumps(base)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_second_process_is_refused_until_the_first_dies_even_by_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "state"
    holder = _start_holder(root)
    try:
        # A layer file the holder has written but not committed yet: a second store's garbage
        # collection deleted it (the old code opened the directory without a word).
        in_progress = root / "quant" / "layers" / "layer_003.v1.safetensors"
        in_progress.write_bytes(b"being written")
        with pytest.raises(StateDirError, match=rf"{root} is in use by another inlaid server \(pid {holder.pid},"):
            TaskStore(root, BASE)
        assert in_progress.exists()
        assert (root / "server.lock").read_text().strip() == str(holder.pid)
    finally:
        _kill(holder)
    # The kernel released the dead holder's lock: the restart opens the directory as its own.
    restarted = TaskStore(root, BASE)
    assert (root / "server.lock").read_text().strip() == str(os.getpid())
    assert restarted.tasks == {} and not in_progress.exists()  # collected by the lock's one owner
    TaskStore(root, BASE)  # a second store of the same process shares its lock


def test_a_second_inlaid_serve_exits_2_naming_the_directory_and_the_holder(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "state"
    holder = _start_holder(root, {"model_dir": str(model_dir), "quantized_dir": None})  # the server's own base
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\ndir = "{model_dir}"\n[server]\naddress = "tcp://127.0.0.1:{SERVE_PORT}"\n'
                      f'state_dir = "{root}"\n[executor]\nmax_num_seqs = 4\nnum_kv_blocks = 64\n')
    try:
        try:  # the old code started this server: it ran until killed here
            done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config),
                                   "--log-format", "text"], capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("a second `inlaid serve` on a locked state directory kept running")
    finally:
        _kill(holder)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    # One line, `inlaid serve: ...`, as every start-up refusal (checked before anything starts).
    assert done.stderr.startswith(f"inlaid serve: {root} is in use by another inlaid server (pid {holder.pid}") \
        and done.stderr.count("\n") == 1, output[-2000:]


def test_a_start_that_fails_leaves_no_state_directory_it_made(tmp_path: Path, model_dir: Path) -> None:
    """A server that never served (its address in use) removes the state directory it made,
    parents included: its registry.json, naming this start's base, refused the next start on
    another base, the config corrected (a config probe's finding). One that existed is kept."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for state_dir, existed in ((tmp_path / "made" / "deep" / "state", False), (tmp_path / "kept", True)):
            if existed:
                state_dir.mkdir()
            config = tmp_path / "server.toml"
            config.write_text(f'[model]\ndir = "{model_dir}"\n[server]\naddress = "tcp://127.0.0.1:'
                              f'{taken.getsockname()[1]}"\nstate_dir = "{state_dir}"\n')
            done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config),
                                   "--log-format", "text"], capture_output=True, text=True, timeout=120)
            # ... said in one line besides the log's record (there was only the record)
            assert done.returncode == 2 and "inlaid serve: cannot listen on server.address tcp://" in done.stderr, \
                done.stderr[-2000:]
            assert state_dir.exists() == existed, state_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "server.toml"]


def test_an_executor_address_in_use_is_one_line_naming_the_key(tmp_path: Path, model_dir: Path) -> None:
    """server.executor_address taken: `inlaid serve: cannot listen on server.executor_address
    ...`, exit 2, the state directory it made removed (it was `ZMQError: Address already in
    use`, naming no key, and the directory stayed: a config probe's finding)."""
    import socket

    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()  # a port for server.address, free now (nothing else binds it in this short window)
        executor_address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        state_dir = tmp_path / "made" / "state"
        config = tmp_path / "server.toml"
        config.write_text(f'[model]\ndir = "{model_dir}"\n[server]\naddress = "tcp://127.0.0.1:{free_port}"\n'
                          f'executor_address = "{executor_address}"\nstate_dir = "{state_dir}"\n')
        done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config),
                               "--log-format", "text"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"inlaid serve: cannot listen on server.executor_address {executor_address}: " in done.stderr, \
        done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "made").exists(), done.stderr[-2000:]


def test_saves_interleaved_with_another_save_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that starts while another is between writing and renaming (another thread, or
    the old fixed name shared by a second writer): both complete, the registry is whole."""
    store = TaskStore(tmp_path / "state", BASE)
    real_fsync = os.fsync
    nested = []

    def fsync_with_another_save(descriptor: int) -> None:
        real_fsync(descriptor)
        if not nested:
            nested.append(True)
            store.next_version = 7
            store.save()  # the other writer, mid-way through the first save

    monkeypatch.setattr(os, "fsync", fsync_with_another_save)
    store.next_version = 3
    store.save()  # the old code: FileNotFoundError (the other writer renamed the shared name away)
    monkeypatch.undo()
    assert nested
    assert json.loads((tmp_path / "state" / REGISTRY_FILE).read_text())["next_version"] == 3  # the last rename
    assert not list((tmp_path / "state").glob("*.tmp"))


def test_temporaries_a_crash_left_are_removed_at_the_next_open(tmp_path: Path) -> None:
    root = tmp_path / "state"
    TaskStore(root, BASE).save()
    crashed = [root / f"{REGISTRY_FILE}.tmp", root / f"{REGISTRY_FILE}.999999.140.0a1b2c3d.tmp"]
    for file in crashed:
        file.write_text('{"format": 1, "tru')
    again = TaskStore(root, BASE)
    assert again.next_version == 1 and not any(file.exists() for file in crashed)


def test_a_directory_made_again_is_locked_again(tmp_path: Path) -> None:
    """This process's locks were remembered by the directory's (device, inode) for good: a state
    directory removed and made again (its inode number reused, or its lock file gone) was
    taken as locked, and a second server opened it beside this one."""
    import shutil

    root = tmp_path / "state"
    TaskStore(root, BASE)
    shutil.rmtree(root)
    root.mkdir()  # the same inode number is likely; the lock file either way is a new one
    os.rmdir(root)
    TaskStore(root, BASE)
    assert (root / "server.lock").read_text().strip() == str(os.getpid())
    (root / "server.lock").unlink()  # the same directory, its lock file gone
    TaskStore(root, BASE)
    assert (root / "server.lock").read_text().strip() == str(os.getpid())
    other = subprocess.run([sys.executable, "-c", HOLDER, str(root), json.dumps(BASE)], capture_output=True,
                           text=True, timeout=60)
    assert other.returncode != 0 and "is in use by another inlaid server" in other.stderr, other.stderr[-2000:]
