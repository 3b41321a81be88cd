"""The CPU int4 path's three routes by rows of x, and where the engine switches between them.

torch's int4 CPU kernel re-dequantizes its weight tile for every 4 rows of x, so its time grows
linearly with M; the native kernel (kernels/int4_native.c) dequantizes once per call and reuses
each tile for every row; dequantizing the int4pack bytes to bf16 once per call and running
oneDNN's bf16 GEMM costs a fixed dequantization plus a GEMM that barely grows with M
(kernels/quant_cpu.py, `int4_dequant_matmul`). This times the three, and the engine's choice
(the `native_min_m` and `dense_min_m` switches), on the default model's projections (group
128, fused like the engine),
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
ROWS = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 512]
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
    from inlaid.kernels.int4_native import native_int4_available, native_int4_unavailable_reason
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
            native = (_median_ms(lambda layout: quant_cpu.int4_native_matmul(x, layout, None), layouts, repeats)
                      if native_int4_available() else None)
            route = ("dequant + bf16 GEMM" if m >= prepared[0].dense_min_m
                     else "native kernel" if m >= prepared[0].native_min_m else "int4 kernel")
            rows.append({"projection": name, "K": in_features, "N": out_features, "M": m,
                         "int4_kernel_ms": kernel, "native_kernel_ms": native, "dequant_bf16_gemm_ms": dense,
                         "route_taken": route, "kernel_over_route": kernel / dense,
                         "kernel_over_native": None if native is None else kernel / native,
                         "native_over_route": None if native is None else native / dense})
        print(f"{name}: done", flush=True)
    dequant_only = {name: _median_ms(quant_cpu.dequantize_int4pack,
                                     [prepare_quant_linear(random_gptq_layer(k, n, 4, 128, seed=s).weights, "cpu",
                                                           torch.float32).layout for s in range(ROTATION)], repeats)
                    for k, n, name in SHAPES}
    def crossover(ratio: str) -> dict[str, int | None]:
        result = {}
        for _, _, name in SHAPES:
            winning = [r["M"] for r in rows if r["projection"] == name and (r[ratio] or 0.0) > 1.0]
            result[name] = min(winning) if winning else None
        return result

    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": threads, "repeats": repeats, "dense_min_rows": prepared[0].dense_min_m,
            "native_min_rows": prepared[0].native_min_m if native_int4_available() else None,
            "native_unavailable": native_int4_unavailable_reason(),
            "smallest_M_where_native_beats_the_int4_kernel": crossover("kernel_over_native"),
            "smallest_M_where_the_route_beats_native": crossover("native_over_route"),
            "loadavg_before": list(os.getloadavg()), "rows": rows,
            "dequantize_only_ms": dequant_only, "smallest_M_where_the_route_wins": crossover("kernel_over_route")}


def write_markdown(result: dict, path: Path) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    native_note = (f"the native kernel from M >= {result['native_min_rows']}" if result["native_min_rows"]
                   else f"no native kernel here ({result['native_unavailable']})")
    lines = [
        "# CPU int4 path: torch's int4 kernel, the native kernel and dequantize + bf16 GEMM, by rows", "",
        f"{result['machine']}, torch {result['torch']}, {result['threads']} thread(s), median of "
        f"{result['repeats']} calls, each on a fresh copy of the layer (weights from memory). Load average "
        f"before: {', '.join(f'{v:.1f}' for v in result['loadavg_before'])}. The engine takes {native_note} "
        f"and dequantize + bf16 GEMM from M >= {result['dense_min_rows']} (`kernels/quant_cpu.py`).", "",
        "| projection | K x N | M | int4 kernel ms | native ms | dequant + bf16 GEMM ms | kernel / native | engine takes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = "-" if r["kernel_over_native"] is None else f"{r['kernel_over_native']:.2f}x"
        lines.append(f"| {r['projection']} | {r['K']} x {r['N']} | {r['M']} | {ms(r['int4_kernel_ms'])} | "
                     f"{ms(r['native_kernel_ms'])} | {ms(r['dequant_bf16_gemm_ms'])} | {ratio} | {r['route_taken']} |")
    lines += ["", "Dequantizing alone (ms): " + ", ".join(
        f"{name} {ms:.2f}" for name, ms in result["dequantize_only_ms"].items())]
    for title, key in (("native beats torch's int4 kernel", "smallest_M_where_native_beats_the_int4_kernel"),
                       ("dequantize + bf16 GEMM beats native", "smallest_M_where_the_route_beats_native"),
                       ("dequantize + bf16 GEMM beats torch's int4 kernel", "smallest_M_where_the_route_wins")):
        lines += ["", f"Smallest M where {title}: " + ", ".join(
            f"{name} {m}" for name, m in result[key].items())]
    path.write_text("\n".join(lines + [""]))


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
