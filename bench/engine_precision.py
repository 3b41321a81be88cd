"""Decode speed by the base's precision: fp32, bf16 and 4-bit base weights (with the native int4
kernel, and with torch's int4 kernel as before it), at batch 1 / 4 / 16 / 64 over the nine committed task adapters (ranks 8-64 on every projection,
mixed in every step), and where a decode step's time goes. Part 2 of bench/engine_cpu.py.

The 4-bit base is the cached MLGPTQ suite checkpoint when `make run` has built it, else an
RTN 4-bit g128 checkpoint `inlaid quantize --method rtn` writes to a temporary directory:
the same format, layers and kernels (the values do not change how long a matmul takes).

Each (precision, batch) runs `rounds` generations of NEW_TOKENS tokens per request, EOS
ignored; the figure is the median decode step (every request decoding one token) in wall
time and in the process's CPU time. With one thread (the server's executor runs one), the
CPU time is the work itself: on a machine shared with other jobs it is the stable figure.

    .venv/bin/python bench/engine_precision.py [--rounds 3] [--threads 1]   # bench/results/engine_precision.*
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCHES = (1, 4, 16, 64)
NEW_TOKENS = 24
PROFILED_BATCHES = (16, 64)
PRECISIONS: dict[str, dict] = {  # label -> EngineConfig fields ("quantized": use the 4-bit checkpoint)
    "fp32": {},
    "bf16 weights": {"weight_dtype": "bfloat16"},
    "4-bit, bf16 embedding/head": {"quantized": True, "weight_dtype": "bfloat16"},
    # The same engine with torch's int4 kernel below the bf16 route, as before the native kernel
    "4-bit without the native int4 kernel": {"quantized": True, "weight_dtype": "bfloat16", "native": False},
}
REPO = Path(__file__).resolve().parent.parent


def _four_bit_checkpoint(model_dir: Path, scratch: Path) -> tuple[Path, str]:
    from inlaid.quant.suite import is_complete, suite_checkpoint_dir

    suite = suite_checkpoint_dir(model_dir)
    if is_complete(suite):
        return suite, f"MLGPTQ suite checkpoint {suite.name}"
    from inlaid.cli import main as cli

    out = scratch / "rtn4"
    if cli(["quantize", "--model", str(model_dir), "--method", "rtn", "--out", str(out)]) != 0:
        raise RuntimeError("inlaid quantize --method rtn failed")
    return out, "RTN 4-bit g128 (same format and kernels as the MLGPTQ suite checkpoint)"


def _without_native_kernel(engine) -> None:
    """Route every int4 projection as the engine did before kernels/int4_native.c: torch's
    int4 kernel below the bf16 route, which starts at DENSE_MIN_ROWS."""
    from inlaid.engine.lora import LoraLinear
    from inlaid.kernels import quant_cpu

    for module in engine.runner.model.modules():
        for prepared in (module.quantized or []) if isinstance(module, LoraLinear) else []:
            if prepared.kind == "int4":
                prepared.native_min_m = sys.maxsize
                prepared.dense_min_m = min(prepared.dense_min_m, quant_cpu.DENSE_MIN_ROWS)


def _prompts(engine, batch: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    return [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a short paragraph about topic number {i}."}])) for i in range(batch)]


def _decode_steps(engine, prompt_ids: list[list[int]], adapters: list[str]) -> list[tuple[float, float]]:
    """(wall s, CPU s) of every step in which all requests decode one token."""
    from inlaid.engine import SamplingParams

    for prompt, adapter in zip(prompt_ids, adapters):
        engine.add_request(prompt, sampling=SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), adapter=adapter)
    steps = []
    while engine.has_unfinished():
        plan = engine.begin_step()
        wall, cpu = time.perf_counter(), time.process_time()
        result = engine.runner.execute(plan)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        engine.finish_step(result)
        if len(plan.chunks) == len(prompt_ids) and all(len(c.token_ids) == 1 for c in plan.chunks):
            steps.append((wall, cpu))
    return steps


class _CpuRegions:
    """CPU time (this thread's, so other jobs on the machine do not count) spent in the
    projections, their separate LoRA kernels, attention and the head, patched in for the
    measured steps and restored after."""

    def __init__(self, engine) -> None:
        import inlaid.engine.lora as lora_module
        import inlaid.engine.model as model_module

        self.seconds = {"projections": 0.0, "lora": 0.0, "attention": 0.0, "lm_head": 0.0}
        self.in_attention = 0.0  # projection time spent inside attention modules
        self._attention_depth = 0
        self._restore = [
            (lora_module.LoraLinear, "forward", lora_module.LoraLinear.forward),
            (lora_module, "lora_apply", lora_module.lora_apply),
            (model_module.Attention, "forward", model_module.Attention.forward),
        ]
        self._model = engine.runner.model
        lora_module.LoraLinear.forward = self._timed(lora_module.LoraLinear.forward, "projections")
        lora_module.lora_apply = self._timed(lora_module.lora_apply, "lora")
        model_module.Attention.forward = self._timed(model_module.Attention.forward, "attention")
        self._model.logits = self._timed(self._model.logits, "lm_head")

    def _timed(self, function, part: str):
        def timed(*args, **kwargs):
            if part == "attention":
                self._attention_depth += 1
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.thread_time() - started
                self.seconds[part] += spent
                if part == "attention":
                    self._attention_depth -= 1
                elif part == "projections" and self._attention_depth:
                    self.in_attention += spent
        return timed

    def restore(self) -> None:
        for owner, name, original in self._restore:
            setattr(owner, name, original)
        del self._model.logits


def _profile_steps(engine, prompt_ids: list[list[int]], adapters: list[str]) -> dict[str, float]:
    """CPU ms per decode step by part, averaged over the decode steps of a short generation
    (one thread: the thread's CPU time is the step's)."""
    from inlaid.engine import SamplingParams

    for prompt, adapter in zip(prompt_ids, adapters):
        engine.add_request(prompt, sampling=SamplingParams(max_tokens=8, ignore_eos=True), adapter=adapter)
    regions, steps, step_seconds, counting = None, 0, 0.0, True
    while engine.has_unfinished():
        plan = engine.begin_step()
        decode = len(plan.chunks) == len(prompt_ids) and all(len(c.token_ids) == 1 for c in plan.chunks)
        if decode and regions is None:
            regions = _CpuRegions(engine)
        elif not decode and regions is not None and counting:
            # Only steps where every request decodes count: once one has finished (or the
            # batch no longer fits a step), the profile ends and the rest just runs out.
            regions.restore()
            counting = False
        started = time.thread_time()
        result = engine.runner.execute(plan)
        if decode and counting:
            step_seconds += time.thread_time() - started
            steps += 1
        engine.finish_step(result)
    if regions is None or steps == 0:
        raise RuntimeError(f"no step decoded all {len(prompt_ids)} requests at once (does the batch fit one step?)")
    if counting:
        regions.restore()
    spent = {part: 1e3 * seconds / steps for part, seconds in regions.seconds.items()}
    step = 1e3 * step_seconds / steps
    attention = spent["attention"] - 1e3 * regions.in_attention / steps
    projections = spent["projections"] - spent["lora"]
    return {"step": step, "base projections": projections, "LoRA (separate kernels)": spent["lora"],
            "attention": attention, "lm_head": spent["lm_head"],
            "other": step - spent["projections"] - attention - spent["lm_head"]}


def precision_sweep(rounds: int, threads: int, plot_path: Path | None = None) -> tuple[dict, str]:
    from inlaid.engine import Engine, EngineConfig
    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.models.prepare import prepare_default_model

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model_dir = prepare_default_model(quiet=True)
    adapters = {p.name: p for p in sorted((REPO / "adapters").iterdir()) if (p / "adapter_config.json").is_file()}
    names = list(adapters)
    max_rank = max(read_adapter_spec(n, str(p)).rank for n, p in adapters.items())
    results: dict = {"threads": threads, "new_tokens": NEW_TOKENS, "rounds": rounds, "adapters": len(names),
                     "max_rank": max_rank, "decode": {}, "profile": {}}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, results["four_bit_checkpoint"] = _four_bit_checkpoint(model_dir, Path(scratch))
        # One engine at a time (memory): rounds of one precision run back to back, so this
        # part leans on the CPU-time figures where the machine's load drifts.
        for label, fields in PRECISIONS.items():
            fields = dict(fields)
            quantized = fields.pop("quantized", False)
            native = fields.pop("native", True)
            engine = Engine.local(EngineConfig(
                model_dir=str(model_dir), quantized_dir=str(checkpoint) if quantized else None,
                max_lora_slots=len(names), max_lora_rank=max_rank, num_kv_blocks=64 * 5, **fields))
            if not native:
                _without_native_kernel(engine)
            for name, path in adapters.items():
                engine.register_adapter(name, str(path))
            results["decode"][label], results["profile"][label] = {}, {}
            for batch in BATCHES:
                prompt_ids = _prompts(engine, batch)
                chosen = [names[i % len(names)] for i in range(batch)]
                _decode_steps(engine, prompt_ids[: min(batch, 2)], chosen[:2])  # warm-up (packs, slot loads)
                steps = [step for _ in range(rounds) for step in _decode_steps(engine, prompt_ids, chosen)]
                wall = statistics.median(s[0] for s in steps)
                cpu = statistics.median(s[1] for s in steps)
                results["decode"][label][batch] = {"step_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu,
                                                   "tokens_per_s": batch / wall, "tokens_per_cpu_s": batch / cpu}
                print(f"{label}, batch {batch}: decode step {1e3 * wall:.1f} ms wall, {1e3 * cpu:.1f} ms CPU", flush=True)
                if batch in PROFILED_BATCHES:
                    results["profile"][label][batch] = _profile_steps(engine, prompt_ids, chosen)
            del engine
    torch.set_num_threads(previous_threads)
    if plot_path is not None:
        _plot(results, plot_path)
    return results, _markdown(results)


def _markdown(results: dict) -> str:
    labels = list(results["decode"])
    lines = [
        "# Decode speed by base precision (CPU)",
        "",
        f"{results['adapters']} committed task adapters (ranks up to {results['max_rank']}, all projections) mixed "
        f"in every step, {results['new_tokens']} new tokens per request, {results['threads']} torch thread(s), "
        f"median decode step of {results['rounds']} rounds. 4-bit base: {results['four_bit_checkpoint']}.",
        "",
        "Decode tokens/s by CPU time (the stable figure on a shared machine) and, in brackets, by wall time:",
        "",
        "| batch | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for batch in BATCHES:
        cells = [f"{results['decode'][l][batch]['tokens_per_cpu_s']:.1f} ({results['decode'][l][batch]['tokens_per_s']:.1f})"
                 for l in labels]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    for batch in PROFILED_BATCHES:
        parts = list(next(iter(results["profile"].values()))[batch])
        lines += ["", f"Where a decode step's CPU time goes at batch {batch} (ms per step, mean over the steps where every request decodes):", "",
                  "| part | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for part in parts:
            lines.append(f"| {part} | " + " | ".join(f"{results['profile'][l][batch][part]:.1f}" for l in labels) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for label, by_batch in results["decode"].items():
        axis.plot(list(BATCHES), [by_batch[b]["tokens_per_cpu_s"] for b in BATCHES], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(BATCHES), [str(b) for b in BATCHES])
    axis.set_xlabel("batch (requests decoding together)")
    axis.set_ylabel("decode tokens per CPU second")
    axis.set_title(f"Decode speed by base precision, {results['adapters']} adapters, {results['threads']} thread(s)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import json
    import os

    results_dir = Path(__file__).resolve().parent / "results"
    load_before = os.getloadavg()
    results, table = precision_sweep(args.rounds, args.threads, results_dir / "engine_precision.png")
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    table += (f"\nMachine load (1/5/15-min averages) before {', '.join(f'{x:.1f}' for x in load_before)}, after "
              f"{', '.join(f'{x:.1f}' for x in results['load_average']['after'])} (2 cores, shared).\n")
    (results_dir / "engine_precision.json").write_text(json.dumps(results, indent=1, default=str))
    (results_dir / "engine_precision.md").write_text(table)
    print(table)


if __name__ == "__main__":
    run(sys.argv[1:])
