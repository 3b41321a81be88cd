"""Quantization time and peak memory on the CPU, per phase, against the calibration-forward floor.

    python bench/quant_cpu.py                                  # mlgptq 4-bit g128, 32 samples/task, 2 threads
    python bench/quant_cpu.py --methods mlgptq gptq-mixed rtn --threads 1 --bits 3

Every task with an adapter under adapters/ (SmolLM2-135M x 9 tasks). Each measurement runs in
its own process (its peak RSS is its own), one after the other in this run:

1. the floor: the calibration forward passes alone (the same samples, batches and adapters
   through all 30 decoder layers, nothing else), `inlaid.quant.driver.calibration_forward_seconds`;
2. each method's full `quantize_model` run into a temporary directory, with its phases;
3. the floor again (the machine is shared: two floors bracket the load the runs saw).

The table has the columns of Table 4 of the LoRA-Inlaid paper (forward + Hessian, aggregate +
quantize, total, peak memory) plus the ratio of the total to the floor. Writes
bench/results/quant_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _config(args: dict, method: str, out_dir: Path):
    from inlaid.models.prepare import default_model_dir
    from inlaid.quant.calibration import CalibrationTask
    from inlaid.quant.driver import DriverConfig
    from inlaid.quant.methods import parse_method
    from inlaid.quant.spec import QuantSpec
    from inlaid.quant.suite import read_manifest

    tasks = [CalibrationTask(t.name, t.adapter_dir, t.calib_path) for t in read_manifest(Path(args["adapters_dir"]))]
    return DriverConfig(
        model_dir=default_model_dir(), tasks=tasks, method=parse_method(method, [t.name for t in tasks]),
        spec=QuantSpec(bits=args["bits"], group_size=args["group_size"]), out_dir=out_dir,
        max_samples=args["calib_samples"], max_batch_tokens=args["batch_tokens"], progress=False,
        save_hessian_state=not args["no_state"],
    )


def _child_floor(args: dict) -> dict:
    import torch

    from inlaid.quant.driver import calibration_forward_seconds, peak_rss_mb

    torch.set_num_threads(args["threads"])
    started = time.perf_counter()
    phases = calibration_forward_seconds(_config(args, "mlgptq", Path("/nonexistent")))
    return {"phases": phases, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def _child_quantize(args: dict, method: str) -> dict:
    import torch

    from inlaid.quant.driver import quantize_model

    torch.set_num_threads(args["threads"])
    with tempfile.TemporaryDirectory(prefix="inlaid-quant-bench-") as tmp:
        report = quantize_model(_config(args, method, Path(tmp) / "ckpt"))
        state_bytes = sum(p.stat().st_size for p in (Path(tmp) / "ckpt" / "hessian_state").glob("*"))
    errors = report.layer_errors
    per_task = {t: sum(e["errors"][t] for e in errors) / len(errors) for t in (errors[0]["errors"] if errors else {})}
    return {"method": method, "seconds": report.seconds, "phases": report.phases, "peak_rss_mb": report.peak_rss_mb,
            "hessian_state_mb": state_bytes / 2**20,
            "tokens": sum(c["tokens"] for c in report.calibration.values()),
            "error_task_mean": sum(per_task.values()) / len(per_task) if per_task else None,
            "error_worst_per_linear": sum(max(e["errors"].values()) for e in errors) / len(errors) if errors else None}


def _in_child(kind: str, settings: dict, method: str = "") -> dict:
    """Run one measurement in a fresh process (its own peak RSS); it prints one JSON line last."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-settings", json.dumps(settings),
               "--child-method", method]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _markdown(report: dict) -> str:
    floors = report["floor"]
    floor = min(f["phases"]["forward"] for f in floors)
    lines = [
        f"SmolLM2-135M-Instruct, {report['tasks']} tasks x {report['calib_samples']} calibration samples "
        f"({report['tokens']} tokens), {report['bits']}-bit g{report['group_size']}, {report['threads']} torch "
        f"thread(s), batches of <= {report['batch_tokens']} padded tokens. Machine: {report['machine']}; load average "
        f"(1/5/15 min) {report['load_before']} before, {report['load_after']} after.", "",
        f"Floor (the calibration forward passes alone, 30 layers, adapters on): "
        + ", ".join(f"{f['phases']['forward']:.1f} s" for f in floors)
        + f" (before / after the runs; plus {floors[0]['phases']['load']:.1f} s loading the model, adapters and "
          f"first-layer inputs). Ratios below use the lower floor, {floor:.1f} s.", "",
        "| method | forward + Hessian (s) | aggregate + quantize (s) | total (s) | total / floor | peak memory (RSS) |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        phases = run["phases"]
        forward_hessian = phases.get("forward", 0) + phases.get("hessian", 0)
        lines.append(f"| {run['method']} | {forward_hessian:.1f} ({phases.get('forward', 0):.1f} + "
                     f"{phases.get('hessian', 0):.1f}) | {phases.get('quantize', 0):.1f} | {run['seconds']:.1f} | "
                     f"{phases.get('forward', 0) / floor:.2f} fwd, {(run['seconds'] - phases.get('load', 0)) / floor:.2f} "
                     f"all | {run['peak_rss_mb'] / 1024:.2f} GB |")
    lines += ["", "Other phases (s): " + "; ".join(
        f"{run['method']}: load {run['phases'].get('load', 0):.1f}, write {run['phases'].get('write', 0):.1f} "
        f"(Hessian state {run['hessian_state_mb']:.0f} MB)" for run in report["runs"]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["mlgptq"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-state", action="store_true", help="do not write the per-task Hessian state")
    parser.add_argument("--adapters-dir", type=Path, default=REPO / "adapters")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant_cpu.json")
    parser.add_argument("--child", choices=["floor", "quantize"], help=argparse.SUPPRESS)
    parser.add_argument("--child-settings", help=argparse.SUPPRESS)
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        settings = json.loads(args.child_settings)
        result = _child_floor(settings) if args.child == "floor" else _child_quantize(settings, args.child_method)
        print(json.dumps(result))
        return 0
    settings = {"adapters_dir": str(args.adapters_dir), "bits": args.bits, "group_size": args.group_size,
                "calib_samples": args.calib_samples, "batch_tokens": args.batch_tokens, "threads": args.threads,
                "no_state": args.no_state}
    load_before = [round(x, 2) for x in os.getloadavg()]
    floors = [_in_child("floor", settings)]
    print(f"floor: {floors[0]['phases']['forward']:.1f} s forward", flush=True)
    runs = []
    for method in args.methods:
        runs.append(_in_child("quantize", settings, method))
        print(json.dumps(runs[-1]), flush=True)
    floors.append(_in_child("floor", settings))
    print(f"floor: {floors[1]['phases']['forward']:.1f} s forward", flush=True)
    report = {**settings, "tasks": 9, "tokens": runs[0]["tokens"] if runs else None, "floor": floors, "runs": runs,
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "machine": f"{os.cpu_count()} CPUs, {_cpu_name()}"}
    report["tasks"] = len(json.loads((args.adapters_dir / "MANIFEST.json").read_text())["adapters"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    text = _markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
