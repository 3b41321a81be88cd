"""`bench/gpu.sh --dry-run`: the GPU suite's one command, run on the CPU (TRITON_INTERPRET=1,
tiny shapes), so that the day a GPU is lent the script runs in one call.

It builds the package into a private folder (and imports it from there), checks the
interpreted Triton GEMM and SGMV kernels against float64 references, times everything,
runs the decode step through the engine with decode graphs (graph == eager, also after
new adapters are written in place), measures the simulator's step costs, serves a trace
with `inlaid serve` and the transformers + PEFT server, and writes the report. The numbers of a dry run mean
nothing; that every stage runs and every check passes does.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_suite_versions(stages: dict) -> dict:
    return stages["environment"]["data"]["versions"]


def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    stages = report["stages"]
    assert report["dry_run"] and list(stages) == ["environment", "serving", "gemm", "sgmv_checks", "sgmv", "decode",
                                                    "gemm_configs", "step_costs", "e2e_replay"]
    for name, entry in stages.items():
        assert entry["status"] == "ok", (name, entry.get("reason"), entry.get("traceback"))
    e2e = stages["e2e_replay"]["data"]  # bench/e2e.py at smoke size: tests/test_bench_e2e.py checks its content
    assert {row["system"] for row in e2e["rows"]} == {"hf-peft", "inlaid-4bit-inlaid"}
    assert all(row["finished"] == row["requests"] == 3 for row in e2e["rows"])
    serving = stages["serving"]["data"]  # the servers on a random-weight model of the default's shape
    assert [r["system"] for r in serving["systems"]] == ["inlaid-4bit-fifo", "hf-peft", "inlaid-4bit-inlaid",
                                                          "inlaid-4bit-inlaid-graphs", "inlaid-4bit-mlfq"]
    requests = serving["settings"]["trace_requests"]
    for result in serving["systems"]:
        assert "failed" not in result, result
        assert result["trace"]["finished"] == requests and result["burst"]["failed"] == 0
        assert result["exact_lengths"] == 1.0  # ignore_eos + max_tokens: every system generated the trace's lengths
        if result["system"] != "hf-peft":  # the step log holds the trace's steps, all of them
            assert result["steps"]["steps"] > 0 and result["steps"]["mean_step_ms"] > 0
    assert serving["rate_rps"] > 0 and serving["isolated"]["tpot_s"] > 0
    # The suite ran on the package it built, not on the checkout or the venv's editable install.
    assert Path(stages["environment"]["data"]["inlaid"]).is_relative_to(tmp_path)

    gemm = stages["gemm"]["data"]
    assert {(c["bits"], c["M"]) for c in gemm["checks"]} == {(b, m) for b in (4, 3, 2) for m in (1, 16)}
    assert {(t["bits"], t["M"]) for t in gemm["timings"]} == {(b, m) for b in (4, 3, 2) for m in (1, 16)}
    assert {(c["op"], c["case"]) for c in stages["sgmv_checks"]["data"]["checks"]} == {
        (op, case) for op in ("shrink", "expand") for case in ("decode", "prefill")}
    assert {t["op"] for t in stages["sgmv"]["data"]["timings"]} == {"shrink", "expand"}
    decode = stages["decode"]["data"]
    assert [s["batch"] for s in decode["steps"]] == [1, 2, 4] and decode["graph_batch_sizes"] == [1, 2, 4]
    assert decode["graph_stats"]["replays"] > 0 and not decode["graph_stats"]["fallbacks"]
    costs = stages["step_costs"]["data"]  # sched_cost's shapes through the engine, fitted as sched_cost does
    steps = {row["label"]: row for row in costs["steps"]}
    assert steps["prefill 64 a1"]["features"]["tokens"] == 64 and steps["decode b64 ctx80 a8"]["features"]["sampled"] == 64
    assert all(row["median_seconds"] > 0 and row["features"]["loads"] == 0 for row in costs["steps"])
    assert all(value >= 0 for value in costs["coefficients"].values()) and costs["coefficients"]["loads"] == 0
    checks = [c for entry in stages.values() for c in entry.get("data", {}).get("checks", [])]
    configs = stages["gemm_configs"]["data"]
    assert [r["default"] for r in configs["decode"]] == [True] and len(configs["routes"]) == 1
    assert len(checks) == 6 + 4 + 3 + 1 + 10 and all(c["ok"] for c in checks)  # 10: the tiled variants
    assert all(0 <= c["relative_error"] < 1e-4 for c in checks)

    # Few files come back from a device call: the five servers' step logs are one file.
    steps = [json.loads(line) for line in gzip.open(out / "serving_steps.jsonl.gz", "rt")]
    assert {step["system"] for step in steps} == {r["system"] for r in serving["systems"]} - {"hf-peft"}
    assert sorted(p.name for p in out.iterdir()) == ["build.log", "gpu_suite.json", "gpu_suite.md", "gpu_suite.png",
                                                     "serving_steps.jsonl.gz"]
    assert gpu_suite_versions(stages)["peft"]  # the image's PEFT version is on record (the baseline uses its internals)
    assert (out / "build.log").is_file()
    assert "## Serving" in (out / "gpu_suite.md").read_text()
    assert "## Decode step" in (out / "gpu_suite.md").read_text() and "## Step costs" in (out / "gpu_suite.md").read_text()
    assert (out / "gpu_suite.png").stat().st_size > 10_000


def test_gpu_step_costs_become_the_simulators_cost_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The H200 run's step_costs stage (committed) read as sched_cost data: every measured
    shape, its wall clock as the fitted clock, and the fit it gives equals the committed
    model; a report whose stage did not run is refused by name."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from sched_cost import gpu_suite_steps

    from inlaid.scheduling.cost_model import StepCostModel, features_from_dict, fit_cost_model

    results = ROOT / "bench" / "results"
    data = gpu_suite_steps(results / "gpu_h200" / "run2-gpu_suite.json")
    assert data["device"] == "NVIDIA H200" and len(data["steps"]) == 162
    assert all(row["median_cpu_seconds"] == row["median_seconds"] > 0 for row in data["steps"])
    fitted = fit_cost_model([(features_from_dict(row["features"]), row["median_seconds"]) for row in data["steps"]])
    committed = StepCostModel.load(results / "sched_cost_model_h200.json")
    assert fitted.coefficients == pytest.approx(committed.coefficients, rel=1e-6, abs=1e-12)
    with pytest.raises(SystemExit, match="step_costs stage did not run"):
        gpu_suite_steps(results / "gpu_h200" / "run3-gpu_suite.json")
