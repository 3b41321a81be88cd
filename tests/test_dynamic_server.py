"""Dynamic task addition on a real server: coordinator, executor and requantizer processes on
loopback, serving a tiny random Llama quantized (MLGPTQ, state stored) for alpha and beta.

Tasks are added under a steady multi-task load, the requantizer is SIGKILLed mid-job, the
whole server is SIGKILLed mid-job and restarted on its state directory, a task is removed.
Every committed layer and every served answer is compared with an offline incremental run
of the same additions (inlaid.quant.incremental, computed here) and with the in-process
engine on its checkpoint. The tests run in order on one state directory."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tiny_llama import make_adapter, make_tiny_model, quantize_full, write_calibration
from inlaid.cli import main as cli_main
from inlaid.client import InvalidRequestError, TaskBusyError, UnauthorizedError, UnknownTaskError
from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, WEIGHTS_FILE
from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings
from inlaid.quant.incremental_linears import read_layer_tensors
from inlaid.quant.incremental_cli import write_incremental_checkpoint
from inlaid.quant.job_effect import JobEffect, LinearEffect, job_effect
from inlaid.serve.launcher import ServerProcess

pytest.importorskip("peft")
TOKEN = "dynamic-test-token-0123456789"
LAYERS = 4
PROMPT = "Tell me about gamma3 and delta1."
MAX_TOKENS = 6
ADDED = ("gamma", "delta", "epsilon")
EXECUTOR = dict(dtype="float32", threads=1, num_kv_blocks=128, block_size=16, max_lora_slots=4, max_lora_rank=8,
                max_model_len=256)


@dataclass
class World:
    root: Path
    model: Path
    adapters: dict[str, Path]
    calibration: dict[str, Path]
    references: dict[str, Path]  # after adding X: the offline incremental checkpoint
    effects: dict[str, JobEffect]  # ... and what it did to the tasks already in
    server: ServerProcess | None = None
    logs: list[str] = field(default_factory=list)

    def config(self) -> dict:
        return {
            "model": {"dir": str(self.model), "quantized_dir": str(self.root / "ab")},
            "executor": EXECUTOR,
            "server": {"admin_token": TOKEN, "state_dir": str(self.root / "state"), "shutdown_grace_s": 5.0},
            # jobs paced out (10 % of a core, busy or idle) so that a test can act while one is mid-way
            "requantizer": {"duty_cycle": 0.1, "idle_duty_cycle": 0.1},
            "tasks": {"alpha": str(self.adapters["alpha"]), "beta": str(self.adapters["beta"])},
        }

    def start(self) -> ServerProcess:
        workdir = self.root / f"run{len(self.logs)}"
        workdir.mkdir()
        self.server = ServerProcess(self.config(), workdir=workdir)
        self.server.wait_ready(180)
        return self.server

    def registry(self) -> dict:
        return json.loads((self.root / "state" / "registry.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("dynamic_server")
    model = make_tiny_model(root / "model", model_dir, layers=LAYERS)
    names = ("alpha", "beta", *ADDED)
    adapters = {name: make_adapter(model, root / f"adapter_{name}", seed=index + 1) for index, name in enumerate(names)}
    calibration = {name: write_calibration(root / f"{name}.jsonl", name, 5 + index) for index, name in enumerate(names)}
    quantize_full(model, [CalibrationTask(n, adapters[n], calibration[n]) for n in ("alpha", "beta")], root / "ab")
    references, effects, previous = {}, {}, root / "ab"
    for name in ADDED:  # the additions the server will make, offline, with its default settings
        out = root / f"ref_{name}"
        quantizer = IncrementalQuantizer(model, previous, CalibrationTask(name, adapters[name], calibration[name]),
                                         IncrementalSettings(), out / HESSIAN_STATE_DIR)
        outcomes = list(quantizer.layers())
        write_incremental_checkpoint(quantizer, outcomes, out)
        references[name] = previous = out
        effects[name] = job_effect(LinearEffect(d.change, d.errors_served, d.errors_new, d.swapped)
                                   for outcome in outcomes for d in outcome.decisions)
    world = World(root, model, adapters, calibration, references, effects)
    world.start()
    yield world
    if world.server is not None:
        world.server.terminate()


class Load:
    """A steady multi-task load: threads sending generates until stopped; counts outcomes."""

    def __init__(self, server: ServerProcess, tasks: list[str | None], threads: int = 3) -> None:
        self.server, self.tasks = server, tasks
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        with self.server.client(timeout_s=120) as client:
            count = 0
            while not self._stop.is_set():
                task = self.tasks[(index + count) % len(self.tasks)]
                try:
                    client.generate(f"Request {count} of worker {index}", task=task, max_tokens=4)
                    self.done += 1
                except Exception as error:  # any failure is what this test counts
                    self.failures.append(f"{type(error).__name__}: {error}")
                count += 1
                self._stop.wait(0.05)  # steady, not saturating: clients think between requests

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


def _reference_tokens(world: World, checkpoint: Path, tasks: list[str]) -> dict[str, list[int]]:
    """The in-process engine's greedy answer to PROMPT for each task, on `checkpoint`."""
    from inlaid.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.local(EngineConfig(model_dir=str(world.model), quantized_dir=str(checkpoint), **EXECUTOR))
    for task in tasks:
        engine.register_adapter(task, str(world.adapters[task]))
    sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = engine.generate([PROMPT] * len(tasks), [sampling] * len(tasks), tasks)
    return {task: output.token_ids for task, output in zip(tasks, outputs)}


