"""Measure executor step times on the default model and fit the simulator's cost model.

Runs the real `ModelRunner` (the executor's compute) on synthetic batch plans that cover
what the scheduler produces: decode batches of 1-64 rows at several context lengths,
prefill chunks of 16-2048 tokens, mixed steps, 0-8 distinct adapters of rank 8-64 (the
committed task adapters) and adapter loads. Every plan runs `--reps` times, in a shuffled
order so that machine load spreads over all shapes; the median is kept. Writes

    bench/results/sched_cost_data.json    every measured step (features, seconds)
    bench/results/sched_cost_model.json   the fitted StepCostModel (what the simulator loads)
    bench/results/sched_cost.md / .png    coefficients, in-sample and 5-fold errors, a plot
    (`--out-dir DIR`: every one of them in DIR instead of bench/results)

    .venv/bin/python bench/sched_cost.py [--threads 1] [--reps 3] [--tag NAME] [--quantized]

`--quantized` measures the server's default base instead of the fp32 model: the MLGPTQ 4-bit
suite base (inlaid.quant.suite, cached), with the embedding/head in bf16 where the CPU
multiplies bf16 natively (as `make run` and bench/e2e.py serve it).

`--tag xeon` writes sched_cost*_xeon.* instead: the fit of a second machine, beside the one
the committed sweep uses (docs/scheduling.md compares them).

`--from-gpu-suite OUT/gpu_suite.json --tag h200` fits the steps the GPU suite's step_costs
stage measured on a GPU (the same plan shapes through the engine, bench/gpu_step_costs.py)
on their wall clock; `bench/sched_sim.py --tag h200 --device cuda` then sweeps the schedulers on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ADAPTERS = Path(__file__).parents[1] / "adapters"
BLOCK_SIZE = 16
NUM_BLOCKS = 2048


def _plans(adapter_slots: list[tuple[str, str, int]], seed: int) -> list[tuple[str, dict]]:
    """(label, shape) pairs; a shape lists decode contexts, prefill chunks and adapters."""
    rng = random.Random(seed)
    shapes: list[tuple[str, dict]] = []
    for batch in (1, 2, 4, 8, 16, 32, 48, 64):
        for context in (80, 240, 480):
            for adapters in (0, 1, 3, 8):
                if adapters <= batch:
                    shapes.append((f"decode b{batch} ctx{context} a{adapters}",
                                   dict(decode=[context] * batch, prefill=[], adapters=adapters, loads=0)))
    for length in (16, 64, 128, 256, 512, 1024, 2048):
        for adapters in (0, 1):
            shapes.append((f"prefill {length} a{adapters}", dict(decode=[], prefill=[(0, length)], adapters=adapters, loads=0)))
    for chunks in (2, 4, 8):
        for length in (256, 1024):
            shapes.append((f"prefill {chunks}x{length // chunks} a{min(chunks, 4)}",
                           dict(decode=[], prefill=[(0, length // chunks)] * chunks, adapters=min(chunks, 4), loads=0)))
    shapes.append(("prefill continuation 512@1024", dict(decode=[], prefill=[(1024, 512)], adapters=1, loads=0)))
    for loads in (1, 2, 4, 8):
        shapes.append((f"decode b8 ctx240 loads{loads}", dict(decode=[240] * 8, prefill=[], adapters=min(loads, 8), loads=loads)))
    for index in range(60):  # mixed steps, as continuous batching makes them
        batch = rng.choice([0, 1, 3, 8, 16, 24, 40, 64])
        prefill = [(0, rng.choice([24, 60, 90, 150, 220, 400])) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        if not batch and not prefill:
            prefill = [(0, 100)]
        decode = [rng.randint(60, 500) for _ in range(batch)]
        adapters = rng.randint(0, min(8, batch + len(prefill)))
        shapes.append((f"mixed {index}", dict(decode=decode, prefill=prefill, adapters=adapters,
                                              loads=rng.choice([0, 0, 0, 1, 2]) if adapters else 0)))
    return shapes


def _build_plan(shape: dict, step_id: int, adapter_slots: list[tuple[str, str, int]], rng: random.Random):
    from inlaid.protocol import AdapterLoad, BatchPlan, ChunkPlan, SamplingParams

    greedy = SamplingParams(max_tokens=1 << 20)
    rows = [("decode", context - 1, 1) for context in shape["decode"]]
    rows += [("prefill", start, length) for start, length in shape["prefill"]]
    used = list(range(shape["adapters"]))
    next_block = 0
    chunks = []
    for index, (kind, start, length) in enumerate(rows):
        blocks = -(-(start + length) // BLOCK_SIZE)
        # Block contents do not matter for timing: ids wrap around a cache of NUM_BLOCKS.
        table = [(next_block + i) % NUM_BLOCKS for i in range(blocks)]
        next_block += blocks
        slot = used[index % len(used)] if used and (index < len(used) or rng.random() < 0.8) else -1
        chunks.append(ChunkPlan(seq_id=index, token_ids=[rng.randint(100, 40000) for _ in range(length)], start_pos=start,
                                block_table=table, adapter_slot=slot, sample=True, sampling=greedy, num_generated=0))
    loads = [AdapterLoad(slot=s, name=adapter_slots[s][0], path=adapter_slots[s][1]) for s in used[: shape["loads"]]]
    return BatchPlan(step_id=step_id, chunks=chunks, adapter_loads=loads), next_block


def quantized_base_settings() -> dict[str, str]:
    """EngineConfig fields that serve the MLGPTQ 4-bit suite base as the server does by default."""
    from inlaid.kernels.dense_cpu import native_bf16
    from inlaid.quant.suite import ensure_suite_checkpoint

    settings = {"quantized_dir": str(ensure_suite_checkpoint(adapters_dir=ADAPTERS))}
    if native_bf16():
        settings["weight_dtype"] = "bfloat16"  # the embedding/head, as make run serves it
    return settings


def measure(threads: int, reps: int, seed: int = 0, quantized: bool = False) -> list[dict]:
    import torch
    from tqdm import tqdm

    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.engine.config import EngineConfig
    from inlaid.engine.runner import ModelRunner
    from inlaid.models.prepare import prepare_default_model
    from inlaid.scheduling.cost_model import StepFeatures

    torch.set_num_threads(threads)
    names = sorted(p.name for p in ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())[:8]
    adapter_slots = [(name, str(ADAPTERS / name), read_adapter_spec(name, str(ADAPTERS / name)).rank) for name in names]
    config = EngineConfig(model_dir=str(prepare_default_model(quiet=True)), threads=threads, block_size=BLOCK_SIZE,
                          num_kv_blocks=NUM_BLOCKS, max_lora_slots=8, **(quantized_base_settings() if quantized else {}))
    runner = ModelRunner(config)
    for slot, (name, path, _) in enumerate(adapter_slots):
        runner.load_adapter(slot, name, path)
    rng = random.Random(seed)
    shapes = _plans(adapter_slots, seed)
    order = [index for index in range(len(shapes)) for _ in range(reps)]
    rng.shuffle(order)
    times: dict[int, list[float]] = {index: [] for index in range(len(shapes))}
    cpu_times: dict[int, list[float]] = {index: [] for index in range(len(shapes))}
    features: dict[int, StepFeatures] = {}
    warm, _ = _build_plan(shapes[0][1], 0, adapter_slots, rng)
    runner.execute(warm)
    for step, index in enumerate(tqdm(order, desc="steps", unit="step")):
        plan, _ = _build_plan(shapes[index][1], step, adapter_slots, rng)
        cpu_started = time.process_time()
        result = runner.execute(plan)
        cpu_times[index].append(time.process_time() - cpu_started)
        times[index].append(result.compute_seconds)
        features[index] = StepFeatures.of_plan(plan, lambda slot: adapter_slots[slot][2], BLOCK_SIZE)
    return [{"label": shapes[i][0], "features": features[i].__dict__, "seconds": times[i], "cpu_seconds": cpu_times[i],
             "median_seconds": statistics.median(times[i]), "median_cpu_seconds": statistics.median(cpu_times[i])}
            for i in range(len(shapes))]


def gpu_suite_steps(path: Path) -> dict:
    """sched_cost_data's layout from a gpu_suite.json whose step_costs stage ran."""
    report = json.loads(path.read_text())
    stage = report.get("stages", {}).get("step_costs", {})
    if stage.get("status") != "ok":
        raise SystemExit(f"{path}: the step_costs stage did not run ({stage.get('status', 'absent')}: "
                         f"{stage.get('reason', '')})")
    costs, environment = stage["data"], report["stages"]["environment"]["data"]
    load = environment.get("load_average", [0.0, 0.0, 0.0])
    return {"machine": "gpu", "device": environment["device"], "processor": environment["device"],
            "threads": 0, "reps": costs["reps"], "model": f"{costs['model']} ({costs['dtype']}, eager, "
            f"{costs['slots']} adapters r{costs['rank']})", "loadavg_before": load, "loadavg_after": load,
            "seconds": costs["seconds"],
            "steps": [{**row, "median_cpu_seconds": row["median_seconds"]} for row in costs["steps"]]}


