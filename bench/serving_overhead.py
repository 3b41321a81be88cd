"""Serving overhead: what the coordinator costs per step, against the executor's compute.

    .venv/bin/python bench/serving_overhead.py [--quick] [--batch 64] [--threads 1]

A. Transport, step by step. The coordinator's own classes (a torch-free `Engine` with no
   runner + `ExecutorSupervisor`) drive a real executor process over ipc, uvloop, as in
   `inlaid serve`. For every decode step at the full batch: the round trip (plan encoded
   and sent -> result received and decoded) against the executor's own compute time.
   Round trip minus compute = msgspec + ZeroMQ + the executor loop + event-loop wake-ups.
   Planning (begin_step + finish_step, detokenization included) is timed separately.
B. End to end. A full `inlaid serve` process, `batch` concurrent streaming SDK clients;
   from the server's stats: mean round trip, mean compute, and the coordinator's gap
   between a result and the next plan (applying it, streaming text, planning).

Target: coordinator overhead <= 3% of the step time at batch 64 on the CPU model.
Writes bench/results/serving_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.models.prepare import prepare_default_model
from inlaid.protocol import BatchPlan, SampledToken, StepResult
from inlaid.serve.supervisor import ExecutorSupervisor

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_PERCENT = 3.0
PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "List three colours:",
    "Q: What is 12 times 7?\nA:", "Once upon a time, in a small village,", "Summarize: the storm delayed us.",
    "In 1905, Albert Einstein published",
]


def _prompts(batch: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(batch)]


async def _transport(config: EngineConfig, batch: int, new_tokens: int) -> dict:
    engine = Engine(config)  # no runner: coordinator mode, no torch here
    lost: list[str] = []
    workdir = tempfile.mkdtemp(prefix="inlaid-bench-")
    supervisor = ExecutorSupervisor(config, f"ipc://{workdir}/executor.ipc", on_lost=lost.append,
                                    on_fatal=lost.append, log_format="text", log_level="WARNING")
    await supervisor.start()
    await asyncio.wait_for(supervisor.ready.wait(), 600)
    sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for prompt in _prompts(batch):
        engine.add_request(prompt, sampling=sampling)
    steps = []
    while engine.has_unfinished():
        started = time.perf_counter()
        plan = engine.begin_step()
        planned = time.perf_counter()
        assert plan is not None
        result = await supervisor.execute(plan)
        applied_at = time.perf_counter()
        engine.finish_step(result)
        finished = time.perf_counter()
        timing = supervisor.timings[-1]
        steps.append({
            "batch": len(plan.chunks),
            "tokens": sum(len(c.token_ids) for c in plan.chunks),
            "round_trip_s": timing.round_trip_seconds,
            "compute_s": timing.compute_seconds,
            "plan_s": planned - started,
            "apply_s": finished - applied_at,
        })
    await supervisor.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    if lost:
        raise RuntimeError(f"executor trouble during the benchmark: {lost}")
    decode = [s for s in steps if s["batch"] == batch and s["tokens"] == batch]
    if not decode:
        raise RuntimeError("no full-batch decode step was measured; raise max_num_seqs / the token budget")
    med = statistics.median
    round_trip = med(s["round_trip_s"] for s in decode)
    compute = med(s["compute_s"] for s in decode)
    transport = med(s["round_trip_s"] - s["compute_s"] for s in decode)
    planning = med(s["plan_s"] + s["apply_s"] for s in decode)
    return {
        "decode_steps": len(decode),
        "median_compute_ms": compute * 1e3,
        "median_round_trip_ms": round_trip * 1e3,
        "median_transport_overhead_ms": transport * 1e3,
        "median_planning_ms": planning * 1e3,
        "transport_percent_of_step": 100 * transport / round_trip,
        "coordinator_percent_of_step": 100 * (transport + planning) / (round_trip + planning),
    }


def _codec(batch: int) -> dict:
    """msgspec alone: a batch-`batch` decode plan and its result, encode + decode."""
    from inlaid.protocol import ChunkPlan, ExecutorInbound, ExecutorOutbound

    sampling = SamplingParams(max_tokens=64)
    plan = BatchPlan(step_id=1, chunks=[
        ChunkPlan(seq_id=i, token_ids=[100 + i], start_pos=40, block_table=list(range(i * 4, i * 4 + 4)),
                  adapter_slot=i % 4, sample=True, sampling=sampling, num_generated=20) for i in range(batch)])
    result = StepResult(step_id=1, sampled=[SampledToken(seq_id=i, token_id=7) for i in range(batch)],
                        num_tokens=batch, compute_seconds=0.1)
    encoder = msgspec.msgpack.Encoder()
    inbound, outbound = msgspec.msgpack.Decoder(ExecutorInbound), msgspec.msgpack.Decoder(ExecutorOutbound)
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        inbound.decode(encoder.encode(plan))
        outbound.decode(encoder.encode(result))
    return {"plan_bytes": len(encoder.encode(plan)), "result_bytes": len(encoder.encode(result)),
            "codec_us_per_step": (time.perf_counter() - started) / rounds * 1e6}


def _end_to_end(model_dir: Path, executor: dict, batch: int, new_tokens: int) -> dict:
    from inlaid.client import AsyncClient
    from inlaid.serve.launcher import ServerProcess

    with ServerProcess({"model": {"dir": str(model_dir)}, "executor": executor,
                        "server": {"log_level": "WARNING"}}) as server:
        server.wait_ready(600)

        async def run() -> object:
            async with AsyncClient(server.address, timeout_s=600) as client:
                async def one(prompt: str) -> int:
                    stream = await client.stream(prompt, max_tokens=new_tokens, ignore_eos=True)
                    return sum([len(chunk.token_ids) async for chunk in stream])

                counts = await asyncio.gather(*(one(p) for p in _prompts(batch)))
                assert all(c == new_tokens for c in counts), counts
                return await client.stats()

        stats = asyncio.run(run())
    round_trip, compute, gap = stats.mean_step_seconds, stats.mean_compute_seconds, stats.mean_step_gap_seconds
    return {
        "steps": stats.steps,
        "mean_round_trip_ms": round_trip * 1e3,
        "mean_compute_ms": compute * 1e3,
        "mean_gap_ms": gap * 1e3,
        "coordinator_percent_of_step": 100 * (round_trip - compute + gap) / (round_trip + gap),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="executor torch threads")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, skip the end-to-end part")
    args = parser.parse_args(argv)
    new_tokens = 16 if args.quick else args.new_tokens
    model_dir = prepare_default_model(quiet=True)
    executor = dict(dtype="float32", threads=args.threads, max_num_seqs=args.batch, num_kv_blocks=1024,
                    max_num_batched_tokens=4096)
    config = EngineConfig(model_dir=str(model_dir), **executor)

    try:
        import uvloop
        transport = uvloop.run(_transport(config, args.batch, new_tokens))
    except ImportError:
        transport = asyncio.run(_transport(config, args.batch, new_tokens))
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "batch": args.batch, "new_tokens": new_tokens, "executor_threads": args.threads,
        "transport": transport, "codec": _codec(args.batch),
    }
    if not args.quick:
        report["end_to_end"] = _end_to_end(model_dir, executor, args.batch, new_tokens)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_overhead.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Serving overhead (batch {args.batch}, SmolLM2-135M fp32, CPU, executor threads {args.threads})", "",
        "| measure | value |", "|---|---|",
        f"| decode steps measured | {transport['decode_steps']} |",
        f"| executor compute per step (median) | {transport['median_compute_ms']:.2f} ms |",
        f"| round trip per step (median) | {transport['median_round_trip_ms']:.2f} ms |",
        f"| transport overhead (round trip - compute, median) | {transport['median_transport_overhead_ms']:.3f} ms "
        f"({transport['transport_percent_of_step']:.2f}% of the step) |",
        f"| coordinator planning + applying (median) | {transport['median_planning_ms']:.3f} ms |",
        f"| **coordinator total, % of step** | **{transport['coordinator_percent_of_step']:.2f}%** "
        f"(target <= {TARGET_PERCENT}%) |",
        f"| msgspec encode+decode, plan + result | {report['codec']['codec_us_per_step']:.1f} us "
        f"({report['codec']['plan_bytes']} + {report['codec']['result_bytes']} bytes) |",
    ]
    if "end_to_end" in report:
        e2e = report["end_to_end"]
        lines += [
            f"| end to end ({e2e['steps']} steps, {args.batch} streaming clients): round trip / compute / gap "
            f"| {e2e['mean_round_trip_ms']:.2f} / {e2e['mean_compute_ms']:.2f} / {e2e['mean_gap_ms']:.3f} ms |",
            f"| **end to end coordinator share** | **{e2e['coordinator_percent_of_step']:.2f}%** |",
        ]
    lines += ["", "Reproduce: `.venv/bin/python bench/serving_overhead.py`", ""]
    (RESULTS / "serving_overhead.md").write_text("\n".join(lines))
    print("\n".join(lines))
    worst = max(transport["coordinator_percent_of_step"], report.get("end_to_end", {}).get("coordinator_percent_of_step", 0))
    print(f"{'PASS' if worst <= TARGET_PERCENT else 'ABOVE TARGET'}: worst coordinator share {worst:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
