"""A Ray replica's Inlaid server: `inlaid serve` as the replica process's child, in a temp
folder of its own (its config, log and ipc socket), killed with the replica however the
replica dies (PR_SET_PDEATHSIG), and the folders of replicas that died without cleaning up
removed by the next replica on the node.

The server is started without a `preexec_fn`: with one, Python forks the replica (dozens of
Ray threads) and runs code in the child before exec with the replica's signal handlers in
place, Ray's C++ fatal-signal handler among them, which arms `alarm()` (the one alarm in
the replica's libraries). An alarm armed there survives exec: a CI run's ready server
died of SIGALRM (exit code -14). Without one, Python vforks and resets every handler in
the child before exec. The server process sets its own parent-death signal instead (`main`
below), and clears an alarm it may have been handed all the same."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inlaid.client import Client
from inlaid.serve.ipc_dirs import ipc_root, process_alive
from inlaid.serve.launcher import stop_process, to_toml

_WORKDIR_PREFIX = "inlaid-replica-"
_OWNER_FILE = "replica.pid"  # the replica process whose server the folder holds


def _remove_orphaned_workdirs() -> None:
    """Folders of replicas that died without cleaning up (SIGKILL, the node's OOM killer: Ray
    then starts a new replica, which lands here). A folder without an owner file is being
    made right now, or predates them: left alone."""
    roots = dict.fromkeys((tempfile.gettempdir(), ipc_root()))  # where a deep $TMPDIR sent them too
    for workdir in (found for root in roots for found in Path(root).glob(f"{_WORKDIR_PREFIX}*")):
        try:
            owner = int((workdir / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        # A zombie counts as gone: a SIGKILLed replica stays one until Ray's raylet reaps it,
        # and its replacement may start before that.
        if not process_alive(owner):
            shutil.rmtree(workdir, ignore_errors=True)


class ChildServer:
    """`inlaid serve` as this process's child. It is started from a thread that lives exactly
    as long as the child (PR_SET_PDEATHSIG fires when the *thread* that forked exits), so the
    server is killed when the replica process dies, however it dies."""

    def __init__(self, sections: dict[str, dict[str, Any]], start_timeout_s: float,
                 on_exit: Callable[[int], None] | None = None) -> None:
        """on_exit(returncode): called (from the server's own thread) when the server exits
        after it became ready and without `stop`; a start that fails raises instead."""
        _remove_orphaned_workdirs()
        # its server's socket lives here: under a short root where $TMPDIR is too deep for one
        self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX, dir=ipc_root()))
        (self.workdir / _OWNER_FILE).write_text(str(os.getpid()))
        self.process: subprocess.Popen[bytes] | None = None
        self._on_exit = on_exit
        self._ready = False
        self._stopping = False
        try:
            self._start(sections, start_timeout_s)
        except BaseException:
            # A server that never became ready leaves no replica to clean up after it: Ray
            # just retries the constructor, so each failed start would leak a temp folder.
            self.stop(timeout_s=5.0)
            raise

    def _start(self, sections: dict[str, dict[str, Any]], start_timeout_s: float) -> None:
        self.address = f"ipc://{self.workdir}/server.ipc"
        self.admin_token = secrets.token_hex(16)  # the replica is the server's only admin
        server = {k: v for k, v in sections.get("server", {}).items()
                  if k not in ("address", "admin_token", "admin_token_env", "admin_token_file")}
        config = {**sections, "server": {**server, "address": self.address, "admin_token": self.admin_token},
                  "tasks": {}}
        (self.workdir / "server.toml").write_text(to_toml(config))
        self.log_path = self.workdir / "server.log"
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), name="inlaid-server", daemon=True).start()
        started.wait()
        self._wait_ready(start_timeout_s)
        self._ready = True

    def _run(self, started: threading.Event) -> None:
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(os.getpid()), str(self.workdir / "server.toml")],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )  # fmt: skip
                started.set()
                returncode = self.process.wait()
            if self._ready and not self._stopping and self._on_exit is not None:
                self._on_exit(returncode)
        finally:
            started.set()  # a failed Popen must not leave the constructor waiting forever

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with Client(self.address, timeout_s=5.0) as client:
            while True:
                if not self.alive:
                    raise RuntimeError(f"the replica's Inlaid server exited:\n{self.logs()[-3000:]}")
                try:
                    client.wait_ready(timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the replica's Inlaid server was not ready in {timeout_s:g} s:\n"
                                           f"{self.logs()[-3000:]}") from None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: the server finishes in-flight requests, then exits."""
        self._stopping = True
        if self.process is not None:
            stop_process(self.process, timeout_s)
        shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """The server process: `python -m inlaid.integrations.ray_child <replica pid> <config>`.
    PR_SET_PDEATHSIG fires when the thread that started this process exits; that thread waits
    on this process, so it exits only with the replica. A replica that died before the prctl
    below is seen in the parent pid (this process was handed to another)."""
    replica_pid, config_path = int(argv[0]), argv[1]
    signal.alarm(0)  # the server never uses SIGALRM: an alarm armed before exec is not ours
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
        print(f"inlaid ray replica: PR_SET_PDEATHSIG failed ({os.strerror(ctypes.get_errno())}): this server "
              "would outlive its replica", file=sys.stderr)
        return 1
    if os.getppid() != replica_pid:
        print(f"inlaid ray replica: the replica (pid {replica_pid}) exited before its server started",
              file=sys.stderr)
        return 1
    from inlaid.cli import main as cli_main

    return cli_main(["serve", "--config", config_path])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
