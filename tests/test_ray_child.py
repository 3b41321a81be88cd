"""A Ray replica's Inlaid server process (inlaid/integrations/ray_child.py), without Ray.

A CI run saw a ready replica server die of SIGALRM (exit code -14): the server was started
with a `preexec_fn`, so Python forked the replica and ran code in the child with the
replica's signal handlers in place (Ray's C++ fatal-signal handler arms `alarm()`), and an
alarm armed before exec survives exec. Checked here: a server handed an alarm lives on and
answers; the server still dies with the process that started it (its parent-death signal is
now set by the server process itself); a server whose replica is gone before it starts exits
at once, saying so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from inlaid.client import Client
from inlaid.serve.ipc_dirs import process_alive
from inlaid.serve.launcher import stop_process, to_toml

ALARM_S = 2


def _sections(model_dir: Path, address: str) -> dict[str, dict[str, object]]:
    return {"model": {"dir": str(model_dir)},
            "executor": {"threads": 1, "num_kv_blocks": 64, "max_num_seqs": 4, "max_lora_slots": 1},
            "server": {"address": address, "log_level": "WARNING"}}  # fmt: skip


def test_a_server_handed_an_alarm_lives_on_and_answers(model_dir: Path, tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/server.ipc"
    config = tmp_path / "server.toml"
    config.write_text(to_toml(_sections(model_dir, address)))
    started = time.monotonic()
    # What Ray's handler leaves in a forked child: an alarm that survives exec.
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([sys.executable, "-m", "inlaid.integrations.ray_child", str(os.getpid()),
                                   str(config)], preexec_fn=lambda: signal.alarm(ALARM_S), stdout=output,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with Client(address, timeout_s=60) as client:
            deadline = time.monotonic() + 120
            while True:  # ready, or dead (the alarm killed it while it loaded): not a 120-s wait
                assert server.poll() is None, f"the server died (exit code {server.returncode}):\n{log.read_text()}"
                try:
                    client.wait_ready(timeout_s=1.0)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, log.read_text()
            time.sleep(max(0.0, started + ALARM_S + 1.0 - time.monotonic()))
            assert server.poll() is None, f"the server died (exit code {server.returncode}):\n{log.read_text()}"
            assert client.generate("Hi", max_tokens=2).finish_reason in ("stop", "length")
    finally:
        stop_process(server, 30.0)
    assert server.returncode == 0, log.read_text()


def test_the_server_dies_with_the_replica_that_started_it(model_dir: Path, tmp_path: Path) -> None:
    """A stand-in replica process starts a ChildServer and is SIGKILLed: its server follows."""
    stand_in = textwrap.dedent(f"""
        import sys, time
        from inlaid.integrations.ray_child import ChildServer
        server = ChildServer({_sections(model_dir, "unused")!r}, start_timeout_s=120.0)
        print(server.process.pid, server.workdir, flush=True)
        time.sleep(600)
    """)
    replica = subprocess.Popen([sys.executable, "-c", stand_in], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, workdir = replica.stdout.readline().split()  # type: ignore[union-attr]
        server_pid = int(pid_text)
        assert process_alive(server_pid)
        replica.kill()
        replica.wait(timeout=10)
        deadline = time.monotonic() + 15
        while process_alive(server_pid):
            assert time.monotonic() < deadline, "the server outlived its replica"
            time.sleep(0.1)
    finally:
        replica.kill()
        replica.wait(timeout=10)
        if "workdir" in locals():
            subprocess.run(["rm", "-rf", workdir], check=False)


def test_a_server_whose_replica_is_gone_exits_at_once(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    command = [sys.executable, "-m", "inlaid.integrations.ray_child", str(gone.pid), str(tmp_path / "never-read.toml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"the replica (pid {gone.pid}) exited before its server started" in result.stderr
