"""The GPU suite's driver: stages, a time budget, one JSON + markdown + PNG report.

    bench/gpu.sh                       # what to run (builds, then calls this); see docs/benchmarks.md
    python bench/gpu_suite.py --out DIR [--dry-run] [--budget-s 540] [--stages a,b]

Stages, in order (each one's failure is recorded and the next one still runs):
  environment   device, versions, copy bandwidth (the yardstick of every floor)
  serving       `inlaid serve` on the device (FIFO, the inlaid policy, with CUDA graphs) against
                the transformers + PEFT server, one trace, on a random-weight model of the
                default model's shape (gpu_serving.py); needs the carried tokenizer. First: it
                never ran on a GPU, and its servers are child processes (a CUDA fault there
                cannot poison the kernel stages' process)
  gemm          W4/W3/W2 GEMM checked at full size against float64 (fp16, and bf16 on a GPU: not
                in a dry run, the interpreter's bf16 tl.dot is broken), then timed against
                cuBLAS fp16 and its bandwidth floor at M = 1..256 (gpu_kernels.py)
  sgmv_checks   SGMV shrink/expand at full size against float64, fp16 and (GPU only) bf16 pools
                (gpu_kernels.py)
  sgmv          shrink and expand timed against their bandwidth floor (gpu_kernels.py)
  decode        a Llama-2-7B-shaped decode step, 4-bit, 100 adapters, batch 1..256, eager
                and from CUDA graphs, against its floor (gpu_decode.py)
  gemm_configs  the 4-bit GEMM's tile / split-K variants at decode sizes and its two routes
                (tiled kernel, dequantize + cuBLAS) from M = 16 to 128 (gpu_gemm_configs.py)
  step_costs    the scheduler simulator's step-cost model measured on the device: the plan
                shapes of bench/sched_cost.py on the same model, eager (gpu_step_costs.py)
  e2e_replay    the end-to-end trace replay (bench/e2e.py) at smoke size: transformers + PEFT
                server vs Inlaid 4-bit + the inlaid policy; skipped without the default
                model or pyzmq/msgspec on the machine
The budget is the time by which the suite must have written its report (bench/gpu.sh
gives it what the device call has left after the build). On a GPU a stage is skipped when its
time on the H200 (GPU_STAGE_SECONDS) would not fit in what is left, the serving stage stops
its servers at the budget, and an interrupt (bench/gpu.sh's timeout sends SIGINT) ends the
stage running, keeping what it has. The report (JSON and markdown) is rewritten after each
stage and each serving system; its last line names the stages to run in a second call.
Before anything runs, the stages whose needs are missing (msgspec, pyzmq, the carried
tokenizer) are named; they are skipped, the others run, and the exit code is 2 (a suite that
skipped them exited 0 and looked fine). Else exit code 1 when a stage failed (an error, a
check out of tolerance, an interrupt), else 0.
Without CUDA and without --dry-run it says so and exits 0 (bench/run_all.py calls main()).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_kernels, gpu_decode beside this file

from gpu_report import markdown, plot, rerun_hint  # noqa: E402
from gpu_stages import STAGE_MODULES, STAGES, StageSkipped  # noqa: E402


# What each stage took on the H200 (bench/results/gpu_h200.md; serving: its own cap, ServingSettings.budget_s,
# plus its preparation): on a GPU a stage that would not end within the budget is not started.
GPU_STAGE_SECONDS = {"environment": 5, "serving": 290, "gemm": 60, "sgmv_checks": 10, "sgmv": 10, "decode": 45,
                     "gemm_configs": 95, "step_costs": 70, "e2e_replay": 60}
# Stages that stop at the deadline by themselves, keeping what they measured: started when this
# much is left (serving: its preparation and one system; gemm: one bit width; gemm_configs: one
# shape), not their whole time.
GPU_STAGE_MIN_SECONDS = {"serving": 60, "gemm": 25, "gemm_configs": 40}


def preflight(stages: list[str], has_module: Callable[[str], bool] | None = None,
              tokenizer: Callable[[], Path | None] | None = None) -> dict[str, str]:
    """What each asked-for stage needs and this machine lacks (stage -> one line; empty: all
    there). e2e_replay is left out: it needs the default model, which the GPU image cannot
    have, and is skipped by design."""
    has_module = has_module or (lambda module: importlib.util.find_spec(module) is not None)
    problems = {}
    for stage in stages:
        modules = STAGE_MODULES[stage][0] if stage in STAGE_MODULES and stage != "e2e_replay" else ()
        missing = [module for module in modules if not has_module(module)]
        if missing:
            problems[stage] = f"{', '.join(missing)} not importable here"
    if "serving" in stages:
        if tokenizer is None:
            from gpu_serving_inputs import tokenizer_dir as tokenizer
        if tokenizer() is None:
            lacking = "the default model's tokenizer (.gpu_carry/tokenizer)"
            problems["serving"] = f"{problems['serving']}; {lacking}" if "serving" in problems else lacking
    return problems


def _failed_checks(data: dict) -> list[dict]:
    return [c for c in data.get("checks", []) if not c["ok"]]


_INTERRUPTED = "SIGINT: the call's time limit (bench/gpu.sh's timeout) or Ctrl-C"


def run_stages(device, budget_s: float, after_stage: Callable[[dict], None] = lambda report: None,  # noqa: ANN001
               only: set[str] | None = None, skip: dict[str, str] | None = None) -> dict:
    """Every stage in order (those in `only`, and the environment, when given);
    `after_stage(report)` after each one, and after each part a stage reports through
    `device.save_partial(data)` (the suite writes what it has, so a run killed at its time
    limit still leaves every finished stage behind). `device.deadline` is set to the budget's
    end (time.monotonic) for stages that bound themselves. `skip`: stages not run, with what
    they lack (preflight)."""
    run = _SuiteRun(device, budget_s, after_stage, only, skip or {})
    # One interrupt ends the stage running; the next ones are ignored (bench/gpu.sh's timeout
    # signals the process group as well: a second KeyboardInterrupt escaped the report).
    previous_handler = signal.getsignal(signal.SIGINT)

    def interrupt_once(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupt_once)
    try:
        run.each()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_handler)
    run.report["total_seconds"] = round(time.monotonic() - run.started, 1)
    return run.report


@dataclass
class _SuiteRun:
    """One run of the stages: what every stage's turn reads and writes."""

    device: Any
    budget_s: float
    after_stage: Callable[[dict], None]
    only: set[str] | None
    skip: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    interrupted: str = ""  # why the run stopped starting stages ("": it did not)
    report: dict = field(init=False)

    def __post_init__(self) -> None:
        self.device.deadline = self.started + self.budget_s
        # Every stage listed from the start: a suite killed outright still names those it never reached.
        self.report = {"dry_run": self.device.dry_run, "budget_s": self.budget_s,
                       "stages": {name: {"status": "pending"} for name, _ in STAGES}}
        self.after_stage(self.report)

    def each(self) -> None:
        for name, stage in STAGES:
            try:
                self._one(name, stage)
            except KeyboardInterrupt:  # between stages (a print, a report's write): the rest is not started
                self.interrupted = _INTERRUPTED
                if self.report["stages"][name]["status"] in ("pending", "running"):
                    self.report["stages"][name].update(status="failed", reason=f"interrupted ({_INTERRUPTED})")

    def _why_not(self, name: str, elapsed: float) -> str:
        """Why the stage is not started now ("": it is)."""
        if name == "serving":  # bounded by its own cap and the deadline, whatever the device
            estimate = float(GPU_STAGE_MIN_SECONDS[name])
        else:
            estimate = GPU_STAGE_MIN_SECONDS.get(name, GPU_STAGE_SECONDS.get(name, 0)) * _slower_than_h200(self.report)
        if self.only is not None and name != "environment" and name not in self.only:
            return "not asked for (--stages)"
        if name in self.skip:
            return self.skip[name]
        if self.interrupted:
            return f"interrupted before it started ({self.interrupted})"
        if elapsed > self.budget_s:
            return f"time budget of {self.budget_s:.0f} s spent"
        if not self.device.dry_run and elapsed + estimate > self.budget_s:
            return (f"would not end within the budget: needs ~{estimate:.0f} s on this device, "
                    f"{self.budget_s - elapsed:.0f} s left")
        if name != "environment" and self.report["stages"]["environment"]["status"] != "ok":
            return "the environment stage failed"
        return ""

    def _one(self, name: str, stage: Callable) -> None:
        """Runs (or skips) one stage into the report."""
        elapsed = time.monotonic() - self.started
        entry: dict = {"started_at_s": round(elapsed, 1)}
        if why_not := self._why_not(name, elapsed):
            entry.update(status="skipped", reason=why_not)
        else:
            self._run(name, stage, entry)
        entry["seconds"] = round(time.monotonic() - self.started - elapsed, 2)
        note = f" - {entry['reason']}" if "reason" in entry else ""
        print(f"   {name}: {entry['status']} ({entry['seconds']} s){note}", flush=True)
        self.report["stages"][name] = entry
        self.report["total_seconds"] = round(time.monotonic() - self.started, 1)
        self.after_stage(self.report)

    def _run(self, name: str, stage: Callable, entry: dict) -> None:
        print(f"== {name}", flush=True)
        entry["status"] = "running"
        self.report["stages"][name] = entry
        self.after_stage(self.report)  # a kill from here on leaves it named `running`

        def save_partial(data: dict) -> None:
            entry["data"] = data
            self.after_stage(self.report)

        self.device.save_partial = save_partial
        try:
            entry["data"] = stage(self.device, self.report)
            failed = _failed_checks(entry["data"])
            entry["status"] = "failed" if failed else "partial" if entry["data"].get("cut") else "ok"
            if failed:
                entry["reason"] = f"{len(failed)} checks failed"
            elif entry["data"].get("cut"):  # it stopped at the deadline: a second call runs it whole
                entry["reason"] = f"time budget: {entry['data']['cut']}"
        except StageSkipped as reason:
            entry.update(status="skipped", reason=str(reason))
        except KeyboardInterrupt:  # bench/gpu.sh's timeout: keep what this stage saved, start no other
            self.interrupted = _INTERRUPTED
            entry.update(status="failed", reason=f"interrupted ({_INTERRUPTED}); what it saved is kept")
        except Exception as error:  # recorded; the other stages still run
            entry.update(status="failed", reason=f"{type(error).__name__}: {error}",
                         traceback=traceback.format_exc(limit=-25))  # the innermost frames: where it broke
            print(entry["traceback"], file=sys.stderr)
        finally:
            self.device.save_partial = None