def _cross_validated(samples: list, folds: int = 5) -> dict[str, float]:
    from inlaid.scheduling.cost_model import fit_cost_model, fit_errors

    held_out = []
    for fold in range(folds):
        train = [s for i, s in enumerate(samples) if i % folds != fold]
        model = fit_cost_model(train)
        held_out += [(f, t, model.step_seconds(f)) for i, (f, t) in enumerate(samples) if i % folds == fold]
    errors = sorted(abs(p - t) / t for _, t, p in held_out)
    return {"mean_abs_rel_error": sum(errors) / len(errors), "median_abs_rel_error": errors[len(errors) // 2],
            "p90_abs_rel_error": errors[int(0.9 * (len(errors) - 1))]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the executor's [executor] threads)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--refit", action="store_true", help="fit again from the committed data, measure nothing")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="fit the executor's CPU time (default: what a quiet machine's wall clock shows, "
                             "robust to other processes) or its wall time (this machine under its current load)")
    parser.add_argument("--quantized", action="store_true",
                        help="the MLGPTQ 4-bit suite base (the server's default) instead of the fp32 model")
    parser.add_argument("--from-gpu-suite", type=Path, default=None,
                        help="fit the step_costs stage of this gpu_suite.json (its wall clock) instead of measuring")
    parser.add_argument("--tag", default="", help="another machine's fit: files sched_cost*_TAG.* beside the committed "
                                                  "ones (bench/sched_sim.py --tag TAG sweeps on it)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="folder of every file it writes (default bench/results); --refit reads its data "
                             "there when it holds some, else the committed data")
    args = parser.parse_args(argv)
    from inlaid.cli_args import writable_dir_problem
    from inlaid.scheduling.cost_model import features_from_dict, fit_cost_model, fit_errors

    problem = writable_dir_problem(args.out_dir, "--out-dir")
    if problem:  # now, not after minutes of measuring
        parser.error(problem)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    data_path = out_dir / f"sched_cost_data{tag}.json"
    if args.from_gpu_suite is not None:
        if not args.tag:
            parser.error("--from-gpu-suite needs --tag (the committed fit is this machine's)")
        data = gpu_suite_steps(args.from_gpu_suite)
        data_path.write_text(json.dumps(data, indent=1) + "\n")
        args.clock = "wall"  # a GPU step's time is its wall clock (the step synchronizes)
    elif args.refit:
        data = json.loads((data_path if data_path.is_file() else RESULTS / data_path.name).read_text())
    else:
        load_before = os.getloadavg()
        started = time.perf_counter()
        rows = measure(args.threads, args.reps, quantized=args.quantized)
        data = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                "threads": args.threads, "reps": args.reps,
                "model": "SmolLM2-135M-Instruct " + ("MLGPTQ 4-bit suite base" if args.quantized else "fp32"),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                "seconds": time.perf_counter() - started, "steps": rows}
        data_path.write_text(json.dumps(data, indent=1) + "\n")
    key = "median_cpu_seconds" if args.clock == "cpu" else "median_seconds"
    samples = [(features_from_dict(row["features"]), row[key]) for row in data["steps"]]
    wall = [(features_from_dict(row["features"]), row["median_seconds"]) for row in data["steps"]]
    model_name = data.get("model", "SmolLM2-135M-Instruct fp32").replace("SmolLM2-135M-Instruct", "default model")
    where = f"on {data['device']}" if "device" in data else f"{data['threads']} threads"
    description = (f"ModelRunner.execute {args.clock} seconds, {model_name}, {where}, "
                   f"median of {data['reps']}, {len(samples)} plan shapes")
    model = fit_cost_model(samples, description)
    model.save(out_dir / f"sched_cost_model{tag}.json")
    report = {"clock": args.clock, "in_sample": fit_errors(model, samples), "five_fold": _cross_validated(samples),
              "against_wall_clock": fit_errors(model, wall), "coefficients": model.coefficients,
              "loadavg": data["loadavg_before"]}
    _write_markdown(report, data, samples, model, tag, out_dir)
    _plot(samples, model, out_dir / f"sched_cost{tag}.png")
    print(json.dumps(report, indent=1))
    return report


def _write_markdown(report: dict, data: dict, samples: list, model, tag: str, out_dir: Path = RESULTS) -> None:
    """sched_cost{tag}.md; `tag` is "" or "_NAME" (`--tag NAME`)."""
    units = {"constant": ("ms", 1e3), "tokens": ("ms / token", 1e3), "sampled": ("ms / row", 1e3),
             "decode_cells": ("us / 1k cells", 1e9), "prefill_cells": ("us / 1k cells", 1e9),
             "adapters": ("ms / adapter", 1e3), "lora_token_rank": ("us / (token x rank)", 1e6),
             "loads": ("ms / load", 1e3)}
    lines = ["# Step-time cost model (the simulator's executor)", "",
             f"{model.description}. Machine load (1/5/15 min) before: "
             f"{', '.join(f'{x:.2f}' for x in data['loadavg_before'])}; after: "
             f"{', '.join(f'{x:.2f}' for x in data['loadavg_after'])}.", "",
             "| feature | coefficient | unit |", "|---|---|---|"]
    for name, value in model.coefficients.items():
        unit, scale = units[name]
        lines.append(f"| {name} | {value * scale:.4g} | {unit} |")
    lines += ["", "| relative error | in sample | 5-fold held out |", "|---|---|---|"]
    for key in ("mean_abs_rel_error", "median_abs_rel_error", "p90_abs_rel_error"):
        lines.append(f"| {key.replace('_', ' ')} | {report['in_sample'][key]:.1%} | {report['five_fold'][key]:.1%} |")
    wall = report["against_wall_clock"]
    lines += ["", f"Against the wall clock of the same steps (this machine's load): mean |error| "
              f"{wall['mean_abs_rel_error']:.1%}, total bias {wall['total_bias']:+.1%}.", "",
              f"| plan | measured {report['clock']} ms | wall ms | model ms |", "|---|---|---|---|"]
    for row, (features, seconds) in zip(data["steps"], samples):
        if not row["label"].startswith("mixed"):
            lines.append(f"| {row['label']} | {seconds * 1e3:.1f} | {row['median_seconds'] * 1e3:.1f} | "
                         f"{model.step_seconds(features) * 1e3:.1f} |")
    option = f" --tag {tag[1:]}" if tag else ""
    lines += ["", f"Reproduce: `.venv/bin/python bench/sched_cost.py{option}` (measure and fit); "
              f"`--refit{option}` fits again from `sched_cost_data{tag}.json`.", ""]
    (out_dir / f"sched_cost{tag}.md").write_text("\n".join(lines))


def _plot(samples: list, model, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [s * 1e3 for _, s in samples]
    predicted = [model.step_seconds(f) * 1e3 for f, _ in samples]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.loglog(measured, predicted, "o", alpha=0.6, markersize=4)
    low, high = min(measured + predicted) * 0.8, max(measured + predicted) * 1.2
    ax.plot([low, high], [low, high], "k--", linewidth=1)
    ax.set_xlabel("measured step (ms)")
    ax.set_ylabel("cost model (ms)")
    ax.set_title("Executor step time: cost model vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
