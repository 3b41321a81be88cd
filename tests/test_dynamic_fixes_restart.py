"""The outside probe's first finding, on a real server: a config task removed live, a job
run while it was out, the server stopped (SIGTERM) mid-job and restarted with the same config
(which lists the task again). The job used to fail at its first layer not yet rewritten
(`KeyError: 'beta'`), and so did every later addition; now it and the next one finish, the
task left out of the aggregate, and the log says so (docs/dynamic-tasks.md, "Removing a task")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tiny_llama import make_adapter, make_tiny_model, quantize_full, write_calibration
from inlaid.quant.calibration import CalibrationTask
from inlaid.serve.launcher import ServerProcess

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # ~45 s: two servers
pytest.importorskip("peft")
TOKEN = "restart-test-token-0123456789"
LAYERS = 8  # enough that a slow-paced job can be stopped between its first and last layer
EXECUTOR = dict(dtype="float32", threads=1, num_kv_blocks=128, block_size=16, max_lora_slots=4, max_lora_rank=8,
                max_num_seqs=4)


def _job_starts(logs: str, task: str) -> list[int]:
    return [json.loads(line)["start_layer"] for line in logs.splitlines()
            if '"job started"' in line and f'"task": "{task}"' in line]


def test_a_config_task_removed_live_then_listed_again_breaks_no_job(tmp_path, model_dir):
    model = make_tiny_model(tmp_path / "model", model_dir, layers=LAYERS)
    names = ("alpha", "beta", "gamma", "delta")
    adapters = {name: make_adapter(model, tmp_path / f"adapter_{name}", seed=i + 1) for i, name in enumerate(names)}
    calibration = {name: write_calibration(tmp_path / f"{name}.jsonl", name, 4) for name in names}
    quantize_full(model, [CalibrationTask(n, adapters[n], calibration[n]) for n in ("alpha", "beta")], tmp_path / "ab")
    config = {
        "model": {"dir": str(model), "quantized_dir": str(tmp_path / "ab")},
        "executor": EXECUTOR,
        "server": {"admin_token": TOKEN, "state_dir": str(tmp_path / "state"), "shutdown_grace_s": 5.0},
        "requantizer": {"duty_cycle": 0.3, "idle_duty_cycle": 0.3},  # slow enough to be stopped mid-job
        "tasks": {"alpha": str(adapters["alpha"]), "beta": str(adapters["beta"])},
    }
    (tmp_path / "run1").mkdir()
    first = ServerProcess(config, workdir=tmp_path / "run1")
    try:
        first.wait_ready(180)
        with first.client(timeout_s=60) as client:
            assert "next restart" in client.remove_task("beta")
            client.add_task("gamma", str(adapters["gamma"]), str(calibration["gamma"]))
            deadline = time.monotonic() + 120
            while True:
                status = client.task_status("gamma")
                if status.phase == "requantizing" and 1 <= status.layers_done < status.layers_total - 1:
                    break
                assert status.phase in ("queued", "requantizing") and time.monotonic() < deadline, status
                time.sleep(0.02)
    finally:
        first.terminate()
    assert "beta" not in json.loads((tmp_path / "state/quant/hessian_state/task_costs.json").read_text())
    (tmp_path / "run2").mkdir()
    second = ServerProcess(config, workdir=tmp_path / "run2")  # the config lists beta again
    try:
        second.wait_ready(180)
        with second.client(timeout_s=60) as client:
            gamma = client.wait_task("gamma", timeout_s=240)
            client.add_task("delta", str(adapters["delta"]), str(calibration["delta"]))
            delta = client.wait_task("delta", timeout_s=240)
        logs = second.logs()
    finally:
        second.terminate()
    assert gamma.phase == "ready" and gamma.layers_done == LAYERS, gamma  # was: failed, KeyError: 'beta'
    assert delta.phase == "ready", delta  # every later addition failed the same way
    assert _job_starts(logs, "gamma")[0] >= 1  # it did resume mid-job, past layers written without beta
    left_out = [json.loads(line) for line in logs.splitlines() if "left out of the aggregate" in line]
    assert left_out and {entry["left_out"] for entry in left_out} == {"beta"}
