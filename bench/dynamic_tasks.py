"""Dynamic task addition on the default model: the paper's Table 4 (full MLGPTQ vs incremental
offline vs incremental online), serving throughput while the requantizer works, and the
quality of the incrementally re-quantized base.

    .venv/bin/python bench/dynamic_tasks.py [--samples 16] [--eval 32] [--window 60] [--ablation]
                                            [--parts full,offline,online,quality]

Base: SmolLM2-135M-Instruct, MLGPTQ 4-bit g128 over sentiment, math and trans-fr (built once,
cached by inlaid.quant.suite); the added task: code. Every quantization runs with 1 thread.

A. full      the driver over all four tasks, in its own process (peak RSS of that process)
B. offline   `inlaid quantize-add` of code onto the 3-task checkpoint, in its own process
C. online    `inlaid serve` (executor 1 thread) under a steady closed-loop load of streamed
             sentiment, math, trans-fr and base requests; code added through the SDK while it
             serves; the requantizer (1 thread, nice 19, SCHED_IDLE, OMP passive) re-quantizes
             meanwhile. On a machine shared with other jobs, throughput before / during / after
             moves with THEIR load, so the cost is measured paired in time: while the job runs,
             the requantizer is alternately left running and stopped (SIGSTOP/SIGCONT) in
             `--interleave`-second windows, and the served tokens/s of running windows are
             compared with those of the stopped windows around them. --ablation repeats it with
             an unthrottled requantizer (2 threads, nice 0, no SCHED_IDLE, no duty cycle).
D. quality   teacher-forced NLL (inlaid.engine.scoring, the serving kernels) of every task's
             eval examples on the float base, the 3-task base, the incremental base and the
             full 4-task base; the incremental - full difference with its paired standard error.

"forward + Hessian" is the true-sequential layer pass (calibration forward and Hessians),
"aggregation + quantization" the aggregation, GPTQ, per-task errors and (incremental) the
decisions; the total also holds loading the model and calibration and writing the result.
Writes bench/results/dynamic_tasks.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report module beside this file
from dynamic_tasks_report import BASE_TASKS, BITS, GROUP, MAX_TOKENS, NEW_TASK, markdown, plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-dynamic-token-0123456789"
EXECUTOR = dict(threads=1, dtype="float32", max_num_seqs=16, num_kv_blocks=512, max_lora_slots=4, max_lora_rank=64)


def _work_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "inlaid" / "bench" / "dynamic_tasks"


def _task(name: str):
    from inlaid.quant.calibration import CalibrationTask

    return CalibrationTask(name, REPO / "adapters" / name, REPO / "inlaid" / "tasks" / "data" / name / "calib.jsonl")


_BASE_GIVEN: list[Path] = []  # --base


def _base_checkpoint(samples: int) -> Path:
    from inlaid.quant.suite import ensure_suite_checkpoint

    if _BASE_GIVEN:
        return _BASE_GIVEN[0]

    return ensure_suite_checkpoint(tasks=list(BASE_TASKS), bits=BITS, group_size=GROUP, calib_samples=samples,
                                   max_tokens=MAX_TOKENS)


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------------------------- A, B
def part_full(args: argparse.Namespace) -> dict:
    import torch

    from inlaid.models.prepare import prepare_default_model
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.methods import parse_method
    from inlaid.quant.spec import QuantSpec

    torch.set_num_threads(1)
    out = _work_dir() / "full"
    shutil.rmtree(out, ignore_errors=True)
    tasks = [_task(name) for name in (*BASE_TASKS, NEW_TASK)]
    started = time.perf_counter()
    report = quantize_model(DriverConfig(
        model_dir=prepare_default_model(quiet=True), tasks=tasks, method=parse_method("mlgptq"),
        spec=QuantSpec(bits=BITS, group_size=GROUP), out_dir=out, max_samples=args.samples, max_tokens=MAX_TOKENS,
        resume=False))
    phases = report.phases
    return {"total_s": time.perf_counter() - started, "quantize_s": phases.get("quantize", 0.0),
            "forward_s": phases.get("forward", 0.0) + phases.get("hessian", 0.0), "phases": phases,
            "peak_rss_gb": _peak_rss_gb(), "checkpoint": str(out)}


def part_offline(args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    from inlaid.models.prepare import prepare_default_model
    from inlaid.quant.checkpoint import HESSIAN_STATE_DIR
    from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings
    from inlaid.quant.incremental_cli import write_incremental_checkpoint

    torch.set_num_threads(1)
    out = _work_dir() / "offline"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    quantizer = IncrementalQuantizer(prepare_default_model(quiet=True), _base_checkpoint(args.samples),
                                     _task(NEW_TASK), IncrementalSettings(), out / HESSIAN_STATE_DIR)
    outcomes = list(tqdm(quantizer.layers(), total=quantizer.num_layers, desc=f"add {NEW_TASK}", unit="layer"))
    write_incremental_checkpoint(quantizer, outcomes, out)
    total = time.perf_counter() - started
    decisions = [d for o in outcomes for d in o.decisions]
    existing = [d.errors_new[t] / d.errors_served[t] for d in decisions if d.errors_new
                for t in d.errors_served if t != NEW_TASK and d.errors_served[t] > 0]
    new = [d.errors_new[NEW_TASK] / d.errors_served[NEW_TASK] for d in decisions if d.errors_new]
    return {"total_s": total, "quantize_s": sum(o.quantize_seconds for o in outcomes),
            "forward_s": sum(o.forward_seconds for o in outcomes), "peak_rss_gb": _peak_rss_gb(),
            "checkpoint": str(out), "actions": {a: sum(d.action == a for d in decisions)
                                                 for a in sorted({d.action for d in decisions})},
            "change": _quantiles([d.change for d in decisions]), "existing_error_ratio": _quantiles(existing),
            "new_error_ratio": _quantiles(new), "layers_changed": sum(o.changed for o in outcomes)}


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p10": pick(0.1), "median": pick(0.5), "p90": pick(0.9), "max": ordered[-1]}


def _child(part: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--part", part, "--samples", str(args.samples), "--eval", str(args.eval)]
    if args.base is not None:
        command += ["--base", str(args.base)]
    done = subprocess.run(command, stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- C
def _prompts() -> list[tuple[str, list[dict]]]:
    prompts = []
    for name in BASE_TASKS:
        with open(REPO / "inlaid" / "tasks" / "data" / name / "eval.jsonl") as handle:
            for line in list(handle)[:8]:
                prompts.append((name, json.loads(line)["messages"]))
    return prompts


async def _online(server, args: argparse.Namespace) -> dict:
    from inlaid.client import AsyncClient

    prompts = _prompts()
    streamed: list[tuple[float, int]] = []  # (arrival, tokens) of every streamed chunk
    stop = asyncio.Event()
    failures: list[str] = []
    requests = 0

    async def worker(client: AsyncClient, index: int) -> None:
        nonlocal requests
        count = index
        while not stop.is_set():
            task, messages = prompts[count % len(prompts)]
            task = None if count % 4 == 3 else task  # a quarter of the load on the base model
            try:
                stream = await client.stream(messages=messages, task=task, max_tokens=32, ignore_eos=True)
                async for chunk in stream:
                    streamed.append((time.monotonic(), len(chunk.token_ids)))
                requests += 1
            except Exception as error:  # counted, reported: the target is zero
                failures.append(f"{type(error).__name__}: {error}")
            count += args.concurrency

    def rate(start: float, end: float) -> float:
        return sum(n for t, n in streamed if start <= t < end) / max(end - start, 1e-9)

    async with AsyncClient(server.address, admin_token=TOKEN, timeout_s=600) as client:
        await client.wait_ready(600)
        workers = [asyncio.create_task(worker(client, i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        steady_from = time.monotonic()
        load_before = os.getloadavg()
        await asyncio.sleep(args.window)
        added_at = time.monotonic()
        await client.add_task(NEW_TASK, str(REPO / "adapters" / NEW_TASK),
                              str(REPO / "inlaid" / "tasks" / "data" / NEW_TASK / "calib.jsonl"))
        status = await client.task_status(NEW_TASK)
        windows: list[tuple[float, float, bool]] = []  # (start, end, requantizer running)
        running = True
        while status.phase in ("queued", "requantizing"):
            opened = time.monotonic()
            await asyncio.sleep(args.interleave)
            windows.append((opened, time.monotonic(), running))
            pids = _children(server.pid, "inlaid.serve.requantizer")
            for pid in pids:
                os.kill(pid, signal.SIGSTOP if running else signal.SIGCONT)
            running = not running if pids else True
            status = await client.task_status(NEW_TASK)
        for pid in _children(server.pid, "inlaid.serve.requantizer"):
            os.kill(pid, signal.SIGCONT)
        ready_at = time.monotonic()
        load_during = os.getloadavg()
        await asyncio.sleep(args.window)
        after_to = time.monotonic()
        stop.set()
        await asyncio.gather(*workers)
        stats = await client.stats()
    on = [(end - start, rate(start, end)) for start, end, running in windows if running]
    off = [(end - start, rate(start, end)) for start, end, running in windows if not running]
    pairs = [rate(a, b) / rate(c, d) for (a, b, r1), (c, d, r2) in zip(windows, windows[1:]) if r1 and not r2
             and rate(c, d) > 0]
    return {
        "paired_ratio": (sum(s * r for s, r in on) / sum(s for s, _ in on)) / (sum(s * r for s, r in off) / sum(s for s, _ in off))
        if on and off else float("nan"),
        "pair_ratios": pairs, "running_s": sum(s for s, _ in on), "stopped_s": sum(s for s, _ in off),
        "steady_tok_s": rate(steady_from, added_at), "during_tok_s": rate(added_at, ready_at),
        "after_tok_s": rate(ready_at, after_to), "requantize_wall_s": ready_at - added_at,
        "forward_s": status.forward_seconds, "quantize_s": status.quantize_seconds,
        "requantizer_peak_rss_gb": status.peak_rss_bytes / 1024**3, "executor_rss_gb": stats.executor_rss_bytes / 1024**3,
        "phase": status.phase, "layers_swapped": status.layers_swapped, "message": status.message,
        "kept": len(status.kept), "failures": failures, "requests": requests,
        "loadavg_before": load_before, "loadavg_during": load_during,
        "timeline": [(t - steady_from, n) for t, n in streamed if t >= steady_from],
        "marks": {"added": added_at - steady_from, "ready": ready_at - steady_from},
        "windows": [(a - steady_from, b - steady_from, r) for a, b, r in windows],
    }


def _children(pid: int, marker: str) -> list[int]:
    """Processes whose parent is `pid` and whose command line holds `marker` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def part_online(args: argparse.Namespace, requantizer: dict, label: str) -> dict:
    from inlaid.models.prepare import prepare_default_model
    from inlaid.serve.launcher import ServerProcess

    state = _work_dir() / f"state-{label}"
    shutil.rmtree(state, ignore_errors=True)
    config = {
        "model": {"dir": str(prepare_default_model(quiet=True)), "quantized_dir": str(_base_checkpoint(args.samples))},
        "executor": EXECUTOR,
        "server": {"admin_token": TOKEN, "state_dir": str(state), "step_timeout_s": 600.0},
        "requantizer": requantizer,
        "tasks": {name: str(REPO / "adapters" / name) for name in BASE_TASKS},
    }
    with ServerProcess(config) as server:
        server.wait_ready(600)
        result = asyncio.run(_online(server, args))
        swaps = [json.loads(line)["ts"] for line in server.logs().splitlines() if '"layer swapped"' in line]
        result["swap_seconds"] = [json.loads(line)["seconds"] for line in server.logs().splitlines()
                                  if '"layer swapped"' in line]
    result["swap_times"] = swaps
    result["state_dir"] = str(state)
    result["requantizer"] = requantizer
    return result


