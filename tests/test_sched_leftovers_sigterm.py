"""SIGTERM while `inlaid serve` runs its start-up scheduler tuning: the server stops within
seconds with exit 0 and says the tuning was abandoned. Before, it waited for the whole
tuning; with a slow one the shutdown watchdog dumped every thread's stack and exited 1.
Coordinator.run waits for the tuning through retuning.StartupTuning.

While it tunes the server answers health (`starting`) and stats, and holds a generate
(startup_hold.py), which the SIGTERM then answers `shutting_down`: before, the port answered
nothing until the tuning ended (a health check timed out, the HTTP front said "unreachable")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from inlaid.client import Client, ShuttingDownError

ADDRESS = "tcp://127.0.0.1:20680"
COST_MODEL = Path(__file__).resolve().parent.parent / "bench" / "results" / "sched_cost_model.json"

# `inlaid serve` with every simulation of the tuning slowed to a slow machine's pace (44 of
# them: minutes in all).
SLOW_TUNING_SERVE = '''
import sys, time
import inlaid.scheduling.simulator as simulator
real = simulator.simulate
def slow(*args, **kwargs):
    time.sleep(2.0)
    return real(*args, **kwargs)
simulator.simulate = slow
from inlaid.cli import main
sys.exit(main())
'''


def _generate(answers: list[object]) -> None:
    with Client(ADDRESS, timeout_s=60) as client:
        try:
            answers.append(client.generate("hello", max_tokens=2))
        except Exception as error:  # noqa: BLE001  (what it got is the assertion)
            answers.append(error)


def test_sigterm_during_the_start_up_tuning_stops_the_server_at_once(tmp_path: Path) -> None:
    (tmp_path / "serve_slow_tuning.py").write_text(SLOW_TUNING_SERVE)
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\naddress = "{ADDRESS}"\npolicy = "inlaid"\n'
                      f'state_dir = "{tmp_path / "state"}"\nshutdown_grace_s = 5\n'
                      f'[executor]\nmax_num_seqs = 4\nnum_kv_blocks = 128\n'
                      f'[scheduler]\nautotune_cost_model = "{COST_MODEL}"\n')
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, str(tmp_path / "serve_slow_tuning.py"), "serve", "--config",
                                   str(config), "--log-format", "text"], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        # The executor up (its model loaded): what is left of the start is the tuning alone.
        while "executor connected" not in log_path.read_text() and time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        assert "tuning the inlaid policy" in log_path.read_text() and "coordinator listening" not in \
            log_path.read_text(), "SIGTERM must come while the server tunes"
        with Client(ADDRESS, timeout_s=5) as client:
            health = client.health()
            assert (health.status, health.executor_ready) == ("starting", True), health
            held: list[object] = []
            generate = threading.Thread(target=_generate, args=(held,))
            generate.start()
            waited = time.monotonic() + 30
            while (stats := client.stats()).requests_held == 0 and time.monotonic() < waited:
                time.sleep(0.05)
            assert (stats.requests_held, stats.requests_received) == (1, 0), stats  # held, not yet a request
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            generate.join(30)
        assert len(held) == 1 and isinstance(held[0], ShuttingDownError), held  # answered, not lost
        try:
            code = server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
        stopped_in = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log_path.read_text()
    assert code == 0 and stopped_in < 10, (code, stopped_in, text[-2000:])
    assert "scheduler tuning abandoned: the server stops" in text
    assert "Thread 0x" not in text and "scheduler tuning failed" not in text  # no watchdog dump, no "failed"
    assert not list((tmp_path / "state").glob("scheduler-tuning-*.json")), "an unfinished tuning is not cached"
