"""CPU kernel benchmark: int4 weight-only GEMM vs fp32, 3-bit layouts, the CPU LoRA path,
dense bf16/float32 matmul with the weight packed for oneDNN vs plain, and the int4 kernel
against dense weights at every decode batch size.

    .venv/bin/python bench/kernels_cpu.py [--quick]

Every ratio is measured side by side in one run: candidates are timed in interleaved
rounds (A, B, A, B, ...) and the best round per candidate is reported (on a machine shared
with other jobs the minimum is the stable estimate of the uncontended time; the median is
kept in the JSON too). Writes bench/results/kernels_cpu.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from inlaid.kernels import lora_cpu_plan
from inlaid.kernels.dispatch import PackedDenseWeight, packing_supported
from inlaid.kernels.testing import random_gptq_layer
from inlaid.kernels.quant_linear import QuantLinearWeights, prepare_quant_linear, quant_matmul
from lora_baselines import batched, lora_case, per_slot_loop, token_gather  # beside this file

RESULTS = Path(__file__).resolve().parent / "results"


MEDIANS: dict[str, float] = {}


def time_side_by_side(
    candidates: dict[str, Callable[[], object]], rounds: int, inner: int, warmup: int = 2
) -> dict[str, float]:
    """Best-round milliseconds per call of each candidate, timed in interleaved rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) * 1e3 / inner)
    MEDIANS.clear()
    MEDIANS.update({name: statistics.median(values) for name, values in samples.items()})
    return {name: min(values) for name, values in samples.items()}


def random_gptq(k: int, n: int, bits: int, group: int, seed: int) -> QuantLinearWeights:
    return random_gptq_layer(k, n, bits, group, seed=seed).weights


GEMM_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096)]


def bench_gemm(quick: bool) -> list[dict]:
    rows = []
    shapes = GEMM_SHAPES[:2] + GEMM_SHAPES[-1:] if quick else GEMM_SHAPES
    for k, n in shapes:
        group = 128 if k % 128 == 0 else 64
        dense = torch.randn(n, k) * 0.02
        w4 = random_gptq(k, n, 4, group, seed=k + n)
        w3 = random_gptq(k, n, 3, group, seed=k + n + 1)
        p4 = prepare_quant_linear(w4, "cpu", torch.float32)
        p3 = prepare_quant_linear(w3, "cpu", torch.float32)
        p3_otf = prepare_quant_linear(w3, "cpu", torch.float32, mode="dequant")
        for m in (1, 16):
            x = torch.randn(m, k)
            big = k * n >= 4096 * 4096
            times = time_side_by_side(
                {
                    "fp32": lambda: torch.nn.functional.linear(x, dense),
                    "int4_4bit": lambda: quant_matmul(x, p4),
                    "int4_3bit": lambda: quant_matmul(x, p3),
                },
                rounds=5 if quick else 21,
                inner=3 if big else 20,
            )
            medians = dict(MEDIANS)
            # ~1000x slower: a few single calls tell the story without stalling the run
            times.update(time_side_by_side({"dequant_3bit": lambda: quant_matmul(x, p3_otf)},
                                           rounds=2 if big else 3, inner=1, warmup=1))
            MEDIANS.update(medians)
            row = {"K": k, "N": n, "M": m, "group": group, **{f"{key}_ms": v for key, v in times.items()},
                   **{f"{key}_median_ms": v for key, v in MEDIANS.items()}}
            row["fp32_over_int4_4bit"] = times["fp32"] / times["int4_4bit"]
            row["fp32_over_int4_3bit"] = times["fp32"] / times["int4_3bit"]
            row["dequant_over_int4_3bit"] = times["dequant_3bit"] / times["int4_3bit"]
            rows.append(row)
            print(
                f"  K={k:5d} N={n:5d} M={m:3d} g{group}: fp32 {times['fp32']:.3f} ms | int4 4-bit "
                f"{times['int4_4bit']:.3f} ms ({row['fp32_over_int4_4bit']:.2f}x) | 3-bit in int4 layout "
                f"{times['int4_3bit']:.3f} ms | 3-bit dequant on the fly {times['dequant_3bit']:.3f} ms",
                flush=True,
            )
    return rows


# --- dense: packed vs plain -------------------------------------------------------------------

# SmolLM2's gate|up with 4 rank-16 LoRA slots beside it, its head, a Llama-2-7B projection.
DENSE_SHAPES = [(704, 3072), (576, 49152), (4096, 4096)]
DENSE_STREAM_BYTES = 256 << 20  # cycle through this many bytes of weights: none stays in cache