def _slower_than_h200(report: dict) -> float:
    """GPU_STAGE_SECONDS are the H200's; another device (an H100: 30 % less memory bandwidth)
    is given half as long again."""
    device = report["stages"].get("environment", {}).get("data", {}).get("device", "")
    return 1.0 if "H200" in device or not device else 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inlaid's GPU suite (run it through bench/gpu.sh)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_suite.json/.md/.png")
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds by which the report must be written: stages that would end later are not started "
                             "(on a GPU, by their H200 times), the serving stage stops its servers then")
    parser.add_argument("--deadline-epoch", type=float, default=None,
                        help="time.time() by which the report must be written (bench/gpu.sh: its call's start + "
                             "GPU_CALL_S - 30); the budget is cut to it")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated stages to run (default: all of {', '.join(n for n, _ in STAGES)})")
    # main() from bench/run_all.py gets no argv: never read the caller's sys.argv
    args = parser.parse_args(argv if argv is not None else [])
    if args.dry_run:
        from inlaid.kernels.interpret import enable_triton_interpreter

        if not enable_triton_interpreter():
            print("gpu_suite --dry-run needs a process where triton is not loaded yet and no CUDA device")
            return 1
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_suite.py: CUDA not available, skipping (bench/gpu.sh --dry-run checks the script here)")
        return 0
    from gpu_kernels import Device

    device = Device(torch.device("cpu") if args.dry_run else torch.device("cuda"),
                    torch.float32 if args.dry_run else torch.float16, args.dry_run)
    out = args.out or Path(__file__).resolve().parent / "results" / time.strftime("gpu-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    device.out_dir = out

    def write_reports(report: dict) -> None:
        # Whole files or none: a kill between two writes leaves the last complete pair.
        for name, text in (("gpu_suite.json", json.dumps(report, indent=2, default=str)),
                           ("gpu_suite.md", markdown(report))):
            partial = out / f".{name}.partial"
            partial.write_text(text)
            os.replace(partial, out / name)

    only = None if args.stages is None else set(args.stages.split(","))
    unknown = (only or set()) - {name for name, _ in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    problems = preflight([name for name, _ in STAGES if only is None or name in only])
    lacking = "".join(f"\n  {stage}: lacks {what}" for stage, what in problems.items())
    skip = {stage: f"lacks {what} (bench/gpu.sh --fetch-wheels; carry .whl, .gpu_carry)"
            for stage, what in problems.items()}
    from inlaid.models.prepare import default_model_dir

    if not (default_model_dir() / "config.json").is_file():  # by design on the GPU image: no exit code for it
        skip["e2e_replay"] = f"no default model at {default_model_dir()} (the GPU image has none; by design)"
    if problems:  # said first and last; the other stages still run (a lease is not lost for it)
        print(f"bench/gpu_suite.py: stages skipped for what they lack:{lacking}\nRun `bench/gpu.sh --fetch-wheels` "
              "on a machine with PyPI and carry .whl and .gpu_carry (docs/benchmarks.md).", file=sys.stderr, flush=True)
    budget_s = args.budget_s
    if args.deadline_epoch is not None:  # bench/gpu.sh's clock: the call's start, not this process's
        budget_s = min(budget_s, args.deadline_epoch - time.time())
    report = run_stages(device, budget_s, after_stage=write_reports, only=only, skip=skip)
    if threading.current_thread() is threading.main_thread():  # the report is written whole, then the plot
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    write_reports(report)
    plotted = plot(report, out / "gpu_suite.png")
    print(markdown(report))
    print(f"wrote {out}/gpu_suite.json, .md{', .png' if plotted else ''}")
    if rerun_hint(report):
        print(f"not run for lack of time; a second call: {rerun_hint(report)}")
    if problems:
        print(f"exit 2: stages skipped for what they lack:{lacking}", file=sys.stderr)
        return 2
    if not any(entry["status"] in ("ok", "partial", "failed") for name, entry in report["stages"].items()
               if name != "environment"):
        print("exit 1: no stage ran (the budget: GPU_CALL_S or GPU_SUITE_BUDGET_S too short?)", file=sys.stderr)
        return 1
    return 1 if any(entry["status"] == "failed" for entry in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