def online_equals_offline(state_dir: str, offline: str) -> bool:
    """The online job's committed layers are the offline run's, tensor for tensor."""
    import torch

    from inlaid.quant.checkpoint import WEIGHTS_FILE
    from inlaid.quant.incremental_linears import read_layer_tensors

    registry = json.loads((Path(state_dir) / "registry.json").read_text())
    for layer, entry in registry["layers"].items():
        ours = read_layer_tensors(Path(entry["file"]), int(layer))
        theirs = read_layer_tensors(Path(offline) / WEIGHTS_FILE, int(layer))
        if any(not torch.equal(ours[key], theirs[key]) for key in theirs):
            return False
    return True


# ---------------------------------------------------------------------------------- D
def part_quality(args: argparse.Namespace) -> dict:
    import torch

    from inlaid.engine.config import EngineConfig
    from inlaid.engine.runner import ModelRunner
    from inlaid.engine.scoring import ScoreRequest, score_continuations
    from inlaid.engine.tokenizer import Tokenizer
    from inlaid.models.prepare import prepare_default_model
    from inlaid.quant.calibration import END_OF_TURN

    torch.set_num_threads(1)
    model_dir = prepare_default_model(quiet=True)
    tokenizer = Tokenizer(model_dir)
    requests: dict[str, list[ScoreRequest]] = {}
    for name in (*BASE_TASKS, NEW_TASK):
        requests[name] = []
        with open(REPO / "inlaid" / "tasks" / "data" / name / "eval.jsonl") as handle:
            for line in list(handle)[: args.eval]:
                example = json.loads(line)
                prompt_text = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True)
                prompt = tokenizer.encode(prompt_text)
                full = tokenizer.encode(prompt_text + example["reference"] + END_OF_TURN)
                if full[: len(prompt)] != prompt or len(full) > 512:
                    continue
                requests[name].append(ScoreRequest(full, len(prompt), (name, str(REPO / "adapters" / name))))
    bases = {"float": None, "3-task": _base_checkpoint(args.samples), "incremental": _work_dir() / "offline",
             "full 4-task": _work_dir() / "full"}
    nll: dict[str, dict[str, list[float]]] = {}
    for label, checkpoint in bases.items():
        runner = ModelRunner(EngineConfig(model_dir=str(model_dir), quantized_dir=str(checkpoint) if checkpoint else None,
                                          **{**EXECUTOR, "num_kv_blocks": 1024}))
        nll[label] = {name: [s.mean_nll for s in score_continuations(runner, reqs)] for name, reqs in requests.items()}
    return {"per_sample_nll": nll, "examples": {name: len(reqs) for name, reqs in requests.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["full", "offline", "quality"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per task")
    parser.add_argument("--eval", type=int, default=32, help="eval examples per task for the NLL")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady (and after) load")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--interleave", type=float, default=10.0,
                        help="seconds per window of the requantizer running / stopped during the job")
    parser.add_argument("--ablation", action="store_true", help="also run an unthrottled requantizer")
    parser.add_argument("--parts", default="full,offline,online,quality",
                        help="which parts to run; the others keep their results from the last run's JSON")
    parser.add_argument("--base", type=Path, default=None,
                        help="an existing 3-task checkpoint (with its Hessian state) to extend instead of the "
                             "cached one (e.g. one built by an earlier quantizer, to rerun only the online part)")
    args = parser.parse_args()
    if args.base is not None:
        if not (args.base / "inlaid_quant.json").is_file():
            parser.error(f"{args.base} is not a checkpoint written by inlaid quantize")
        _BASE_GIVEN.append(args.base)
    if args.part:
        result = {"full": part_full, "offline": part_offline, "quality": part_quality}[args.part](args)
        print(json.dumps(result))
        return 0
    parts = set(args.parts.split(","))
    previous = RESULTS / "dynamic_tasks.json"
    report: dict = json.loads(previous.read_text()) if parts != {"full", "offline", "online", "quality"} else {}
    if report.get("samples", args.samples) != args.samples:
        parser.error(f"the last run used --samples {report['samples']}: run every part to change it")
    report.update({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   "loadavg_start": os.getloadavg(), "samples": args.samples})
    _base_checkpoint(args.samples)  # cached; built here (untimed) if absent
    for part in ("full", "offline"):
        if part in parts:
            report[part] = _child(part, args)
    if "online" in parts:
        # An earlier run's ablation is kept unless it is run again.
        kept = {} if args.ablation else {k: v for k, v in report.get("online", {}).items() if k != "default"}
        from inlaid.serve.config_sections import RequantizerSettings

        settings = RequantizerSettings()  # named so the table says what ran
        defaults = {"duty_cycle": settings.duty_cycle, "idle_duty_cycle": settings.idle_duty_cycle}
        report["online"] = {"default": part_online(args, defaults, "default"), **kept}
        if "offline" in parts:  # an earlier run's offline checkpoint may extend another base
            report["online_equals_offline"] = online_equals_offline(report["online"]["default"]["state_dir"],
                                                                    report["offline"]["checkpoint"])
        else:
            report.pop("online_equals_offline", None)
        if args.ablation:
            report["online"]["unthrottled"] = part_online(
                args, {"threads": 2, "niceness": 0, "idle_priority": False, "duty_cycle": 1.0}, "unthrottled")
    if "quality" in parts:
        report["quality"] = _child("quality", args)
    report["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamic_tasks.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "dynamic_tasks.md").write_text(markdown(report))
    plot(report, RESULTS / "dynamic_tasks.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
