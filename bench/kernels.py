"""GPU kernel benchmark: W4A16 GEMM vs cuBLAS fp16, SGMV vs baselines, LoRA overhead.

    .venv/bin/python bench/kernels.py            # on a CUDA machine (skips cleanly without one)
    .venv/bin/python bench/kernels.py --quick    # fewer shapes, no tile sweep
    .venv/bin/python bench/kernels.py --dry-run  # CPU, TRITON_INTERPRET=1, tiny shapes: checks the script

Measured in ONE run on one device (ratios are side by side):
  * device copy bandwidth (the yardstick for memory-bound kernels);
  * Llama-2-7B linear shapes (4096x4096, 4096x11008, 11008x4096), M = 1, 4, 16, 64, 256:
    Triton W4A16 (forced), dequant + cuBLAS, the auto path, vs cuBLAS fp16 (x @ W);
    3- and 2-bit at M = 1, 16; a tile sweep at M = 1, 16 (best vs default config);
  * SGMV shrink+expand on 128 tokens with 1/8/32/128 distinct adapters, ranks 8-64 mixed,
    vs torch gather+bmm and vs a per-adapter loop, with achieved bandwidth;
  * LoRA overhead: W4A16 linear + SGMV vs the W4A16 linear alone, batch 32, 32 distinct
    rank-16 adapters.
Times: triton.testing.do_bench (eager, includes Python launch costs) and
do_bench_cudagraph (what a CUDA-graph decode step pays). Writes
bench/results/kernels_gpu_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


@dataclass
class Bench:
    device: torch.device
    dry_run: bool
    quick: bool

    def ms(self, fn: Callable[[], object], graph: bool = False) -> float:
        if self.dry_run:
            fn()
            samples = []
            for _ in range(2):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
            return statistics.median(samples)
        import triton.testing

        fn()  # compiles kernels, fills caches (pointer tables) before any capture
        torch.cuda.synchronize()
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50 if self.quick else 100))
        return float(triton.testing.do_bench(fn, warmup=10, rep=50 if self.quick else 100))


def copy_bandwidth(bench: Bench) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    size = (1 << 20) if bench.dry_run else (1 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    ms = bench.ms(lambda: dst.copy_(src))
    return 2 * size / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------ W4A16

def bench_gemm(bench: Bench, act_dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
    from inlaid.kernels import quant_triton
    from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
    from inlaid.kernels.testing import random_gptq_layer

    shapes = [(128, 64)] if bench.dry_run else (LLAMA7B_SHAPES[:1] if bench.quick else LLAMA7B_SHAPES)
    batch_sizes = [1, 16, 32] if bench.dry_run else [1, 4, 16, 64, 256]
    group = 32 if bench.dry_run else 128
    rows, sweeps = [], []
    for k, n in shapes:
        for bits in (4, 3, 2) if (k, n) == shapes[0] else (4,):
            layer = random_gptq_layer(k, n, bits, group, seed=k + n + bits)
            prepared = prepare_quant_linear(layer.weights, bench.device, act_dtype,
                                            mode="triton" if bench.dry_run else "auto")
            layout = prepared.layout
            dense = torch.randn((k, n), device=bench.device, dtype=act_dtype) * 0.02
            for m in batch_sizes if bits == 4 else [b for b in batch_sizes if b <= 16]:
                x = torch.randn((m, k), device=bench.device, dtype=act_dtype)
                t = {
                    "cublas_fp16": bench.ms(lambda: x @ dense, graph=True),
                    "triton": bench.ms(lambda: quant_triton.triton_quant_matmul(x, layout, bits, None, 1 << 30), graph=True),
                    "dequant_cublas": bench.ms(lambda: quant_triton.triton_quant_matmul(x, layout, bits, None, 0), graph=True),
                    "auto": bench.ms(lambda: quant_matmul(x, prepared), graph=True),
                    "auto_eager": bench.ms(lambda: quant_matmul(x, prepared)),
                }
                weight_bytes = k * n * bits / 8 + 2 * (k // group) * n * 2
                row = {"K": k, "N": n, "M": m, "bits": bits, "group": group, **{f"{key}_ms": v for key, v in t.items()}}
                row["speedup_triton"] = t["cublas_fp16"] / t["triton"]
                row["speedup_auto"] = t["cublas_fp16"] / t["auto"]
                row["triton_GBps"] = (weight_bytes + 2 * m * (k + n)) / (t["triton"] * 1e-3) / 1e9
                rows.append(row)
                print(f"  {bits}-bit K={k:5d} N={n:5d} M={m:3d}: cuBLAS {t['cublas_fp16'] * 1e3:8.1f} us | "
                      f"triton {t['triton'] * 1e3:8.1f} us ({row['speedup_triton']:.2f}x, {row['triton_GBps']:.0f} GB/s) | "
                      f"dequant+cuBLAS {t['dequant_cublas'] * 1e3:8.1f} us | auto {t['auto'] * 1e3:8.1f} us "
                      f"({row['speedup_auto']:.2f}x) | auto eager {t['auto_eager'] * 1e3:8.1f} us", flush=True)
                if bits == 4 and m <= 16 and not bench.quick:
                    sweeps.append(sweep_decode_configs(bench, x, layout, bits, k, n, m, t["triton"]))
    return rows, sweeps


def sweep_decode_configs(bench: Bench, x, layout, bits: int, k: int, n: int, m: int, default_ms: float) -> dict:
    from inlaid.kernels import quant_triton

    best = {"ms": default_ms, "config": "default"}
    block_ks = [32] if bench.dry_run else [64, 128]
    split_ks = [1, 2] if bench.dry_run else [1, 2, 4, 8, 16]
    for block_n in ([32] if bench.dry_run else [32, 64, 128]):
        for block_k in block_ks:
            for split_k in split_ks:
                config = {"block_m": 16, "block_n": block_n, "block_k": block_k, "split_k": split_k}
                ms = bench.ms(lambda: quant_triton.triton_quant_matmul(x, layout, bits, None, 1 << 30, **config),
                              graph=True)
                if ms < best["ms"]:
                    best = {"ms": ms, "config": config}
    print(f"    sweep K={k} N={n} M={m}: default {default_ms * 1e3:.1f} us, best {best['ms'] * 1e3:.1f} us "
          f"with {best['config']}", flush=True)
    return {"K": k, "N": n, "M": m, "default_ms": default_ms, "best_ms": best["ms"], "best_config": best["config"]}


# ------------------------------------------------------------------------------------- SGMV

def _lora_apply_fn(bench: Bench):
    if not bench.dry_run:
        from inlaid.kernels.dispatch import lora_apply

        return lora_apply
    from inlaid.kernels import lora_triton

    def apply(y, x, a_pools, b_pools, offsets, starts, slots, ranks, scales, v_buffer=None):
        v = v_buffer if v_buffer is not None else torch.empty(
            (len(a_pools), x.shape[0], a_pools[0].shape[1]), dtype=torch.float32, device=x.device)
        lora_triton.sgmv_shrink(x, a_pools, starts, slots, ranks, v)
        lora_triton.sgmv_expand(y, v, b_pools, offsets, starts, slots, ranks, scales)

    return apply


def _zero_padded_pools(case) -> None:
    """Baselines multiply whole R_max tiles: give them zeros (not NaN) in the padding."""
    for pools in (case.a_pools, case.b_pools):
        for pool in pools:
            torch.nan_to_num_(pool, nan=0.0)


def bench_sgmv(bench: Bench, act_dtype: torch.dtype, copy_gbps: float) -> list[dict]:
    from inlaid.kernels.testing import random_lora_case

    apply = _lora_apply_fn(bench)
    num_tokens = 16 if bench.dry_run else 128
    hidden = 64 if bench.dry_run else 4096
    rank_cycle = [8, 16, 32, 64]
    rows = []
    for distinct in ([1, 4, 16] if bench.dry_run else [1, 8, 32, 128]):
        per = num_tokens // distinct
        requests = [(s, per) for s in range(distinct)]
        num_slots = max(distinct, 4)
        ranks = [[rank_cycle[s % 4] for s in range(num_slots)]]
        case = random_lora_case(requests, ranks, hidden, [hidden], 64, dtype=torch.float32, seed=distinct)
        _zero_padded_pools(case)
        case = case.to(bench.device)
        case.x = case.x.to(act_dtype)
        case.a_pools = [a.to(act_dtype) for a in case.a_pools]
        case.b_pools = [b.to(act_dtype) for b in case.b_pools]
        x, a, b = case.x, case.a_pools[0], case.b_pools[0]
        y = torch.zeros((num_tokens, hidden), device=bench.device, dtype=act_dtype)
        args = (case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                case.slot_ranks, case.slot_scales)
        lengths = (case.segment_starts[1:] - case.segment_starts[:-1]).long()
        token_slot = torch.repeat_interleave(case.segment_slots.long(), lengths)
        rank_mask = (torch.arange(64, device=bench.device)[None, :]
                     < case.slot_ranks[0].long()[token_slot][:, None]).to(act_dtype)
        token_scale = case.slot_scales[0][token_slot][:, None].to(act_dtype)

        def gather_bmm() -> None:  # per-token gathered adapters at R_max (padded ranks computed)
            v = torch.bmm(a[token_slot], x[:, :, None]).squeeze(2) * rank_mask * token_scale
            y.add_(torch.bmm(b[token_slot], v[:, :, None]).squeeze(2))

        bounds = case.segment_starts.tolist()
        slot_list = case.segment_slots.tolist()
        slot_rank = case.slot_ranks[0].tolist()
        slot_scale = case.slot_scales[0].tolist()

        def per_adapter_loop() -> None:
            for g, slot in enumerate(slot_list):
                r = slot_rank[slot]
                rows_g = slice(bounds[g], bounds[g + 1])
                y[rows_g].add_((x[rows_g] @ a[slot, :r].T) @ b[slot, :, :r].T, alpha=slot_scale[slot])

        t = {
            "sgmv": bench.ms(lambda: apply(y, x, *args), graph=True),
            "sgmv_eager": bench.ms(lambda: apply(y, x, *args)),
            "gather_bmm": bench.ms(gather_bmm),
            "per_adapter_loop": bench.ms(per_adapter_loop),
        }
        used_ranks = [slot_rank[s] for s in range(distinct)]
        bytes_moved = 2 * (sum(used_ranks) * hidden * 2 + num_tokens * hidden * 3)  # A, B; x read, y read+write
        row = {"tokens": num_tokens, "distinct_adapters": distinct, "K": hidden, "N": hidden,
               **{f"{key}_ms": v for key, v in t.items()}}
        row["sgmv_GBps"] = bytes_moved / (t["sgmv"] * 1e-3) / 1e9
        row["fraction_of_copy_bw"] = row["sgmv_GBps"] / copy_gbps
        row["speedup_vs_gather_bmm"] = t["gather_bmm"] / t["sgmv"]
        row["speedup_vs_loop"] = t["per_adapter_loop"] / t["sgmv"]
        rows.append(row)
        print(f"  {distinct:3d} adapters / {num_tokens} tokens: SGMV {t['sgmv'] * 1e3:7.1f} us "
              f"({row['sgmv_GBps']:.0f} GB/s = {100 * row['fraction_of_copy_bw']:.0f}% of copy) | eager "
              f"{t['sgmv_eager'] * 1e3:7.1f} us | gather+bmm {t['gather_bmm'] * 1e3:7.1f} us | "
              f"loop {t['per_adapter_loop'] * 1e3:7.1f} us", flush=True)
    return rows


def bench_lora_overhead(bench: Bench, act_dtype: torch.dtype) -> list[dict]:
    from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
    from inlaid.kernels.testing import random_gptq_layer, random_lora_case

    apply = _lora_apply_fn(bench)
    batch = 8 if bench.dry_run else 32
    hidden = 64 if bench.dry_run else 4096
    projections = {f"q_proj {hidden}->{hidden}": [hidden]}
    if not bench.dry_run and not bench.quick:
        projections["gate/up 4096->2x11008"] = [11008, 11008]
    rows = []
    for name, widths in projections.items():
        layer = random_gptq_layer(hidden, sum(widths), 4, 32 if bench.dry_run else 128, seed=7)
        prepared = prepare_quant_linear(layer.weights, bench.device, act_dtype,
                                        mode="triton" if bench.dry_run else "auto")
        case = random_lora_case([(s, 1) for s in range(batch)], [[16] * batch] * len(widths), hidden, widths, 16,
                                seed=8).to(bench.device)
        x = case.x.to(act_dtype)
        a_pools = [p.to(act_dtype) for p in case.a_pools]
        b_pools = [p.to(act_dtype) for p in case.b_pools]
        v_buffer = torch.empty((len(widths), batch, 16), dtype=torch.float32, device=bench.device)

        def with_lora() -> None:
            y = quant_matmul(x, prepared)
            apply(y, x, a_pools, b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                  case.slot_ranks, case.slot_scales, v_buffer=v_buffer)

        t = {
            "base": bench.ms(lambda: quant_matmul(x, prepared), graph=True),
            "base_lora": bench.ms(with_lora, graph=True),
            "base_eager": bench.ms(lambda: quant_matmul(x, prepared)),
            "base_lora_eager": bench.ms(with_lora),
        }
        row = {"projection": name, "batch": batch, "adapters": batch, "rank": 16, **{f"{k}_ms": v for k, v in t.items()}}
        row["overhead_graph"] = t["base_lora"] / t["base"] - 1
        row["overhead_eager"] = t["base_lora_eager"] / t["base_eager"] - 1
        rows.append(row)
        print(f"  {name}: W4A16 {t['base'] * 1e3:.1f} us, + SGMV {t['base_lora'] * 1e3:.1f} us "
              f"(+{100 * row['overhead_graph']:.0f}% graph, +{100 * row['overhead_eager']:.0f}% eager)", flush=True)
    return rows


# ----------------------------------------------------------------------------------- report

def _markdown(result: dict) -> str:
    lines = [f"# GPU kernels on {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, activations {result['act_dtype']}; "
             f"device copy bandwidth {result['copy_GBps']:.0f} GB/s. Times in microseconds (CUDA graph).", "",
             "| bits | K | N | M | cuBLAS fp16 | Triton | speedup | Triton GB/s | dequant+cuBLAS | auto | auto speedup | auto eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["gemm"]:
        lines.append(f"| {r['bits']} | {r['K']} | {r['N']} | {r['M']} | {r['cublas_fp16_ms'] * 1e3:.1f} | "
                     f"{r['triton_ms'] * 1e3:.1f} | {r['speedup_triton']:.2f}x | {r['triton_GBps']:.0f} | "
                     f"{r['dequant_cublas_ms'] * 1e3:.1f} | {r['auto_ms'] * 1e3:.1f} | {r['speedup_auto']:.2f}x | "
                     f"{r['auto_eager_ms'] * 1e3:.1f} |")
    if result["gemm_sweep"]:
        lines += ["", "| K | N | M | default us | best us | best config |", "|---|---|---|---|---|---|"]
        for r in result["gemm_sweep"]:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['default_ms'] * 1e3:.1f} | {r['best_ms'] * 1e3:.1f} | "
                         f"{r['best_config']} |")
    lines += ["", "| adapters in 128 tokens | SGMV us | GB/s | % of copy | SGMV eager us | gather+bmm us | loop us | vs gather | vs loop |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["sgmv"]:
        lines.append(f"| {r['distinct_adapters']} | {r['sgmv_ms'] * 1e3:.1f} | {r['sgmv_GBps']:.0f} | "
                     f"{100 * r['fraction_of_copy_bw']:.0f}% | {r['sgmv_eager_ms'] * 1e3:.1f} | {r['gather_bmm_ms'] * 1e3:.1f} | "
                     f"{r['per_adapter_loop_ms'] * 1e3:.1f} | {r['speedup_vs_gather_bmm']:.2f}x | {r['speedup_vs_loop']:.2f}x |")
    lines += ["", "| projection | batch / adapters | W4A16 us | + SGMV us | overhead (graph) | overhead (eager) |",
              "|---|---|---|---|---|---|"]
    for r in result["lora_overhead"]:
        lines.append(f"| {r['projection']} | {r['batch']} / {r['adapters']} (r{r['rank']}) | {r['base_ms'] * 1e3:.1f} | "
                     f"{r['base_lora_ms'] * 1e3:.1f} | {100 * r['overhead_graph']:.1f}% | {100 * r['overhead_eager']:.1f}% |")
    lines += ["", f"Suggested dense_min_m (smallest M where dequant+cuBLAS beat Triton): {result['suggested_dense_min_m']}"]
    return "\n".join(lines) + "\n"


def _suggest_dense_min_m(rows: list[dict]) -> int | None:
    losing = sorted({r["M"] for r in rows if r["bits"] == 4 and r["dequant_cublas_ms"] < r["triton_ms"]})
    return losing[0] if losing else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one GEMM shape, no tile sweep")
    parser.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1 at tiny shapes")
    # main() from bench/run_all.py gets no argv: never read the caller's sys.argv
    args = parser.parse_args(argv if argv is not None else [])
    if args.dry_run:
        from inlaid.kernels.interpret import enable_triton_interpreter

        if not enable_triton_interpreter():
            print("dry run needs a process where triton is not loaded yet and no CUDA")
            return 1
        device, act_dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("bench/kernels.py: CUDA not available, skipping (GPU benchmark; see bench/kernels_cpu.py)")
        return 0
    else:
        device, act_dtype = torch.device("cuda"), torch.float16
    import triton

    bench = Bench(device, args.dry_run, args.quick or args.dry_run)
    name = "cpu-interpreter" if args.dry_run else torch.cuda.get_device_name(device)
    result: dict = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                    "act_dtype": str(act_dtype).replace("torch.", "")}
    print(f"device: {name}")
    result["copy_GBps"] = copy_bandwidth(bench)
    print(f"device copy bandwidth: {result['copy_GBps']:.0f} GB/s")
    print("W4A16 (and 3/2-bit) GEMM vs cuBLAS fp16:")
    result["gemm"], result["gemm_sweep"] = bench_gemm(bench, act_dtype)
    result["suggested_dense_min_m"] = _suggest_dense_min_m(result["gemm"])
    print("SGMV shrink+expand, 128 tokens, ranks 8-64 mixed:")
    result["sgmv"] = bench_sgmv(bench, act_dtype, result["copy_GBps"])
    print("LoRA overhead on a W4A16 linear:")
    result["lora_overhead"] = bench_lora_overhead(bench, act_dtype)
    if args.dry_run:  # a script check, not a measurement: print, keep bench/results clean
        print(_markdown(result))
        return 0
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"kernels_gpu_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