def _served_tokens(world: World, tasks: list[str]) -> dict[str, list[int]]:
    with world.server.client(timeout_s=120) as client:  # one request at a time: the reference's batch shape
        return {task: client.generate(PROMPT, task=task, max_tokens=MAX_TOKENS, ignore_eos=True).token_ids
                for task in tasks}


def _assert_committed_match(world: World, task: str) -> int:
    """The layers committed for `task`'s version are exactly the offline run's changed layers,
    tensor for tensor; returns how many there are."""
    registry = world.registry()
    version = registry["tasks"][task]["version"]
    committed = {int(layer): entry["file"] for layer, entry in registry["layers"].items() if entry["version"] == version}
    reference = world.references[task]
    previous = world.references[ADDED[ADDED.index(task) - 1]] if task != ADDED[0] else world.root / "ab"
    for layer in range(LAYERS):
        expected = read_layer_tensors(reference / WEIGHTS_FILE, layer)
        before = read_layer_tensors(previous / WEIGHTS_FILE, layer)
        changed = any(not torch.equal(expected[key], before[key]) for key in expected)
        assert (layer in committed) == changed, layer
        if layer in committed:
            served = read_layer_tensors(world.root / "state" / committed[layer], layer)  # relative to the state dir
            assert all(torch.equal(served[key], expected[key]) for key in expected), layer
    return len(committed)


