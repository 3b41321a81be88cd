"""GPU suite, step costs: the scheduler simulator's cost model measured on the device.

The simulator (bench/sched_sim.py) prices every step it schedules with a `StepCostModel`
fitted to real executor steps (bench/sched_cost.py does it on the CPU with the default
model). This stage runs the same plan shapes -- decode batches of 1-64 rows at several
contexts, prefill chunks of 16-2048 tokens, mixed continuous-batching steps, 0-8 distinct
adapters -- through the engine's `ModelRunner.execute` on the device, on the decode
stage's model (Llama-2-7B shapes, random 4-bit weights, group 128, bf16 activations),
eagerly as the server runs it by default, and fits the model on the medians. No adapter
file matches that model, so the shapes that load adapters are left out (the `loads`
coefficient stays 0: loading is measured by bench/adapter_load.py) and every slot holds
a random rank-16 adapter.

The returned rows have sched_cost_data.json's layout, so on the CPU machine

    .venv/bin/python bench/sched_cost.py --from-gpu-suite OUT/gpu_suite.json --tag h200
    .venv/bin/python bench/sched_sim.py --tag h200 --device cuda

fit and sweep the schedulers on the device's costs.
"""

from __future__ import annotations

import gc
import random
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import torch

from gpu_kernels import Device

RANK = 16
SLOTS = 8


def _device_plan(shape: dict, step_id: int, vocab: int, rng: random.Random):  # noqa: ANN202  (a BatchPlan)
    """sched_cost's plan for `shape`, its token ids folded into this model's vocabulary."""
    from sched_cost import _build_plan

    plan, _ = _build_plan(shape, step_id, [(f"slot{i}", "", RANK) for i in range(SLOTS)], rng)
    chunks = [msgspec.structs.replace(chunk, token_ids=[t % vocab for t in chunk.token_ids]) for chunk in plan.chunks]
    return msgspec.structs.replace(plan, chunks=chunks)


def step_costs(device: Device, reps: int = 3) -> dict:
    from gpu_decode import LLAMA2_7B, TINY, fill_adapters, random_quantized_model
    from sched_cost import BLOCK_SIZE, NUM_BLOCKS, _plans

    from inlaid.engine.config import EngineConfig
    from inlaid.engine.runner import ModelRunner
    from inlaid.scheduling.cost_model import StepFeatures, fit_cost_model, fit_errors

    gc.collect()
    if device.torch_device.type == "cuda":
        torch.cuda.empty_cache()  # the decode stage's KV cache and graph pools
    dry = device.dry_run
    dtype = device.act_dtype if dry else torch.bfloat16
    raw = TINY if dry else LLAMA2_7B
    shapes = [(label, {**shape, "loads": 0}) for label, shape in _plans([], seed=0) if not shape["loads"]
              or label.startswith("mixed")]
    if dry:  # the interpreter-free CPU path still runs every shape slowly: a sample
        shapes = shapes[::12]
        reps = 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model = random_quantized_model(raw, Path(folder), 4, 32 if dry else 128, device.torch_device, dtype)
        config = EngineConfig(
            model_dir=folder, device=str(device.torch_device), dtype=str(dtype).removeprefix("torch."),
            max_num_seqs=64, max_num_batched_tokens=2048, block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS,
            max_model_len=2048, max_lora_slots=SLOTS, max_lora_rank=RANK, cuda_graphs=False)
        runner = ModelRunner(config, model=model)
    fill_adapters(runner, seed=3)
    build_seconds = time.perf_counter() - started
    vocab = runner.model_config.vocab_size
    rng = random.Random(0)
    order = [index for index in range(len(shapes)) for _ in range(reps)]
    rng.shuffle(order)
    for index in range(len(shapes)):  # first calls compile kernels for each new shape: not timed
        runner.execute(_device_plan(shapes[index][1], index, vocab, rng))
    seconds: dict[int, list[float]] = {index: [] for index in range(len(shapes))}
    features: dict[int, StepFeatures] = {}
    for step, index in enumerate(order):
        plan = _device_plan(shapes[index][1], step, vocab, rng)
        seconds[index].append(runner.execute(plan).compute_seconds)  # synchronized on CUDA
        features[index] = StepFeatures.of_plan(plan, lambda slot: RANK, BLOCK_SIZE)
    rows = [{"label": shapes[i][0], "features": features[i].__dict__, "seconds": seconds[i],
             "median_seconds": statistics.median(seconds[i])} for i in range(len(shapes))]
    samples = [(features[i], rows[i]["median_seconds"]) for i in range(len(shapes))]
    fitted = fit_cost_model(samples, "ModelRunner.execute wall seconds on the device, Llama-2-7B shape, "
                                     "random 4-bit g128 weights, bf16, eager")
    for row in rows:
        if not row["label"].startswith("mixed"):
            print(f"  {row['label']:28s} {row['median_seconds'] * 1e3:8.2f} ms", flush=True)
    errors = fit_errors(fitted, samples)
    print(f"  fit: mean |error| {errors['mean_abs_rel_error']:.1%}; coefficients {fitted.coefficients}", flush=True)
    del runner, model
    gc.collect()
    return {"model": "tiny Llama (dry run)" if dry else "Llama-2-7B shape, random weights", "config": raw,
            "dtype": str(dtype), "rank": RANK, "slots": SLOTS, "reps": reps, "block_size": BLOCK_SIZE,
            "build_seconds": build_seconds, "seconds": time.perf_counter() - started, "steps": rows,
            "coefficients": fitted.coefficients, "fit_errors": errors}
