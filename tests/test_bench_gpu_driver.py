"""The GPU suite's driver (bench/gpu_suite.py, bench/gpu.sh): what makes its one device call
count. A stage cut by the call's time limit keeps what it saved and names what is left for
a second call; a stage that would not fit is not started; a suite missing what its stages
need refuses before it starts (it used to skip them and exit 0); the serving stage stops its
replays at its deadline; the adapters leave the git index for a call and come back
unchanged. The whole suite's dry run is tests/test_bench_gpu_suite.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_serving  # noqa: E402
import gpu_serving_inputs  # noqa: E402
import gpu_suite  # noqa: E402
from gpu_kernels import Device  # noqa: E402


HINT = "GPU_CALL_S=<device seconds left - 15> GPU_SUITE_STAGES={} bash bench/gpu.sh"


def _device(dry_run: bool, out_dir: Path | None = None) -> Device:
    return Device(torch.device("cpu"), torch.float32, dry_run, out_dir=out_dir)


def test_an_interrupted_stage_keeps_what_it_saved_and_names_what_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    def environment(device, report):  # noqa: ANN001, ANN202
        return {"device": "test"}

    saved = {"checks": [{"check": "the first", "relative_error": 1e-6, "ok": True}]}

    def checks(device, report):  # noqa: ANN001, ANN202
        device.save_partial(saved)
        raise KeyboardInterrupt  # what bench/gpu.sh's `timeout -s INT` delivers

    ran = []
    monkeypatch.setattr(gpu_suite, "STAGES", [("environment", environment), ("sgmv_checks", checks),
                                              ("gemm", lambda device, report: ran.append("gemm") or {})])
    written = []
    report = gpu_suite.run_stages(
        _device(dry_run=True), 100.0,
        after_stage=lambda r: written.append({n: e["status"] for n, e in r["stages"].items()}))
    stages = report["stages"]
    entry = stages["sgmv_checks"]
    assert entry["status"] == "failed" and "interrupted" in entry["reason"]
    assert entry["data"] == saved  # the partial save is kept
    assert stages["gemm"]["status"] == "skipped" and not ran
    # The report was written while the stage ran (its partial data), not only after it.
    assert {"environment": "ok", "sgmv_checks": "running", "gemm": "pending"} in written
    assert written[0] == {"environment": "pending", "sgmv_checks": "pending", "gemm": "pending"}  # named from the start
    assert gpu_suite.rerun_hint(report) == HINT.format("sgmv_checks,gemm")
    text = gpu_suite.markdown(report)
    assert "GPU_SUITE_STAGES=sgmv_checks,gemm" in text and "| sgmv_checks | the first |" in text
    # A stage left `running` (the process killed after its partial save) is named too.
    report["stages"]["sgmv_checks"]["status"] = "running"
    del report["stages"]["sgmv_checks"]["reason"]
    assert gpu_suite.rerun_hint(report) == HINT.format("sgmv_checks,gemm")


def test_a_second_interrupt_between_stages_still_leaves_a_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/gpu.sh's timeout signals the process group too: Python got SIGINT twice, and a
    KeyboardInterrupt outside a stage escaped without a report. The first ends the stage, the
    rest are ignored; one between stages (a report's write) starts no other stage."""
    import signal

    def environment(device, report):  # noqa: ANN001, ANN202
        return {"device": "test"}

    def twice(device, report):  # noqa: ANN001, ANN202
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler raises here
        return {}

    ran = []
    monkeypatch.setattr(gpu_suite, "STAGES", [("environment", environment), ("sgmv", twice),
                                              ("gemm", lambda device, report: ran.append("gemm") or {})])
    def after_stage(report: dict) -> None:  # the second SIGINT lands in the report's write after the stage
        if report["stages"]["sgmv"]["status"] == "failed" and not report.get("second"):
            report["second"] = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)

    report = gpu_suite.run_stages(_device(dry_run=True), 100.0, after_stage=after_stage)
    assert report["stages"]["sgmv"]["status"] == "failed" and not ran
    assert report["stages"]["gemm"]["reason"].startswith("interrupted before it started")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_on_a_gpu_a_stage_that_would_not_fit_is_not_started(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []

    def stage(name: str):  # noqa: ANN202
        return lambda device, report: ran.append(name) or {}

    names = ["environment", "serving", "gemm", "sgmv", "gemm_configs"]
    monkeypatch.setattr(gpu_suite, "STAGES", [(name, stage(name)) for name in names])
    # 50 s: serving needs its preparation and one system (60 s); sgmv (~10 s) fits, and gemm and
    # gemm_configs, which stop at the deadline themselves, need one bit width (25 s) or shape (40 s).
    report = gpu_suite.run_stages(_device(dry_run=False), 50.0)
    assert ran == ["environment", "gemm", "sgmv", "gemm_configs"]
    assert report["stages"]["serving"]["reason"].startswith("would not end within the budget")
    assert gpu_suite.rerun_hint(report) == HINT.format("serving")
    # On another device than the H200 (an H100), the times are half as long again, serving's aside.
    ran.clear()
    h100 = ("environment", lambda device, report: ran.append("environment") or {"device": "NVIDIA H100 80GB HBM3"})
    monkeypatch.setattr(gpu_suite, "STAGES", [h100] + [(name, stage(name)) for name in names[1:]])
    gpu_suite.run_stages(_device(dry_run=False), 55.0)
    assert ran == ["environment", "gemm", "sgmv"]  # serving's 60 s are not scaled; gemm_configs: 60 s here
    # A dry run's stages are tiny: only the budget's end counts there.
    ran.clear()
    gpu_suite.run_stages(_device(dry_run=True), 100.0)
    assert ran == names


def test_missing_needs_are_named_before_anything_runs(tmp_path: Path) -> None:
    def lacking(*modules: str):  # noqa: ANN202
        return lambda module: module not in modules

    problems = gpu_suite.preflight(["gemm", "decode", "serving"], has_module=lacking("zmq", "msgspec"),
                                   tokenizer=lambda: None)
    assert problems == {"decode": "msgspec not importable here", "serving": "msgspec, zmq not importable here; "
                        "the default model's tokenizer (.gpu_carry/tokenizer)"}
    # The kernel stages need neither; e2e_replay is skipped by design where the model is missing.
    assert gpu_suite.preflight(["gemm", "sgmv", "e2e_replay"], has_module=lacking("zmq", "msgspec"),
                               tokenizer=lambda: None) == {}
    assert gpu_suite.preflight(["serving"], has_module=lacking(), tokenizer=lambda: tmp_path) == {}


def test_stages_lacking_their_needs_are_skipped_and_the_rest_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal of the whole suite would have lost a lease's only call for want of a wheel:
    the kernel stages still run, the others say what they lack (the suite then exits 2)."""
    ran = []
    monkeypatch.setattr(gpu_suite, "STAGES", [(name, lambda device, report, name=name: ran.append(name) or {})
                                              for name in ("environment", "serving", "gemm")])
    report = gpu_suite.run_stages(_device(dry_run=True), 100.0, skip={"serving": "lacks msgspec not importable here"})
    assert ran == ["environment", "gemm"]
    assert report["stages"]["serving"]["reason"] == "lacks msgspec not importable here"
    assert gpu_suite.rerun_hint(report) == ""  # not a matter of time


def test_serving_skips_systems_past_its_deadline_and_saves_each(tmp_path: Path) -> None:
    """The preparation runs, then no system has the 30 s it needs before the suite's deadline:
    each is recorded as skipped, and the report is saved after each."""
    if gpu_serving_inputs.tokenizer_dir() is None:
        pytest.skip("no tokenizer: the default model is set up by `make test`")
    device = _device(dry_run=True, out_dir=tmp_path)
    saved = []
    device.save_partial = lambda data: saved.append(len(data["systems"]))
    device.deadline = time.monotonic() + 5.0
    data = gpu_serving.serving(device)
    assert [r["system"] for r in data["systems"]] == [s.label for s in gpu_serving.SYSTEMS]
    assert all(r["failed"].startswith("skipped: the serving stage's time was spent") for r in data["systems"])
    assert saved == [1, 2, 3, 4, 5] and data["rate_rps"] is None
    assert data["cut"].startswith("inlaid-4bit-fifo, hf-peft, ")  # the stage reads `partial`, named for a 2nd call


def test_a_replay_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    """A replay that cannot end by its deadline is stopped there: the requests not finished
    fail with the reason, the call returns soon after the deadline, the server still serves."""
    if gpu_serving_inputs.tokenizer_dir() is None:
        pytest.skip("no tokenizer: the default model is set up by `make test`")
    from inlaid.serve.launcher import ServerProcess

    settings = gpu_serving_inputs.DRY_RUN
    model_dir = gpu_serving_inputs.build_model(settings, gpu_serving_inputs.tokenizer_dir(), tmp_path / "model")
    adapters = gpu_serving_inputs.build_adapters(settings, model_dir, tmp_path / "adapters")
    trace, _ = gpu_serving_inputs.make_trace(settings, adapters)
    # 16 requests of 1,900 tokens each, 8 rows a step: thousands of steps, far past 2 s.
    long = [replace(r, arrival_s=0.0, output_tokens=1900, max_tokens=1900) for r in trace.requests[:16]]
    long_trace = gpu_serving_inputs.with_requests(trace, long)
    prompts = {r.source: [100 + i for i in range(8)] for r in long}
    config = gpu_serving.server_config(gpu_serving.System("fifo"), settings, model_dir, tmp_path / "none", adapters,
                                       tmp_path / "steps.jsonl")
    config["model"].pop("quantized_dir")
    (tmp_path / "server").mkdir()
    with ServerProcess(config, tmp_path / "server") as server:
        server.wait_ready(timeout_s=120.0)
        started = time.monotonic()
        records = gpu_serving._replay(server.address, long_trace, prompts, deadline=started + 2.0)
        took = time.monotonic() - started
        assert took < 20.0, took
        cut = [r for r in records if r.error]
        assert cut and all("the serving stage's deadline" in r.error for r in cut)
        short = gpu_serving_inputs.with_requests(trace, [replace(long[0], max_tokens=2)])
        again = gpu_serving._replay(server.address, short, prompts, deadline=time.monotonic() + 60.0)
        assert not again[0].error and len(again[0].token_ids) == 2


def test_adapters_leave_the_index_for_a_device_call_and_come_back(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # this checkout's gpu.sh, maybe uncommitted
    (clone / "bench" / "gpu.sh").write_bytes((ROOT / "bench" / "gpu.sh").read_bytes())
    git = ["git", "-C", str(clone)]

    def run(mode: str) -> str:
        done = subprocess.run(["bash", "bench/gpu.sh", mode], cwd=clone, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        assert done.returncode == 0, done.stderr
        return done.stdout

    weights = subprocess.run(git + ["ls-files", "adapters/*/adapter_model.safetensors"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(weights) >= 9
    said = run("--untrack-adapters")
    assert "MiB" in said and int(said.split("carries ")[1].split(" MiB")[0]) < 64
    assert subprocess.run(git + ["ls-files", "adapters/*/adapter_model.safetensors"], capture_output=True, text=True,
                          check=True).stdout == ""
    assert all((clone / path).is_file() for path in weights)  # the files stay; only the index forgets them
    # Nothing shows as untracked: the call would otherwise carry them all the same.
    assert subprocess.run(git + ["status", "--porcelain", "--untracked-files=all", "adapters"], capture_output=True,
                          text=True, check=True).stdout.strip().splitlines() == [
                              f"D  {path}" for path in sorted(weights)]
    run("--untrack-adapters")  # twice is the same
    run("--retrack-adapters")
    assert subprocess.run(git + ["status", "--porcelain", "--untracked-files=all", "adapters"], capture_output=True,
                          text=True, check=True).stdout == ""
    assert "adapter" not in (clone / ".git" / "info" / "exclude").read_text()


def test_a_system_cut_by_the_deadline_keeps_what_it_measured(tmp_path: Path) -> None:
    """Requests far longer than the stage's time: the phase the deadline falls in is stopped,
    the later ones are not started, and the system keeps its figures so far (a cut isolated
    request raised, and a burst cut to nothing made a rate of 0: the whole system was lost),
    which the report renders; the server stops soon after the deadline."""
    if gpu_serving_inputs.tokenizer_dir() is None:
        pytest.skip("no tokenizer: the default model is set up by `make test`")
    # 40 requests of 1,900 tokens at 8 rows a step: ~10,000 steps, far past the 20 s given
    settings = replace(gpu_serving_inputs.DRY_RUN, max_output_tokens=1900, trace_requests=40, burst_requests=40)
    model_dir = gpu_serving_inputs.build_model(settings, gpu_serving_inputs.tokenizer_dir(), tmp_path / "model")
    adapters = gpu_serving_inputs.build_adapters(settings, model_dir, tmp_path / "adapters")
    trace, _ = gpu_serving_inputs.make_trace(settings, adapters)
    trace = gpu_serving_inputs.with_requests(
        trace, [replace(r, output_tokens=1900, max_tokens=1900) for r in trace.requests])
    inputs = {"model_dir": model_dir, "quantized_dir": gpu_serving_inputs.quantize(settings, model_dir, tmp_path / "q"),
              "adapters": adapters, "trace": trace, "prompts": {r.source: [100 + i for i in range(8)]
                                                                for r in trace.requests}}
    (tmp_path / "work").mkdir()
    deadline = time.monotonic() + 20.0
    result = gpu_serving.run_system(gpu_serving.SYSTEMS[0], settings, inputs, tmp_path / "work", None, None, deadline,
                                    tmp_path / "steps.jsonl.gz")
    assert "failed" not in result, result
    assert time.monotonic() < deadline + 25.0  # stopped at the deadline (+ the server's stop), not at the trace's end
    cut_trace = "trace" in result and result["trace"]["failed"] > 0
    assert "cut" in result or cut_trace, result
    assert "trace" not in result or any("deadline" in error for error in result["errors"]), result
    # Cut in its warm-up or its isolated requests (1,900 tokens): the first system raised there.
    (tmp_path / "work2").mkdir()
    early = gpu_serving.run_system(gpu_serving.SYSTEMS[0], settings, inputs, tmp_path / "work2", None, None,
                                   time.monotonic() + 6.0)
    assert "failed" not in early and "trace" not in early and "start_s" in early, early
    for cut in (result, early):
        line = gpu_serving._one_line(cut)
        table = gpu_serving.markdown_section({"settings": settings.__dict__, "rate_rps": cut.get("rate_rps"),
                                              "isolated": cut.get("isolated"), "systems": [cut]})
        assert line and table[-1].startswith(f"| {cut['system']} |")


@pytest.mark.parametrize("call_s", ["abc", "100.5", "30"])
def test_a_bad_call_time_is_refused_before_the_build(call_s: str, tmp_path: Path) -> None:
    """GPU_CALL_S=100.5 failed after the build ('unbound variable'), 25 skipped every stage with
    exit 0 (a review): refused at once, exit 2."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "GPU_CALL_S": call_s, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2 and "GPU_CALL_S must be a whole number of seconds, at least 60" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_gemm_stage_starts_no_bit_width_past_the_deadline() -> None:
    """Its bf16 checks never ran on a GPU: past the suite's budget it stops between bit widths,
    keeping those done (the stage then reads `partial`, named for a second call)."""
    import gpu_kernels

    device = _device(dry_run=True)
    device.deadline = time.monotonic() - 1.0
    data = gpu_kernels.gemm(device)
    assert data["cut"] == "the suite's budget ran out before W4" and data["checks"] == data["timings"] == []
