"""Where the CPU int4 path should switch from torch's int4 kernel to dequantize + bf16 GEMM.

torch's int4 CPU kernel re-dequantizes its weight tile for every 4 rows of x, so its time grows
linearly with M; dequantizing the int4pack bytes to bf16 once per call and running oneDNN's
bf16 GEMM costs a fixed dequantization plus a GEMM that barely grows with M
(kernels/quant_cpu.py, `int4_dequant_matmul`). This times both, and the engine's choice (the
`dense_min_m` switch), on the default model's projections (group 128, fused like the engine),
weights streamed from memory as in a forward pass (each call reads a fresh copy of the layer out
of a rotation larger than the cache), one torch thread.

    .venv/bin/python bench/int4_many_rows.py [--threads 1] [--repeats 30]

Writes bench/results/int4_many_rows.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SHAPES = [(576, 960, "q|k|v"), (576, 576, "o"), (576, 3072, "gate|up"), (1536, 576, "down")]
ROWS = [1, 16, 32, 64, 96, 128, 256, 512]
ROTATION = 8  # copies of each layer, cycled: 8 x 1.8 MB of codes > the L2 of this VM


def _median_ms(call, layouts: list, repeats: int) -> float:
    times = []
    for index in range(repeats + 2):
        layout = layouts[index % len(layouts)]
        start = time.perf_counter()
        call(layout)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def measure(threads: int, repeats: int) -> dict:
    from inlaid.kernels import quant_cpu
    from inlaid.kernels.dispatch import prepare_quant_linear
    from inlaid.kernels.testing import random_gptq_layer

    torch.set_num_threads(threads)
    rows = []
    for in_features, out_features, name in SHAPES:
        prepared = [prepare_quant_linear(random_gptq_layer(in_features, out_features, 4, 128, seed=seed).weights,
                                         "cpu", torch.float32) for seed in range(ROTATION)]
        layouts = [p.layout for p in prepared]
        for m in ROWS:
            x = torch.randn(m, in_features)
            kernel = _median_ms(lambda layout: quant_cpu.int4_matmul(x, layout, None), layouts, repeats)
            dense = _median_ms(lambda layout: quant_cpu.int4_dequant_matmul(x, layout, None), layouts, repeats)
            rows.append({"projection": name, "K": in_features, "N": out_features, "M": m,
                         "int4_kernel_ms": kernel, "dequant_bf16_gemm_ms": dense,
                         "route_taken": "dequant + bf16 GEMM" if m >= prepared[0].dense_min_m else "int4 kernel",
                         "kernel_over_route": kernel / dense})
        print(f"{name}: done", flush=True)
    dequant_only = {name: _median_ms(quant_cpu.dequantize_int4pack,
                                     [prepare_quant_linear(random_gptq_layer(k, n, 4, 128, seed=s).weights, "cpu",
                                                           torch.float32).layout for s in range(ROTATION)], repeats)
                    for k, n, name in SHAPES}
    crossover = {}
    for _, _, name in SHAPES:
        winning = [r["M"] for r in rows if r["projection"] == name and r["kernel_over_route"] > 1.0]
        crossover[name] = min(winning) if winning else None
    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": threads, "repeats": repeats, "dense_min_rows": quant_cpu.DENSE_MIN_ROWS,
            "loadavg_before": list(os.getloadavg()), "rows": rows,
            "dequantize_only_ms": dequant_only, "smallest_M_where_the_route_wins": crossover}


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# CPU int4 path: torch's int4 kernel vs dequantize + bf16 GEMM, by rows", "",
        f"{result['machine']}, torch {result['torch']}, {result['threads']} thread(s), median of "
        f"{result['repeats']} calls, each on a fresh copy of the layer (weights from memory). Load average "
        f"before: {', '.join(f'{v:.1f}' for v in result['loadavg_before'])}. The engine switches at "
        f"M >= {result['dense_min_rows']} (`kernels/quant_cpu.py`, DENSE_MIN_ROWS).", "",
        "| projection | K x N | M | int4 kernel ms | dequant + bf16 GEMM ms | kernel / route | engine takes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['projection']} | {r['K']} x {r['N']} | {r['M']} | {r['int4_kernel_ms']:.3f} | "
                     f"{r['dequant_bf16_gemm_ms']:.3f} | {r['kernel_over_route']:.2f}x | {r['route_taken']} |")
    lines += ["", "Dequantizing alone (ms): " + ", ".join(
        f"{name} {ms:.2f}" for name, ms in result["dequantize_only_ms"].items()),
        "", "Smallest M where the route wins: " + ", ".join(
        f"{name} {m}" for name, m in result["smallest_M_where_the_route_wins"].items()), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.threads, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_many_rows.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "int4_many_rows.md")
    print((args.out / "int4_many_rows.md").read_text())


if __name__ == "__main__":
    main()