def bench_dense(quick: bool) -> list[dict]:
    """A decode step reads every weight once from memory: each call takes the next of enough
    copies that the weight is never in cache, as in a real forward."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        if not packing_supported(torch.zeros(1, 1, dtype=dtype)):
            print(f"  {dtype}: skipped, this CPU's oneDNN cannot pack it", flush=True)
            continue
        for k, n in DENSE_SHAPES[:1] + DENSE_SHAPES[2:] if quick else DENSE_SHAPES:
            copies = max(2, DENSE_STREAM_BYTES // (k * n * dtype.itemsize))
            weights = [(torch.randn(n, k) * 0.02).to(dtype) for _ in range(copies)]
            packed = [PackedDenseWeight(w) for w in weights]
            for m in (1, 16, 256):
                x = torch.randn(m, k).to(dtype)
                for p in packed:
                    p.linear(x)  # pack outside the timed calls
                cursor = {"plain": 0, "packed": 0}

                def plain() -> None:
                    cursor["plain"] = (cursor["plain"] + 1) % copies
                    torch.nn.functional.linear(x, weights[cursor["plain"]])

                def packed_call() -> None:
                    cursor["packed"] = (cursor["packed"] + 1) % copies
                    packed[cursor["packed"]].linear(x)

                times = time_side_by_side({"plain": plain, "packed": packed_call},
                                          rounds=3 if quick else 7, inner=copies)
                row = {"dtype": str(dtype).removeprefix("torch."), "K": k, "N": n, "M": m,
                       "plain_ms": times["plain"], "packed_ms": times["packed"],
                       "plain_over_packed": times["plain"] / times["packed"],
                       "packed_GB_per_s": k * n * dtype.itemsize / (times["packed"] * 1e-3) / 1e9}
                rows.append(row)
                print(f"  {row['dtype']:8s} K={k:5d} N={n:5d} M={m:3d}: plain {times['plain']:.3f} ms | packed "
                      f"{times['packed']:.3f} ms ({row['plain_over_packed']:.2f}x, weight read at "
                      f"{row['packed_GB_per_s']:.1f} GB/s)", flush=True)
    return rows


# --- int4 vs dense by batch size ---------------------------------------------------------------

# SmolLM2's fused q|k|v, gate|up and down at the default group 128 (576 = 4.5 groups).
ENGINE_SHAPES = [(576, 960), (576, 3072), (1536, 576)]
INT4_STREAM_BYTES = 64 << 20  # of bf16 weights (fp32: twice): beyond the last-level cache, within memory
BATCH_SIZES = (1, 4, 16, 64, 256)


def bench_int4_by_batch(quick: bool) -> list[dict]:
    """The engine's projections at every decode batch size: torch's int4 kernel against the
    dense weights it replaces (bf16 and float32, packed for oneDNN as the engine holds them)
    and against dequantizing the codes to bf16 on every call. Weights streamed from memory
    (a real forward reads each weight once)."""
    rows = []
    for k, n in ENGINE_SHAPES[1:2] if quick else ENGINE_SHAPES:
        copies = max(2, INT4_STREAM_BYTES // (k * n * 2))
        layers = [random_gptq(k, n, 4, 128, seed=k + n + i) for i in range(copies)]
        int4 = [prepare_quant_linear(w, "cpu", torch.float32) for w in layers]
        on_the_fly = [prepare_quant_linear(w, "cpu", torch.bfloat16, mode="dequant") for w in layers[:4]]
        dense = {dtype: [PackedDenseWeight((torch.randn(n, k) * 0.02).to(dtype)) for _ in range(copies)]
                 for dtype in (torch.bfloat16, torch.float32)}
        for m in BATCH_SIZES[1:4] if quick else BATCH_SIZES:
            x = torch.randn(m, k)
            cursor = {"int4": 0, "bf16": 0, "fp32": 0, "dequant": 0}
            for weight in dense[torch.bfloat16] + dense[torch.float32]:
                weight.linear(x.to(weight.weight.dtype))  # pack outside the timed calls

            def step(name: str, size: int) -> int:
                cursor[name] = (cursor[name] + 1) % size
                return cursor[name]

            candidates = {
                "int4": lambda: quant_matmul(x, int4[step("int4", copies)]),
                "bf16_packed": lambda: dense[torch.bfloat16][step("bf16", copies)].linear(x.to(torch.bfloat16)),
                "fp32_packed": lambda: dense[torch.float32][step("fp32", copies)].linear(x),
                "dequant_bf16": lambda: quant_matmul(x.to(torch.bfloat16), on_the_fly[step("dequant", 4)]),
            }
            times = time_side_by_side(candidates, rounds=3 if quick else 7, inner=copies)
            row = {"K": k, "N": n, "M": m, **{f"{name}_ms": value for name, value in times.items()},
                   "bf16_over_int4": times["bf16_packed"] / times["int4"]}
            rows.append(row)
            print(f"  K={k:5d} N={n:5d} M={m:3d}: int4 {times['int4']:.3f} ms | bf16 packed {times['bf16_packed']:.3f} | "
                  f"fp32 packed {times['fp32_packed']:.3f} | dequant to bf16 per call {times['dequant_bf16']:.3f}", flush=True)
    return rows


# --- LoRA ------------------------------------------------------------------------------------

LORA_CASES = {
    # name: (num_slots, ranks, K, slice widths, requests [(slot, tokens)])
    "decode 32 tok, 32 adapters r16, qkv": (32, [16], 576, [576, 192, 192], [(s, 1) for s in range(32)]),
    "decode 32 tok, 32 adapters r8-64, qkv": (32, [8, 16, 32, 64], 576, [576, 192, 192], [(s, 1) for s in range(32)]),
    "decode 32 tok, 4 adapters r16, down": (4, [16], 1536, [576], [(s % 4, 1) for s in range(32)]),
    "prefill 512 tok, 4 adapters r16, qkv": (4, [16], 576, [576, 192, 192], [(s, 128) for s in range(4)]),
    "prefill 256 tok, 1 adapter r64, gate/up": (1, [64], 576, [1536, 1536], [(0, 256)]),
    "mixed 1x200 + 20x3 tok, r16, qkv": (21, [16], 576, [576, 192, 192], [(0, 200)] + [(s, 3) for s in range(1, 21)]),
}


def bench_lora(quick: bool) -> list[dict]:
    rows = []
    cases = dict(list(LORA_CASES.items())[:4]) if quick else LORA_CASES
    for name, (num_slots, ranks, k, widths, requests) in cases.items():
        args = lora_case(num_slots, ranks, k, widths, requests, seed=len(name))
        x = args[0]
        y = torch.zeros((x.shape[0], sum(widths)))
        base = random_gptq(k, sum(widths), 4, 64, seed=1)
        prepared = prepare_quant_linear(base, "cpu", torch.float32)
        times = time_side_by_side(
            {
                "base_int4": lambda: quant_matmul(x, prepared),
                "batched": lambda: batched(*args, y),
                "token_gather": lambda: token_gather(*args, y),
                "per_segment_loop": lambda: per_slot_loop(*args, y),
            },
            rounds=5 if quick else 15,
            inner=3,
        )
        row = {"case": name, **{f"{key}_ms": v for key, v in times.items()},
               **{f"{key}_median_ms": v for key, v in MEDIANS.items()}}
        row["lora_over_base"] = times["batched"] / times["base_int4"]
        rows.append(row)
        print(
            f"  {name:42s} base int4 {times['base_int4']:.3f} ms | LoRA batched {times['batched']:.3f} | "
            f"token gather {times['token_gather']:.3f} | per-segment loop {times['per_segment_loop']:.3f}",
            flush=True,
        )
    return rows


def bench_large_group_threshold(quick: bool) -> list[dict]:
    """Which group size should get its own matmul instead of joining the padded bmm."""
    rows = []
    original = lora_cpu_plan.LARGE_GROUP_TOKENS
    cases = {k: LORA_CASES[k] for k in ("decode 32 tok, 4 adapters r16, down", "mixed 1x200 + 20x3 tok, r16, qkv",
                                        "prefill 512 tok, 4 adapters r16, qkv")}
    try:
        for name, (num_slots, ranks, k, widths, requests) in cases.items():
            args = lora_case(num_slots, ranks, k, widths, requests, seed=3)
            y = torch.zeros((args[0].shape[0], sum(widths)))
            candidates = {}
            for threshold in (4, 16, 32, 128, 10**9):
                def run(threshold: int = threshold) -> None:
                    lora_cpu_plan.LARGE_GROUP_TOKENS = threshold
                    lora_cpu_plan._CACHE.entries.clear()  # plan must be rebuilt for the threshold
                    batched(*args, y)
                candidates[str(threshold)] = run
            times = time_side_by_side(candidates, rounds=3 if quick else 11, inner=2)
            rows.append({"case": name, **{f"threshold_{t}_ms": v for t, v in times.items()}})
            print(f"  {name:42s} " + " | ".join(f"thr {t}: {v:.3f} ms" for t, v in times.items()), flush=True)
    finally:
        lora_cpu_plan.LARGE_GROUP_TOKENS = original
        lora_cpu_plan._CACHE.entries.clear()
    return rows


def _markdown(result: dict) -> str:
    lines = [f"# CPU kernels ({result['machine']})", "", f"torch {result['torch']}, {result['threads']} threads", ""]
    load = result.get("load_average_before")
    if load:
        lines += [f"Machine load (1/5/15-min averages) before the run: {', '.join(f'{x:.1f}' for x in load)}", ""]
    if result.get("gemm"):
        lines += ["| K | N | M | group | fp32 ms | int4 4-bit ms | fp32/int4 | 3-bit int4-layout ms | 3-bit dequant-on-the-fly ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("gemm", []):
        lines.append(
            f"| {r['K']} | {r['N']} | {r['M']} | {r['group']} | {r['fp32_ms']:.3f} | {r['int4_4bit_ms']:.3f} | "
            f"{r['fp32_over_int4_4bit']:.2f}x | {r['int4_3bit_ms']:.3f} | {r['dequant_3bit_ms']:.3f} |"
        )
    if result.get("dense"):
        lines += ["", "Dense matmul, weights streamed from memory (never in cache):", "",
                  "| dtype | K | N | M | plain F.linear ms | packed for oneDNN ms | plain/packed | packed weight GB/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["dense"]:
            lines.append(f"| {r['dtype']} | {r['K']} | {r['N']} | {r['M']} | {r['plain_ms']:.3f} | {r['packed_ms']:.3f} | "
                         f"{r['plain_over_packed']:.2f}x | {r['packed_GB_per_s']:.1f} |")
    if result.get("int4_by_batch"):
        lines += ["", "The engine's projections (group 128) by batch size, weights streamed from memory:", "",
                  "| K | N | M | int4 ms | bf16 packed ms | fp32 packed ms | dequant to bf16 per call ms | bf16/int4 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["int4_by_batch"]:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['int4_ms']:.3f} | {r['bf16_packed_ms']:.3f} | "
                         f"{r['fp32_packed_ms']:.3f} | {r['dequant_bf16_ms']:.3f} | {r['bf16_over_int4']:.2f}x |")
    if result.get("lora"):
        lines += ["", "| LoRA case | base int4 ms | batched ms | token gather ms | per-segment loop ms | LoRA/base |",
                  "|---|---|---|---|---|---|"]
    for r in result.get("lora", []):
        lines.append(
            f"| {r['case']} | {r['base_int4_ms']:.3f} | {r['batched_ms']:.3f} | {r['token_gather_ms']:.3f} | "
            f"{r['per_segment_loop_ms']:.3f} | {r['lora_over_base']:.2f} |"
        )
    if result.get("threshold"):
        keys = [k for k in result["threshold"][0] if k.endswith("_ms")]
        lines += ["", "| case | " + " | ".join(k[len("threshold_"):-3] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for r in result["threshold"]:
            lines.append(f"| {r['case']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


PARTS: dict[str, tuple[str, Callable[[bool], list[dict]]]] = {
    "gemm": ("int4 weight-only GEMM vs fp32 (ms per call, best of interleaved rounds)", bench_gemm),
    "dense": ("dense matmul, packed for oneDNN vs plain (ms per call, weights streamed)", bench_dense),
    "int4-by-batch": ("int4 vs dense by batch size, the engine's projections (ms per call, weights streamed)",
                      bench_int4_by_batch),
    "lora": ("CPU LoRA path (shrink + expand, one projection)", bench_lora),
    "threshold": ("large-group threshold of the CPU LoRA plan", bench_large_group_threshold),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0 = torch's default). On a machine shared with other "
                             "jobs, 1 thread gives stable ratios: a parallel op stalls whenever one of its "
                             "threads is descheduled")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run these parts only (the results then go to a file named after them)")
    # main() from bench/run_all.py gets no argv: never read the caller's sys.argv
    args = parser.parse_args(argv if argv is not None else [])
    if args.threads < 0:
        parser.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result["load_average_before"] = os.getloadavg()
    for part in args.parts:
        title, run = PARTS[part]
        print(f"{title}:", flush=True)
        result[part.replace("-", "_")] = run(args.quick)
    result["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("kernels_cpu" if not args.threads else f"kernels_cpu_{args.threads}thread")
    if set(args.parts) != set(PARTS):
        stem = stem.with_name(stem.name + "_" + "_".join(part.replace("-", "_") for part in args.parts))
    if args.quick:  # fewer shapes: never over the full results committed under the same name
        stem = stem.with_name(stem.name + "_quick")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
