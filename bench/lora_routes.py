"""Which CPU LoRA route a decode step should take when few of the loaded slots are in use, and
what the native kernel (kernels/lora_native.c, the engine's route where it is built) gives.

The compact masked route (kernels/lora_compact_cpu.py) multiplies every decode token against
every LOADED slot's columns in 3 + n_slices ops; the per-adapter route reads only the step's own
slots, in 1 + n_slices ops per slot. With 16 slots loaded (the e2e servers' 100-task setting)
and 2-4 adapters in a step (what the e2e replays show), the first reads 4-8x the bytes it needs.
This times both on SmolLM2-135M's four LoRA projections (q|k|v, o, gate|up, down; ranks of the
nine committed adapters, cycled over the slots; float32 pools as the CPU engine keeps them) for
T decode tokens spread over k slots, torch's choice between them (compact only while the step's
slots own COMPACT_MIN_ACTIVE_SHARE of the columns) and the native kernel, on the float32 pools and
on their float16 copies (what the engine reads for adapters stored in float16; the pools'
values here are float16 values, as the committed adapters' are). One torch thread; per step = 120
projections (30 layers), from 32 distinct projections' weights (8 layers' worth, so the pools
do not all sit in the cache).

    .venv/bin/python bench/lora_routes.py [--repeats 5]

Writes bench/results/lora_routes.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SLOTS, R_MAX = 16, 64
RANKS = [32, 16, 8, 8, 32, 16, 16, 8, 64]  # the committed adapters' ranks
PROJECTIONS = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]
LAYERS = 8  # distinct copies; a step's time is scaled to the model's 30 layers
STEPS = [(2, 2), (4, 2), (4, 4), (16, 2), (16, 4), (16, 8), (16, 12), (16, 16)]  # (tokens, slots in use)


def _projection(in_features: int, widths: list[int], gen: torch.Generator) -> dict:
    from inlaid.kernels.dispatch import build_compact_pools
    from inlaid.kernels.lora_native import HalfPools, NativeLoraPools, native_half_copies_worth_it, native_lora_available

    n = len(widths)
    stacked = torch.zeros(SLOTS, n * R_MAX, in_features)
    b_storage = [torch.zeros(SLOTS, R_MAX, width) for width in widths]
    ranks = torch.zeros(n, SLOTS, dtype=torch.int32)
    for slot in range(SLOTS):
        rank = RANKS[slot % len(RANKS)]
        ranks[:, slot] = rank
        stacked[slot].view(n, R_MAX, in_features)[:, :rank] = (
            torch.randn(n, rank, in_features, generator=gen) * 0.01).half().float()
        for i, width in enumerate(widths):
            b_storage[i][slot, :rank] = (torch.randn(rank, width, generator=gen) * 0.01).half().float()
    scales = torch.rand(n, SLOTS, generator=gen)
    b_pools = [b.transpose(1, 2) for b in b_storage]
    offsets = [sum(widths[:i]) for i in range(n)]
    bound = {}
    if native_lora_available():
        bound["float32"] = NativeLoraPools(stacked, b_pools, offsets, ranks, scales)
        if native_half_copies_worth_it():
            half = HalfPools.like(stacked, b_pools)
            half.stacked_a.copy_(stacked)
            for copy, b in zip(half.b_pools, b_pools):
                copy.copy_(b)
            half.slot_half.fill_(1)
            bound["float16"] = NativeLoraPools(stacked, b_pools, offsets, ranks, scales, half)
    return {"K": in_features, "N": sum(widths), "a": [stacked[:, i * R_MAX:(i + 1) * R_MAX] for i in range(n)],
            "b": b_pools, "offsets": offsets, "ranks": ranks, "scales": scales, "bound": bound,
            "stacked": stacked, "compact": build_compact_pools(stacked, b_pools, ranks, scales)}


def _step_ms(projections: list[dict], tokens: int, in_use: int, share: float, native: str | None,
             rng: random.Random) -> float:
    """ms of one step's 120 projections; native: None (torch's routes), or the pools the kernel
    reads ("float32", or "float16": the copies)."""
    from inlaid.kernels import lora_cpu
    from inlaid.kernels.dispatch import lora_host_segments

    slots = sorted(rng.sample(range(SLOTS), in_use))
    starts = [round(i * tokens / in_use) for i in range(in_use)] + [tokens]
    segments = lora_host_segments(torch.tensor(starts, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32),
                                  tokens, SLOTS)
    saved, saved_native = lora_cpu.COMPACT_MIN_ACTIVE_SHARE, lora_cpu.USE_NATIVE
    lora_cpu.COMPACT_MIN_ACTIVE_SHARE, lora_cpu.USE_NATIVE = share, native is not None
    inputs = [(torch.randn(tokens, p["K"]), torch.zeros(tokens, p["N"])) for p in projections]
    try:
        start = time.perf_counter()
        for p, (x, y) in zip(projections, inputs):
            lora_cpu.lora_apply_cpu(y, x, p["a"], p["b"], p["offsets"], segments, p["ranks"], p["scales"],
                                    stacked_a=p["stacked"], compact=p["compact"],
                                    native=p["bound"][native] if native else None)
        elapsed = time.perf_counter() - start
    finally:
        lora_cpu.COMPACT_MIN_ACTIVE_SHARE, lora_cpu.USE_NATIVE = saved, saved_native
    return elapsed / len(projections) * 4 * 30 * 1e3


def measure(repeats: int) -> dict:
    from inlaid.kernels import lora_cpu

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    projections = [_projection(k, widths, gen) for _ in range(LAYERS) for k, widths in PROJECTIONS]
    routes = {"compact (every loaded slot)": (0.0, None), "per adapter": (2.0, None),
              "torch's choice": (lora_cpu.COMPACT_MIN_ACTIVE_SHARE, None)}
    if "float32" in projections[0]["bound"]:
        routes["engine's choice"] = (lora_cpu.COMPACT_MIN_ACTIVE_SHARE, "float32")  # the native kernel (lora_native.c)
    if "float16" in projections[0]["bound"]:
        routes["native, float16 copies"] = (lora_cpu.COMPACT_MIN_ACTIVE_SHARE, "float16")
    rows = []
    for tokens, in_use in STEPS:
        rng = random.Random(tokens * 100 + in_use)
        times = {name: min(_step_ms(projections, tokens, in_use, share, native, rng) for _ in range(repeats))
                 for name, (share, native) in routes.items()}
        rows.append({"tokens": tokens, "slots_in_use": in_use, **{f"{name} ms": ms for name, ms in times.items()}})
        print(rows[-1], flush=True)
    return {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1,
            "loaded_slots": SLOTS, "ranks": RANKS, "repeats": repeats, "loadavg_before": list(os.getloadavg()),
            "compact_min_active_share": lora_cpu.COMPACT_MIN_ACTIVE_SHARE, "rows": rows}


def write_markdown(result: dict, path: Path) -> None:
    names = [key[:-3] for key in result["rows"][0] if key.endswith(" ms")]
    lines = ["# CPU LoRA routes of a decode step, by slots in use (16 loaded)", "",
             f"{result['machine']}, torch {result['torch']}, 1 thread, float32 pools; ranks {result['ranks']} "
             f"cycled over {result['loaded_slots']} slots; ms per step of 120 projections, best of "
             f"{result['repeats']}. Load average before: {', '.join(f'{v:.1f}' for v in result['loadavg_before'])}. "
             f"Torch's routes: the compact one only while the step's slots own "
             f">= {result['compact_min_active_share']} of its columns, else per adapter; the engine's choice "
             f"is the native kernel (kernels/lora_native.c) where it is built, torch's choice otherwise; "
             f"'native, float16 copies': the kernel reading float16 copies of the pools (the engine's "
             f"route for adapters stored in float16, where the CPU has AVX-512).", "",
             "| tokens | slots in use | " + " | ".join(f"{n} ms" for n in names) + " | compact / engine |",
             "|---|---|" + "---|" * len(names) + "---|"]
    engine = "engine's choice" if "engine's choice ms" in result["rows"][0] else "torch's choice"
    for row in result["rows"]:
        ratio = row["compact (every loaded slot) ms"] / row[f"{engine} ms"]
        lines.append(f"| {row['tokens']} | {row['slots_in_use']} | "
                     + " | ".join(f"{row[f'{n} ms']:.1f}" for n in names) + f" | {ratio:.2f}x |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_routes.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "lora_routes.md")
    print((args.out / "lora_routes.md").read_text())


if __name__ == "__main__":
    main()
