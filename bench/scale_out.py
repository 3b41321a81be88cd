"""Throughput of one vs two executors under one coordinator on the same trace, and a
simulator's prediction for N devices.

`python bench/scale_out.py` (about 5-10 minutes on the 2-core box) runs a mixed-task burst
(Zipf task popularity over four committed adapters and the base model, fixed output lengths)
through a real `inlaid serve` three times -- one executor with 1 thread, one executor with
2 threads (the same two cores as two executors), two executors with 1 thread each -- and
reports generated tokens per second, per-executor tasks, adapter hit rates, moves and the
longest queue wait per task. The simulator then replays the same trace on N independent
devices with the coordinator's own placement (ExecutorPool) and engines, each step costing
`a + b * tokens` as fitted on the one-executor run's own steps; it predicts what N devices
would give where each really has its own compute -- which two executors on two shared cores
do not. Results: bench/results/scale_out.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ADAPTERS = ROOT / "adapters"
TASKS = ["sentiment", "qa", "math", "trans-es", None]
ZIPF = [0.45, 0.25, 0.12, 0.06, 0.12]  # hot .. rare, then the base model
PROMPTS = ["Summarize: the meeting moved to Tuesday because the room was booked.",
           "What is the capital of Italy?", "A farmer has 12 cows and buys 7 more. How many cows?",
           "Translate to Spanish: The weather is nice today.", "Write one sentence about the sea.",
           "Review: the film was long but the acting was superb.", "List three colours.",
           "Explain why the sky is blue in one sentence."]  # fmt: skip
LENGTHS = [16, 24, 32, 48]
SEATS = 16  # max_num_seqs per executor
SETUPS = [("1 executor, 1 thread", 1, 1), ("1 executor, 2 threads", 1, 2), ("2 executors, 1 thread each", 2, 1)]


def make_trace(count: int, seed: int = 18) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(PROMPTS), "task": rng.choices(TASKS, ZIPF)[0], "max_tokens": rng.choice(LENGTHS)}
            for _ in range(count)]


def executor_settings(threads: int) -> dict[str, Any]:
    return {"threads": threads, "max_num_seqs": SEATS, "num_kv_blocks": 1024, "max_lora_slots": 2,
            "max_lora_rank": 16, "max_model_len": 512}


# ---------------------------------------------------------------- measured: a real server
def measure(trace: list[dict[str, Any]], executors: int, threads: int) -> dict[str, Any]:
    from inlaid.client import AsyncClient
    from inlaid.serve.launcher import ServerProcess

    config = {"executor": executor_settings(threads), "executors": {"count": executors},
              "server": {"log_level": "WARNING", "max_pending_requests": 4096},
              "tasks": {t: str(ADAPTERS / t) for t in TASKS if t is not None}}

    async def run(address: str) -> tuple[float, list[Any], Any]:
        async with AsyncClient(address, timeout_s=3600) as client:
            started = time.perf_counter()
            results = await asyncio.gather(*(client.generate(r["prompt"], task=r["task"], max_tokens=r["max_tokens"],
                                                             ignore_eos=True) for r in trace))
            return time.perf_counter() - started, results, await client.stats()

    with ServerProcess(config) as server:
        server.wait_ready(timeout_s=600)
        seconds, results, stats = asyncio.run(run(server.address))
    tokens = sum(len(r.token_ids) for r in results)
    waits: dict[str, float] = {}
    for request, result in zip(trace, results):
        label = request["task"] or "__base__"
        waits[label] = max(waits.get(label, 0.0), result.queue_seconds)
    return {
        "executors": executors, "threads": threads, "seconds": seconds, "tokens": tokens,
        "tokens_per_second": tokens / seconds, "mean_compute_seconds": stats.mean_compute_seconds,
        "max_queue_seconds_by_task": waits,
        "per_executor": [{"index": e.index, "tasks_served": e.tasks_served, "moved_in": e.moved_in,
                          "adapter_admissions": e.adapter_admissions, "adapter_hits": e.adapter_hits}
                         for e in stats.executors],
    }  # fmt: skip


# ---------------------------------------------------------------- the cost of a step
def fit_step_cost(trace: list[dict[str, Any]], threads: int = 1) -> dict[str, float]:
    """Run the trace in-process, time every step, fit seconds = a + b * tokens (least squares)."""
    import numpy as np

    from inlaid.engine import Engine, EngineConfig, SamplingParams
    from inlaid.models.prepare import default_model_dir

    engine = Engine.local(EngineConfig(model_dir=str(default_model_dir()), **executor_settings(threads)))
    for task in TASKS:
        if task is not None:
            engine.register_adapter(task, str(ADAPTERS / task))
    runner = engine.runner
    assert runner is not None
    samples: list[tuple[int, float]] = []
    execute = runner.execute

    def timed(plan):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = execute(plan)
        samples.append((result.num_tokens, time.perf_counter() - started))
        return result

    runner.execute = timed  # type: ignore[method-assign]
    engine.generate([r["prompt"] for r in trace],
                    [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True) for r in trace],
                    [r["task"] for r in trace])
    tokens = np.array([s[0] for s in samples], dtype=float)
    seconds = np.array([s[1] for s in samples])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(tokens), tokens], axis=1), seconds, rcond=None)
    predicted = a + b * tokens
    return {"a_seconds": float(a), "b_seconds_per_token": float(b), "steps": len(samples),
            "median_abs_error": float(np.median(np.abs(predicted - seconds) / seconds))}


# ---------------------------------------------------------------- predicted: N devices
class _Up:
    class _Event:
        def is_set(self) -> bool:
            return True

    ready = _Event()


def simulate(trace: list[dict[str, Any]], devices: int, cost: dict[str, float]) -> dict[str, Any]:
    """The coordinator's placement and engines over N devices that each really compute in
    parallel; a step costs the fitted a + b * tokens. A discrete-event replay."""
    from inlaid.models.prepare import default_model_dir
    from inlaid.protocol import SampledToken, SamplingParams, StepResult
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.requests import ActiveRequest

    config = config_from_dict({"model": {"dir": str(default_model_dir())}, "executor": executor_settings(1),
                               "executors": {"count": devices}})
    pool = ExecutorPool(config, lambda: None)
    for shard in pool.shards:
        shard.supervisor = _Up()  # type: ignore[assignment]
        for task in TASKS:
            if task is not None:
                shard.engine.register_adapter(task, str(ADAPTERS / task))
    tokenizer = pool.engines[0].tokenizer
    requests: dict[str, ActiveRequest] = {}
    for i, request in enumerate(trace):
        ids = tokenizer.encode(request["prompt"])
        shard = pool.choose(request["task"], len(ids), requests)
        engine_id = f"r{i}"
        shard.engine.add_request(ids, sampling=SamplingParams(max_tokens=request["max_tokens"], ignore_eos=True),
                                 adapter=request["task"], request_id=engine_id)
        requests[engine_id] = ActiveRequest(key=(b"", engine_id), engine_id=engine_id,
                                            seq_id=shard.engine.sequence(engine_id).seq_id, task=request["task"],
                                            stream=False, num_prompt_tokens=len(ids), received_at=0.0,
                                            executor=shard.index)
    clock = [0.0] * devices  # when each device is next free
    tokens = 0
    idle_plans = 0
    while any(shard.engine.has_unfinished() for shard in pool.shards):
        busy = [s for s in pool.shards if s.engine.has_unfinished()]
        shard = min(busy, key=lambda s: clock[s.index])
        now = clock[shard.index]
        plan = shard.engine.begin_step()
        if plan is None:  # nothing admissible here now: wait one step's overhead
            idle_plans += 1
            if idle_plans > 100_000:
                raise RuntimeError("the simulation stopped making progress")
            clock[shard.index] += cost["a_seconds"]
            continue
        shard.count_admissions(plan)
        num_tokens = sum(len(chunk.token_ids) for chunk in plan.chunks)
        clock[shard.index] += cost["a_seconds"] + cost["b_seconds_per_token"] * num_tokens
        sampled = [SampledToken(seq_id=c.seq_id, token_id=42) for c in plan.chunks if c.sample]
        outputs = shard.engine.finish_step(StepResult(step_id=plan.step_id, sampled=sampled, num_tokens=num_tokens,
                                                      compute_seconds=0.0))
        tokens += len(sampled)
        for output in outputs:
            if output.finished:
                requests.pop(output.request_id, None)
        pool.rebalance(requests)
        for other in pool.shards:  # a device that was idle starts on moved work now, not in the past
            if other.engine.has_unfinished() and clock[other.index] < now:
                clock[other.index] = now
    makespan = max(clock)
    return {"devices": devices, "seconds": makespan, "tokens": tokens, "tokens_per_second": tokens / makespan,
            "adapter_hit_rate": sum(s.affinity_hits for s in pool.shards) / max(1, sum(s.admissions
                                                                                       for s in pool.shards)),
            "moved": sum(s.moved_in for s in pool.shards)}


# ---------------------------------------------------------------- report
def write_report(report: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_out.json").write_text(json.dumps(report, indent=1))
    measured, predicted = report["measured"], report["predicted"]
    lines = ["# Scale-out: one vs two executors, and N devices predicted", "",
             f"Trace: {report['requests']} requests at once, tasks {report['task_mix']}, output lengths "
             f"{LENGTHS} tokens (ignore_eos), SmolLM2-135M fp32 on the CPU, {SEATS} seats per executor. "
             f"Machine: {os.cpu_count()} cores, load average before/after {report['load_before']} / "
             f"{report['load_after']} (shared with other jobs). Command: `python bench/scale_out.py`.", "",
             "## Measured (real `inlaid serve`, one coordinator)", "",
             "| setup | tokens/s | vs 1 executor, 1 thread | seconds | adapter hits / admissions | moved | "
             "longest queue wait per task (s) |", "|---|---|---|---|---|---|---|"]
    base = measured[0]["tokens_per_second"]
    for name, run in zip([s[0] for s in SETUPS], measured):
        hits = sum(e["adapter_hits"] for e in run["per_executor"])
        admissions = sum(e["adapter_admissions"] for e in run["per_executor"])
        moved = sum(e["moved_in"] for e in run["per_executor"])
        waits = ", ".join(f"{k} {v:.1f}" for k, v in sorted(run["max_queue_seconds_by_task"].items()))
        lines.append(f"| {name} | {run['tokens_per_second']:.1f} | {run['tokens_per_second'] / base:.2f}x | "
                     f"{run['seconds']:.1f} | {hits}/{admissions} | {moved} | {waits} |")
    two = measured[-1]
    lines += ["", "Tasks per executor (two executors): " + "; ".join(
        f"executor {e['index']}: " + ", ".join(f"{k} {v}" for k, v in sorted(e["tasks_served"].items()))
        for e in two["per_executor"]), ""]
    cost = report["step_cost"]
    lines += ["## Predicted (simulator: the coordinator's placement and engines, N devices with their own compute)",
              "", f"Step cost fitted on {cost['steps']} in-process steps of the same trace: "
              f"{cost['a_seconds'] * 1000:.1f} ms + {cost['b_seconds_per_token'] * 1000:.2f} ms x tokens "
              f"(median error {cost['median_abs_error']:.0%}).", "",
              "| devices | tokens/s | vs 1 device | adapter hit rate | moved |", "|---|---|---|---|---|"]
    for run in predicted:
        lines.append(f"| {run['devices']} | {run['tokens_per_second']:.1f} | "
                     f"{run['tokens_per_second'] / predicted[0]['tokens_per_second']:.2f}x | "
                     f"{run['adapter_hit_rate']:.2f} | {run['moved']} |")
    check = predicted[0]["tokens_per_second"] / base - 1
    lines += ["", f"The one-device prediction is {check:+.0%} off the measured one-executor run (the check on the "
              "cost model). Beyond a few devices a burst of this size gives each device small batches, where the "
              "fixed part of a step dominates: more requests (`--requests`) keep the curve closer to linear.",
              "", "On this box two executors share two cores with each other and with everything else running, so "
              "the measured ratio is bounded by cores (and by the load), not by the coordinator; the prediction "
              "assumes each device computes on its own, as GPUs do.", ""]
    (RESULTS / "scale_out.md").write_text("\n".join(lines))
    _plot(report)


def _plot(report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [s[0].replace(", ", "\n") for s in SETUPS]
    left.bar(names, [r["tokens_per_second"] for r in report["measured"]], color=["#888", "#aaa", "#3a7"])
    left.set_ylabel("generated tokens / s")
    left.set_title(f"measured on {os.cpu_count()} shared cores (load {report['load_before']})")
    devices = [r["devices"] for r in report["predicted"]]
    right.plot(devices, [r["tokens_per_second"] for r in report["predicted"]], "o-", label="simulated")
    right.plot(devices, [report["predicted"][0]["tokens_per_second"] * d for d in devices], ":", label="linear")
    right.set_xlabel("devices (executors)")
    right.set_ylabel("generated tokens / s")
    right.set_title("predicted, one device per executor")
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_out.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="simulated device counts")
    parser.add_argument("--render", action="store_true", help="rewrite the report from the saved JSON only")
    args = parser.parse_args(argv if argv is not None else [])
    if args.render:
        write_report(json.loads((RESULTS / "scale_out.json").read_text()))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trace = make_trace(args.requests)
    load_before = round(os.getloadavg()[0], 1)
    measured = []
    for name, executors, threads in SETUPS:
        print(f"measuring: {name}", flush=True)
        measured.append(measure(trace, executors, threads))
        print(f"  {measured[-1]['tokens_per_second']:.1f} tokens/s", flush=True)
    print("fitting the step cost (in-process run of the trace)", flush=True)
    cost = fit_step_cost(trace)
    predicted = [simulate(trace, devices, cost) for devices in args.devices]
    mix = {str(t or "base"): p for t, p in zip(TASKS, ZIPF)}
    write_report({"requests": len(trace), "task_mix": mix, "load_before": load_before,
                  "load_after": round(os.getloadavg()[0], 1), "measured": measured, "step_cost": cost,
                  "predicted": predicted})
    print((RESULTS / "scale_out.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
