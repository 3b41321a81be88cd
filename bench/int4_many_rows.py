"""The CPU int4 path's routes by rows of x, and where the engine switches between them.

torch's int4 CPU kernel re-dequantizes its weight tile for every 4 rows of x, so its time grows
linearly with M; the native kernel (kernels/int4_native.c) dequantizes once per call and reuses
each tile for every row, in fp32; the dot-product kernel (kernels/int4_dot.c, AVX512-BF16)
multiplies bf16 x by the codes themselves; dequantizing the int4pack bytes to bf16 once per call
and running oneDNN's bf16 GEMM costs a fixed dequantization plus a GEMM that barely grows with M
(kernels/quant_cpu.py, `int4_dequant_matmul`); the bf16 kernel (kernels/int4_bf16.c, AMX or
AVX512-BF16) does the same a panel at a time in cache. This times each one this machine has, and
the engine's choice for decode rows and for prompt rows (and what `batch_invariant`, which keeps
every row on the few-rows kernel, costs a prompt call where the engine would leave it), on the
default model's projections
(group 128, fused like the engine), weights streamed from memory as in a forward pass (each call
reads a fresh copy of the layer out of a rotation larger than the cache), one torch thread.

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
ROWS = [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512]
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
    from inlaid.kernels.int4_bf16 import bf16_kernel_backend, bf16_kernel_fits, int4pack_mm_bf16
    from inlaid.kernels.int4_dot import dot_kernel_fits
    from inlaid.kernels.int4_native import native_int4_available, native_int4_unavailable_reason
    from inlaid.kernels.testing import random_gptq_layer

    torch.set_num_threads(threads)
    rows = []
    for in_features, out_features, name in SHAPES:
        prepared = [prepare_quant_linear(random_gptq_layer(in_features, out_features, 4, 128, seed=seed).weights,
                                         "cpu", torch.float32) for seed in range(ROTATION)]
        layouts = [p.layout for p in prepared]
        first = prepared[0]
        for m in ROWS:
            x = torch.randn(m, in_features)
            kernel = _median_ms(lambda layout: quant_cpu.int4_matmul(x, layout, None), layouts, repeats)
            dense = _median_ms(lambda layout: quant_cpu.int4_dequant_matmul(x, layout, None), layouts, repeats)
            native = (_median_ms(lambda layout: quant_cpu.int4_native_matmul(x, layout, None), layouts, repeats)
                      if native_int4_available() else None)
            dot = (_median_ms(lambda layout: quant_cpu.int4_dot_matmul(x, layout, None), layouts, repeats)
                   if dot_kernel_fits(first.layout) else None)
            bf16 = (_median_ms(lambda layout: int4pack_mm_bf16(x, layout), layouts, repeats)
                    if bf16_kernel_fits(first.layout) else None)

            def route(bound: int) -> str:
                if m >= bound:
                    return f"bf16 kernel ({bf16_kernel_backend()})" if bf16 is not None else "dequant + bf16 GEMM"
                return ("dot kernel" if first.few_rows_dot else "native kernel" if m >= first.native_min_m
                        else "int4 kernel")

            few_rows = dot if first.few_rows_dot else native if native is not None else kernel
            # the prompt route's time where it leaves the few-rows kernel (as route() names it)
            prompt_ms = (bf16 if bf16 is not None else dense) if m >= first.prefill_dense_min_m else None
            rows.append({"projection": name, "K": in_features, "N": out_features, "M": m,
                         # what batch_invariant costs a prompt call of M rows (1.0: the same route)
                         "batch_invariant_over_prompt_route": few_rows / prompt_ms if prompt_ms else 1.0,
                         "int4_kernel_ms": kernel, "native_kernel_ms": native, "dequant_bf16_gemm_ms": dense,
                         "dot_kernel_ms": dot, "bf16_kernel_ms": bf16,
                         "route_taken": route(first.dense_min_m), "prompt_route_taken": route(first.prefill_dense_min_m),
                         "kernel_over_route": kernel / dense,
                         "kernel_over_native": None if native is None else kernel / native,
                         "native_over_route": None if native is None else native / dense,
                         "native_over_dot": None if native is None or dot is None else native / dot})
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
            "prefill_dense_min_rows": prepared[0].prefill_dense_min_m, "bf16_kernel_backend": bf16_kernel_backend(),
            "native_min_rows": prepared[0].native_min_m if native_int4_available() else None,
            "native_unavailable": native_int4_unavailable_reason(),
            "smallest_M_where_native_beats_the_int4_kernel": crossover("kernel_over_native"),
            "smallest_M_where_the_route_beats_native": crossover("native_over_route"),
            "loadavg_before": list(os.getloadavg()), "rows": rows,
            "dequantize_only_ms": dequant_only, "smallest_M_where_the_route_wins": crossover("kernel_over_route")}


def write_markdown(result: dict, path: Path) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    few_rows = result["rows"][0]["route_taken"]
    native_note = (f"the {few_rows}" if result["native_min_rows"] or few_rows != "int4 kernel"
                   else f"torch's int4 kernel (no native kernel here: {result['native_unavailable']})")
    lines = [
        "# CPU int4 path: each kernel this machine has, by rows", "",
        f"{result['machine']}, torch {result['torch']}, {result['threads']} thread(s), median of "
        f"{result['repeats']} calls, each on a fresh copy of the layer (weights from memory). Load average "
        f"before: {', '.join(f'{v:.1f}' for v in result['loadavg_before'])}. The engine takes {native_note} "
        f"below the bf16 route; decode rows take the bf16 route from M >= {result['dense_min_rows']}, prompt "
        f"rows from M >= {result['prefill_dense_min_rows']} (`kernels/quant_cpu.py`). '-': not built here.", "",
        "| projection | K x N | M | int4 kernel ms | native ms | dot ms | dequant + bf16 GEMM ms | bf16 kernel ms "
        "| native / dot | decode rows take | prompt rows take |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = "-" if r["native_over_dot"] is None else f"{r['native_over_dot']:.2f}x"
        lines.append(f"| {r['projection']} | {r['K']} x {r['N']} | {r['M']} | {ms(r['int4_kernel_ms'])} | "
                     f"{ms(r['native_kernel_ms'])} | {ms(r['dot_kernel_ms'])} | {ms(r['dequant_bf16_gemm_ms'])} | "
                     f"{ms(r['bf16_kernel_ms'])} | {ratio} | {r['route_taken']} | {r['prompt_route_taken']} |")
    invariant = [r for r in result["rows"] if r["batch_invariant_over_prompt_route"] != 1.0]
    if invariant:
        ratios = [r["batch_invariant_over_prompt_route"] for r in invariant]
        lines += ["", f"`batch_invariant` (every row on the few-rows kernel) costs a prompt call of "
                      f"{min(r['M'] for r in invariant)}-{max(r['M'] for r in invariant)} rows "
                      f"{min(ratios):.2f}-{max(ratios):.2f}x the time of the route it leaves (median "
                      f"{statistics.median(ratios):.2f}x); fewer rows take the few-rows kernel anyway."]
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
    from inlaid.cli_args import writable_dir_problem

    if args.threads < 1 or args.repeats < 1:  # a traceback after the setup, or a median of nothing
        parser.error(f"--threads and --repeats must be positive integers, got {args.threads} and {args.repeats}")
    if problem := writable_dir_problem(args.out, "--out"):  # before the measurement, not after it
        parser.error(problem)
    result = measure(args.threads, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_many_rows.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "int4_many_rows.md")
    print((args.out / "int4_many_rows.md").read_text())


if __name__ == "__main__":
    main()
