"""Quantization time and peak memory on the CPU: SmolLM2-135M x every task with an adapter.

    python bench/quant_cpu.py                       # mlgptq, 4-bit g128, 128 samples/task
    python bench/quant_cpu.py --methods mlgptq gptq-mixed rtn --calib-samples 32

Each run is a separate `inlaid quantize` process (peak RSS is that process's own), into a
fresh temporary directory; the table gives wall time, time per layer and peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["mlgptq"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters-dir", type=Path, default=REPO / "adapters")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant_cpu.json")
    args = parser.parse_args(argv if argv is not None else [])

    from inlaid.tasks import TASK_NAMES, get_task

    tasks = [n for n in TASK_NAMES if (args.adapters_dir / n / "adapter_config.json").is_file()]
    if not tasks:
        print("no adapters under adapters/: nothing to quantize", file=sys.stderr)
        return 0
    task_args = []
    for name in tasks:
        task_args += ["--task", f"{name}={args.adapters_dir / name}:{get_task(name).split_path('calib')}"]
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="inlaid-quant-bench-") as tmp:
            command = [sys.executable, "-m", "inlaid.cli", "quantize", *task_args, "--method", method,
                       "--bits", str(args.bits), "--group-size", str(args.group_size),
                       "--max-samples", str(args.calib_samples), "--threads", str(args.threads),
                       "--out", str(Path(tmp) / "ckpt")]
            started = time.time()
            subprocess.run(command, check=True, cwd=REPO)
            wall = time.time() - started
            meta = json.loads((Path(tmp) / "ckpt" / "inlaid_quant.json").read_text())
            state_bytes = sum(p.stat().st_size for p in (Path(tmp) / "ckpt" / "hessian_state").glob("*"))
            tokens = sum(t["tokens"] for t in meta["tasks"])
            layers = json.loads((Path(tmp) / "ckpt" / "config.json").read_text())["num_hidden_layers"]
            rows.append({
                "method": method, "tasks": len(tasks), "calibration_tokens": tokens,
                "quantize_seconds": meta["timing"]["seconds"], "process_seconds": round(wall, 1),
                "seconds_per_layer": round(meta["timing"]["seconds"] / layers, 2),
                "peak_rss_mb": meta["timing"]["peak_rss_mb"], "hessian_state_mb": round(state_bytes / 2**20, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bits": args.bits, "group_size": args.group_size, "threads": args.threads,
                                    "calib_samples": args.calib_samples, "tasks": tasks, "runs": rows}, indent=1))
    print("| method | tasks | calib tokens | time (s) | s/layer | peak RSS (MB) | Hessian state (MB) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['tasks']} | {row['calibration_tokens']} | {row['quantize_seconds']} | "
              f"{row['seconds_per_layer']} | {row['peak_rss_mb']:.0f} | {row['hessian_state_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