def _wait_mid_job(client, task: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = client.task_status(task)
        if status.phase == "requantizing" and 1 <= status.layers_done < status.layers_total:
            return
        assert status.phase in ("queued", "requantizing"), status
        time.sleep(0.05)
    raise AssertionError(f"{task} never got mid-way")


def _children(pid: int, marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker in cmdline:
            found.append(int(entry.name))
    return found


def _job_starts(logs: str, task: str) -> list[int]:
    starts = []
    for line in logs.splitlines():
        if '"job started"' in line and f'"task": "{task}"' in line:
            starts.append(json.loads(line)["start_layer"])
    return starts


def test_added_task_serves_at_once_and_is_requantized_under_load(world, capsys, monkeypatch):
    server = world.server
    with server.client(timeout_s=60) as client:
        with pytest.raises(UnknownTaskError):
            client.generate(PROMPT, task="gamma", max_tokens=2)
        load = Load(server, ["alpha", "beta", None])
        reply = client.add_task("gamma", str(world.adapters["gamma"]), str(world.calibration["gamma"]))
        assert "re-quantization queued (version 1)" in reply
        before = client.generate(PROMPT, task="gamma", max_tokens=MAX_TOKENS, ignore_eos=True).token_ids
        assert client.task_status("gamma").layers_swapped == 0  # so `before` ran on the old base
        status = client.wait_task("gamma", timeout_s=180)
        load.stop()
        assert status.phase == "ready" and status.layers_done == LAYERS, status
        assert client.stats().executor_restarts == 0
    assert load.failures == [] and load.done > 0
    swapped = _assert_committed_match(world, "gamma")
    assert swapped >= 1 and status.layers_swapped == swapped
    assert before == _reference_tokens(world, world.root / "ab", ["gamma"])["gamma"]
    after = _served_tokens(world, ["alpha", "gamma"])
    assert after == _reference_tokens(world, world.references["gamma"], ["alpha", "gamma"])
    # what the job did to the tasks already served, as quantize-add reports it for the same addition
    expected = world.effects["gamma"]
    assert expected is not None and {e.task for e in expected.tasks} == {"alpha", "beta", "gamma"}
    assert status.change_threshold == IncrementalSettings().change_threshold
    assert status.aggregate_change_median == pytest.approx(expected.change_median, rel=1e-5)
    assert status.aggregate_change_max == pytest.approx(expected.change_max, rel=1e-5)
    assert [(e.task, e.error_before, e.error_after) for e in status.task_errors] == [
        (e.task, pytest.approx(e.error_before, rel=1e-5), pytest.approx(e.error_after, rel=1e-5))
        for e in expected.tasks]
    stored = world.registry()["tasks"]["gamma"]  # kept as totals at the job's end, not per linear and task
    assert stored["effect"]["tasks"].keys() == {"alpha", "beta", "gamma"}
    assert not any("errors_served" in decision for decision in stored["decisions"])
    monkeypatch.setenv("INLAID_ADMIN_TOKEN", TOKEN)  # the CLI prints it as quantize-add does
    capsys.readouterr()
    assert cli_main(["client", "--address", server.address, "task-status", "gamma"]) == 0
    printed = capsys.readouterr().out
    assert f"aggregate moved: median {100 * expected.change_median:.2f} %" in printed, printed
    for task in expected.tasks:
        assert f"  {task.task}: mean relative error {task.error_before:.3e} -> {task.error_after:.3e}" in printed


def _requantizer_series(client) -> dict[str, float]:
    """The requantizer's series in /metrics, read by Prometheus' own parser."""
    series = {}
    for family in text_string_to_metric_families(client.metrics()):
        for sample in family.samples:
            if "requantiz" in sample.name:
                series[sample.name + "".join(f"{{{v}}}" for v in sample.labels.values())] = sample.value
    return series


def test_requantizer_killed_mid_job_resumes(world):
    server = world.server
    with server.client(timeout_s=60) as client:
        before, metrics_before = client.stats().requantizer, _requantizer_series(client)
        load = Load(server, ["alpha", "gamma", None])
        client.add_task("delta", str(world.adapters["delta"]), str(world.calibration["delta"]))
        _wait_mid_job(client, "delta")
        victims = _children(server.pid, "inlaid.serve.requantizer")
        assert len(victims) == 1
        mid_job = client.stats().requantizer
        assert (mid_job.state, mid_job.job, mid_job.pid) == ("running", "delta", victims[0]), mid_job
        assert client.health().requantizer == "running"
        os.kill(victims[0], signal.SIGKILL)
        status = client.wait_task("delta", timeout_s=180)
        load.stop()
        assert status.phase == "ready", status
        assert client.stats().executor_restarts == 0
        after, metrics_after = client.stats().requantizer, _requantizer_series(client)
        assert client.health().requantizer == "idle"
    # the loss, the job and its layers are counted (the module's earlier job counted before)
    assert before.state == "idle" and after.state == "idle" and after.job == "" and after.jobs_queued == 0
    assert after.processes_lost == before.processes_lost + 1
    assert (after.jobs_succeeded, after.jobs_failed) == (before.jobs_succeeded + 1, before.jobs_failed)
    assert after.layers_done >= before.layers_done + LAYERS
    assert metrics_after["inlaid_requantizer_losses_total"] == after.processes_lost
    assert metrics_after["inlaid_requantization_jobs_total{succeeded}"] == after.jobs_succeeded
    assert metrics_after["inlaid_requantization_layers_total"] == after.layers_done
    assert metrics_before["inlaid_requantization_jobs_total{succeeded}"] == before.jobs_succeeded
    assert after.pid not in (0, victims[0]) and metrics_after["inlaid_requantizer_up"] == 1  # the restarted one
    assert metrics_after["inlaid_requantization_jobs_queued"] == 0
    assert metrics_after["inlaid_requantization_job_running"] == 0
    assert load.failures == [] and load.done > 0
    starts = _job_starts(server.logs(), "delta")
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 1  # resumed, not redone
    assert _children(server.pid, "inlaid.serve.requantizer") not in ([], victims)
    _assert_committed_match(world, "delta")


def test_server_killed_mid_job_recovers_its_state(world):
    server = world.server
    with server.client(timeout_s=60) as client:
        client.add_task("epsilon", str(world.adapters["epsilon"]), str(world.calibration["epsilon"]))
        _wait_mid_job(client, "epsilon")
    helpers = _children(server.pid, "inlaid.serve.")
    server.process.kill()  # a crash, not a shutdown
    server.process.wait(30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)  # the executor and requantizer follow their coordinator (PDEATHSIG)
    assert not any(Path(f"/proc/{pid}").exists() for pid in helpers)
    world.logs.append(server.logs())
    server.terminate()
    server = world.start()
    with server.client(timeout_s=60) as client:
        assert {t.name for t in client.list_tasks()} >= {"alpha", "beta", *ADDED}
        assert client.task_status("epsilon").phase in ("queued", "requantizing")
        status = client.wait_task("epsilon", timeout_s=180)
        assert status.phase == "ready", status
        # The restart's restore and the job's swaps ran as plans of layer swaps only: no steps,
        # and no step time (their seconds made mean_step_seconds read 2.8 s at 0 steps).
        stats = client.stats()
        assert stats.steps == 0 and stats.mean_step_seconds == stats.mean_compute_seconds == 0.0, stats
    before_crash = _job_starts(world.logs[-1], "epsilon")
    after_restart = _job_starts(server.logs(), "epsilon")
    assert before_crash == [0] and len(after_restart) == 1 and after_restart[0] >= 1
    _assert_committed_match(world, "epsilon")
    tasks = ["alpha", *ADDED]
    assert _served_tokens(world, tasks) == _reference_tokens(world, world.references["epsilon"], tasks)


def test_remove_task_and_admin_errors(world, tmp_path):
    server = world.server
    with server.client(timeout_s=60) as client:
        served_version = client.task_status("gamma").served_version
        assert "removed" in client.remove_task("delta")
        with pytest.raises(UnknownTaskError):
            client.generate(PROMPT, task="delta", max_tokens=2)
        with pytest.raises(UnknownTaskError):
            client.task_status("delta")
        assert "delta" not in {t.name for t in client.list_tasks()}
        assert client.task_status("gamma").served_version == served_version  # the base is not re-quantized
        assert "delta" in world.registry()["dropped"]  # its Hessians serve no later aggregate
        broken = tmp_path / "broken.jsonl"
        broken.write_text("{not json\n")
        with pytest.raises(InvalidRequestError, match="not JSON"):
            client.add_task("zeta", str(world.adapters["delta"]), str(broken))
        with pytest.raises(InvalidRequestError):
            client.add_task("zeta", str(tmp_path), str(world.calibration["delta"]))
        client.add_task("zeta", str(world.adapters["delta"]), str(world.calibration["delta"]))
        version = client.task_status("zeta").version
        # The same files and samples again (a deployment script adding its tasks at every run):
        # nothing changes, the job goes on. It was task_busy.
        again = client.add_task("zeta", str(world.adapters["delta"]), str(world.calibration["delta"]))
        # (a job that ended meanwhile: the same files and samples its Hessians came from, as ever)
        assert re.search(rf"same files and calibration samples: its re-quantization job \(version {version}\) is "
                         r"(queued|running), as before", again) or "nothing to re-quantize" in again, again
        status = client.task_status("zeta")
        assert status.version == version and status.phase in ("queued", "requantizing", "ready"), status
        # Other samples would change its job: its message says which state refuses them ("being
        # re-quantized" was said for a job still queued).
        if status.phase != "ready":
            with pytest.raises(TaskBusyError, match=r"task 'zeta' is (queued to re-quantize|re-quantizing) the base"):
                client.add_task("zeta", str(world.adapters["delta"]), str(world.calibration["alpha"]))
        assert "cancelled" in client.remove_task("zeta") or status.phase == "ready"
        # The next job's report names the tasks whose Hessians left the aggregate since the
        # last job that ended ready (epsilon's): its move was charged to its own task alone.
        client.add_task("eta", str(world.adapters["delta"]), str(world.calibration["delta"]))
        done = client.wait_task("eta", timeout_s=300)
        assert done.phase == "ready", done
        named = re.search(r"since the previous job \([^)]*delta[^)]*\): part of its change is theirs", done.message)
        assert named, done
        assert world.registry()["last_job_drops"] == world.registry()["tasks"]["eta"]["aggregate_drops"]
        assert "delta" in world.registry()["last_job_drops"]
    with server.client(timeout_s=30, admin_token=None) as anonymous:
        with pytest.raises(UnauthorizedError):
            anonymous.task_status("gamma")
