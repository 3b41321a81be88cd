"""A hung requantizer is detected, killed and restarted like a dead one.

What /proc says of stopped, asleep, running and starved processes (the evidence the check
reads); the setting's validation; then a real server (coordinator, executor, requantizer on
loopback, a tiny random Llama quantized for alpha and beta) whose requantizer is SIGSTOPped
mid-job under load: it is killed after `progress_timeout_s`, its job resumes and finishes,
requests are served throughout and the queued task runs next; and a job cancelled while its
requantizer is stopped: the process is killed after CANCEL_TIMEOUT_S, charged to no task,
and the queue moves on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tiny_llama import make_adapter, make_tiny_model, quantize_full, write_calibration
from inlaid.quant.calibration import CalibrationTask
from inlaid.serve.config import ConfigError, config_from_dict
from inlaid.serve.launcher import ServerProcess
from inlaid.serve.requantization_jobs import CANCEL_TIMEOUT_S
from inlaid.serve.child_process import sample_process, wait_or_kill

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the check reads Linux /proc")
TOKEN = "liveness-test-token-0123456789"
PROGRESS_TIMEOUT_S = 3.0
LAYERS = 8  # enough that a job, between its first committed layer and its last, can be caught
EXECUTOR = dict(dtype="float32", threads=1, num_kv_blocks=128, block_size=16, max_lora_slots=4, max_lora_rank=8,
                max_model_len=256)
_SPIN = ("import os, sys\n"
         "if len(sys.argv) > 1: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
         "while True: pass")


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SPIN, *args])


def _cpu_moved(pid: int, seconds: float = 0.5) -> bool:
    before = sample_process(pid)
    time.sleep(seconds)
    after = sample_process(pid)
    assert before is not None and after is not None
    return after.cpu_ticks > before.cpu_ticks


def test_proc_samples_tell_stopped_and_asleep_from_running_and_starved():
    """Stopped (T) and asleep (S) processes use no CPU and are not runnable: the two a hang
    looks like. A running one uses CPU; a SCHED_IDLE one pinned beside a busy process on the
    same core is runnable even when its CPU time barely moves: starved, not hung."""
    sleeper = subprocess.Popen(["sleep", "60"])
    spinner, starved = _spawn(), _spawn("idle")
    try:
        os.sched_setaffinity(spinner.pid, {min(os.sched_getaffinity(0))})
        os.sched_setaffinity(starved.pid, {min(os.sched_getaffinity(0))})
        time.sleep(0.3)
        asleep = sample_process(sleeper.pid)
        assert asleep is not None and asleep.state == "S" and not asleep.runnable and not asleep.stopped
        assert not _cpu_moved(sleeper.pid)
        assert _cpu_moved(spinner.pid)
        starving = sample_process(starved.pid)
        assert starving is not None and starving.runnable and starving.state == "R"
        os.kill(spinner.pid, signal.SIGSTOP)
        time.sleep(0.2)
        stopped = sample_process(spinner.pid)
        assert stopped is not None and stopped.stopped and stopped.state == "T" and not stopped.runnable
        assert not _cpu_moved(spinner.pid)
    finally:
        for process in (sleeper, spinner, starved):
            process.kill()
            process.wait()
    assert sample_process(sleeper.pid) is None  # gone


def test_a_child_killed_where_that_loses_nothing_is_not_a_warning(caplog):
    """The requantizer asked to stop at SCHED_IDLE on a busy machine often does not run within
    the stop's timeout: the kill loses nothing (its job resumes), and each such stop logged a
    WARNING (an outside probe). Said at INFO with the reason; other children still warn."""
    import asyncio
    import logging

    async def stop(harmless: str) -> int | None:
        process = await asyncio.create_subprocess_exec("sleep", "60")
        await wait_or_kill(process, 0.2, "requantizer", harmless=harmless)
        return process.returncode

    caplog.set_level(logging.INFO, logger="inlaid")
    assert asyncio.run(stop("a job resumes from its last committed layer")) == -signal.SIGKILL
    assert asyncio.run(stop("")) == -signal.SIGKILL
    records = [(r.levelname, r.getMessage()) for r in caplog.records if "did not exit" in r.getMessage()]
    assert records == [("INFO", "requantizer did not exit within 0.2 s; killing it (a job resumes from its last "
                                "committed layer)"),
                       ("WARNING", "requantizer did not exit in time; killing it")]


@pytest.mark.parametrize("value", [0, -1.0, True, "60", float("nan")])
def test_progress_timeout_must_be_positive(tmp_path, value):
    with pytest.raises(ConfigError, match="progress_timeout_s"):
        config_from_dict({"requantizer": {"progress_timeout_s": value}}, base_dir=tmp_path)


def test_progress_timeout_default_and_setting(tmp_path):
    assert config_from_dict({}, base_dir=tmp_path).requantizer.progress_timeout_s == 120.0
    config = config_from_dict({"requantizer": {"progress_timeout_s": 2}}, base_dir=tmp_path)
    assert config.requantizer.progress_timeout_s == 2


# ---------------------------------------------------------------------------- a real server
@dataclass
class Rig:
    server: ServerProcess
    inputs: dict[str, tuple[str, str]]  # task -> (adapter dir, calibration file)
    state: Path

    def registry(self) -> dict:
        return json.loads((self.state / "registry.json").read_text())


@pytest.fixture(scope="module")
def rig(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("liveness")
    model = make_tiny_model(root / "model", model_dir, layers=LAYERS)
    names = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
    adapters = {name: make_adapter(model, root / f"adapter_{name}", seed=i + 1) for i, name in enumerate(names)}
    calibration = {name: write_calibration(root / f"{name}.jsonl", name, 5 + i) for i, name in enumerate(names)}
    quantize_full(model, [CalibrationTask(n, adapters[n], calibration[n]) for n in ("alpha", "beta")], root / "ab")
    config = {
        "model": {"dir": str(model), "quantized_dir": str(root / "ab")},
        "executor": EXECUTOR,
        "server": {"admin_token": TOKEN, "state_dir": str(root / "state"), "shutdown_grace_s": 5.0},
        # paced (half a core, busy or idle) so that a job can be caught mid-way; its pacing
        # sleeps (the first pays back the job's start-up) must not read as a hang
        "requantizer": {"duty_cycle": 0.5, "idle_duty_cycle": 0.5, "progress_timeout_s": PROGRESS_TIMEOUT_S},
        "tasks": {"alpha": str(adapters["alpha"]), "beta": str(adapters["beta"])},
    }
    (root / "run").mkdir()
    process = ServerProcess(config, workdir=root / "run")
    try:
        process.wait_ready(180)
        yield Rig(process, {name: (str(adapters[name]), str(calibration[name])) for name in names}, root / "state")
    finally:
        for pid in _requantizers(process.pid):  # one a failed test left stopped cannot exit on its own
            sample = sample_process(pid)
            if sample is not None and sample.stopped:
                os.kill(pid, signal.SIGKILL)
        process.terminate()


class Load:
    """One client sending short generates (alpha and the base) until stopped."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.server.client(timeout_s=60) as client:
            while not self._stop.is_set():
                try:
                    client.generate(f"Request {self.done}", task=("alpha", None)[self.done % 2], max_tokens=3)
                    self.done += 1
                except Exception as error:  # any failure is what this test counts
                    self.failures.append(f"{type(error).__name__}: {error}")
                self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _requantizers(coordinator: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == coordinator and b"inlaid.serve.requantizer" in cmdline and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _stop_mid_job(client, server: ServerProcess, task: str) -> int:
    """SIGSTOP the requantizer once `task`'s job has committed a layer and has more to do."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.task_status(task)
        if status.phase == "requantizing" and 1 <= status.layers_done < status.layers_total:
            (pid,) = _requantizers(server.pid)
            os.kill(pid, signal.SIGSTOP)
            return pid
        assert status.phase in ("queued", "requantizing"), status
        time.sleep(0.02)
    raise AssertionError(f"{task} never got mid-way")


def _alive(pid: int) -> bool:
    sample = sample_process(pid)
    return sample is not None and sample.state != "Z"


def _job_starts(logs: str, task: str) -> list[int]:
    return [json.loads(line)["start_layer"] for line in logs.splitlines()
            if '"job started"' in line and f'"task": "{task}"' in line]


def _kill_warnings(logs: str) -> list[str]:
    return [json.loads(line)["reason"] for line in logs.splitlines() if '"killing the requantizer"' in line]


def test_stopped_requantizer_is_killed_its_job_resumes_and_the_queue_moves(rig):
    """SIGSTOP mid-job, a second task queued, a load running: the stopped process is killed
    after progress_timeout_s (and only it: the pacing sleeps of the jobs around it, the first
    one paying back the whole start-up, are no hang), requests are served throughout, the job
    resumes at its first uncommitted layer and finishes, and the queued task runs next."""
    with rig.server.client(timeout_s=60) as client:
        client.add_task("gamma", *rig.inputs["gamma"])
        stopped = _stop_mid_job(client, rig.server, "gamma")
        client.add_task("delta", *rig.inputs["delta"])  # queued behind the stalled job
        load = Load(rig.server)
        started = time.monotonic()
        while _alive(stopped):
            assert time.monotonic() - started < PROGRESS_TIMEOUT_S + 20, "the stopped requantizer was never killed"
            assert client.task_status("delta").phase == "queued"
            time.sleep(0.05)
        took = time.monotonic() - started
        served_while_stalled = load.done
        messages = set()
        deadline = time.monotonic() + 60
        while client.task_status("gamma").phase == "requantizing" and time.monotonic() < deadline:
            messages.add(client.task_status("gamma").message)
            time.sleep(0.05)
        gamma = client.wait_task("gamma", timeout_s=120)
        delta = client.wait_task("delta", timeout_s=120)
        load.stop()
        assert client.stats().executor_restarts == 0
    assert gamma.phase == "ready" and gamma.layers_done == gamma.layers_total, gamma
    assert delta.phase == "ready", delta
    assert PROGRESS_TIMEOUT_S - 0.5 < took < PROGRESS_TIMEOUT_S + 20
    assert load.failures == [] and served_while_stalled > 0 and load.done > served_while_stalled
    logs = rig.server.logs()
    (reason,) = _kill_warnings(logs)  # one kill, logged with the process and why
    assert f"requantizer (pid {stopped}) was killed: no progress for" in reason
    assert "stopped (SIGSTOP) (state T)" in reason
    resumed = [m for m in messages if f"requantizer (pid {stopped}) was killed" in m]
    assert resumed, messages  # the task's status says why, while the job resumes
    layer = int(re.search(r"resuming at layer (\d+)", resumed[0]).group(1))  # type: ignore[union-attr]
    starts = _job_starts(logs, "gamma")
    assert layer >= 1 and starts[:2] == [0, layer]  # resumed at the first uncommitted layer, not redone
    assert _job_starts(logs, "delta") == [0]
    assert rig.registry()["tasks"]["gamma"]["attempts"] == 1  # counted toward max_attempts like a death


def test_cancel_to_a_stopped_requantizer_kills_it_and_charges_no_task(rig):
    """The probe's second half: a job removed while its requantizer is stopped. The queued
    task is not sent to the stopped process; that process is killed once it has not taken up
    the cancel within CANCEL_TIMEOUT_S, the kill is charged to no task, and the queued task
    runs on a fresh requantizer."""
    kills_before = len(_kill_warnings(rig.server.logs()))
    with rig.server.client(timeout_s=60) as client:
        client.add_task("epsilon", *rig.inputs["epsilon"])
        client.add_task("zeta", *rig.inputs["zeta"])  # queued
        stopped = _stop_mid_job(client, rig.server, "epsilon")
        assert "cancelled" in client.remove_task("epsilon")  # well within PROGRESS_TIMEOUT_S of the stop
        started = time.monotonic()
        while _alive(stopped):
            assert time.monotonic() - started < CANCEL_TIMEOUT_S + 10, "the stopped requantizer was never killed"
            assert client.task_status("zeta").phase == "queued"  # not sent to the stopped process
            time.sleep(0.05)
        took = time.monotonic() - started
        zeta = client.wait_task("zeta", timeout_s=120)
        alpha = client.generate("still serving", task="alpha", max_tokens=3)
    assert took >= CANCEL_TIMEOUT_S - 0.5 and alpha.token_ids
    assert zeta.phase == "ready" and "killed" not in zeta.message, zeta
    assert rig.registry()["tasks"]["zeta"]["attempts"] == 0
    (reason,) = _kill_warnings(rig.server.logs())[kills_before:]
    assert f"requantizer (pid {stopped}) was killed: it did not take up the cancel of job epsilon@" in reason
    assert "(it is stopped)" in reason
