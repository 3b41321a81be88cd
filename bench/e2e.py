"""End-to-end: one workload trace replayed against transformers + PEFT and three Inlaid setups.

    .venv/bin/python bench/e2e.py [--quick] [--out DIR] [--threads 1]     # or: make bench [QUICK=1]

Systems, all on this machine in one run, with the same executor threads and batch cap:
  hf-peft             transformers + PEFT server (bench/baselines/hf_peft_server.py), fp32
  inlaid-fp32-fifo    `inlaid serve`, fp32 base, FIFO
  inlaid-4bit-fifo    `inlaid serve`, the MLGPTQ 4-bit suite base (inlaid.quant.suite), FIFO
  inlaid-4bit-inlaid  the same base, the `inlaid` multi-task policy (its length predictor
                      starts from a state fitted on the suite's calib split, as a deployed
                      server starts from its saved state)
Workloads: 9 tasks (the suite's adapters) and 100 tasks (the suite's adapters replicated
under new names with perturbed weights, written to a temp dir, served from the 9-task 4-bit
base), Zipf and uniform popularity, Poisson arrivals, prompts and output lengths of the
suite's eval split (inlaid.scheduling.traces). Rates: a calibration burst (every request at
once) on hf-peft and on inlaid-4bit-inlaid gives each one's saturation throughput; the rates
run geometrically from half the baseline's to 2.5x Inlaid's (at least 10x the baseline's),
so the sweep goes from light load for every system to beyond saturation for every system.
For each task count the four servers are started once and stay up; at each rate the systems
take turns (the order rotates from rate to rate), so machine load hits all of them alike.

Writes DIR (default bench/results/e2e/, --full: bench/results/e2e-full/; --quick: a temp dir):
e2e.json (every figure), records.jsonl (every request: task, times, token ids), e2e.md and PNG
plots (bench/e2e_report.py). The report is rewritten after each task count. The default
sweeps Zipf popularity (~14 minutes on the quiet 2-core Intel VM); --full sweeps Zipf and
uniform (41 minutes there). The transformers + PEFT server of the 100 tasks loads its
adapters during the 9-task sweep (~1 minute for 100); the replicated adapters
are cached (`e2e_tasks.py`). The systems, the settings of each run and the trace are in
`e2e_settings.py`. --quick (~1-2 minutes) is the smoke run
tests/test_bench_e2e.py checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # e2e_analysis, e2e_report beside this file (bench/ is no package)
from e2e_args import out_problem, overrides_problem, render_problem  # noqa: E402
from e2e_analysis import LATENCY_SLOS_S, agreement, computed_memory, headline, summaries  # noqa: E402
from e2e_settings import FULL, QUICK, SYSTEMS, E2eSettings, System, make_trace  # noqa: E402,F401  (tests reach them here)
from e2e_tasks import ADAPTERS, replicate_adapters, replicated_adapters  # noqa: E402,F401  (tests reach them here)
BASELINE_SERVER = BENCH / "baselines" / "hf_peft_server.py"
RESULTS = BENCH / "results" / "e2e"


# ---------------------------------------------------------------------------------- servers

def bf16_head(system: System, settings: E2eSettings) -> bool:
    """The 4-bit systems keep the embedding/head (the largest dense matrix left) in bf16 where
    the CPU multiplies bf16 natively, as `make run` serves it (inlaid/demo.py)."""
    from inlaid.kernels.dense_cpu import native_bf16

    return system.quantized and settings.device == "cpu" and native_bf16()


def system_title(system: System, settings: E2eSettings) -> str:
    return system.title + (" (embedding/head in bf16)" if bf16_head(system, settings) else "")


def server_config(system: System, settings: E2eSettings, tasks: dict[str, Path], model_dir: Path,
                  quantized_dir: Path | None, workdir: Path, predictor_state: Path | None) -> dict[str, dict[str, Any]]:
    executor: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype, "threads": settings.threads,
                                "max_num_seqs": settings.max_num_seqs}
    model: dict[str, Any] = {"dir": str(model_dir)}
    server: dict[str, Any] = {"log_level": "WARNING", "max_pending_requests": 100_000, "shutdown_grace_s": 5.0}
    config: dict[str, dict[str, Any]] = {"model": model, "executor": executor, "server": server,
                                         "tasks": {name: str(path) for name, path in tasks.items()}}
    if system.baseline:
        return config
    from inlaid.engine.adapter_config import read_adapter_spec

    executor.update(max_lora_slots=min(settings.max_lora_slots, len(tasks)), num_kv_blocks=settings.num_kv_blocks,
                    max_lora_rank=max(read_adapter_spec(n, p).rank for n, p in tasks.items()))
    if system.quantized:
        model["quantized_dir"] = str(quantized_dir)
        if bf16_head(system, settings):
            executor["weight_dtype"] = "bfloat16"
    server["policy"] = system.policy
    scheduler: dict[str, Any] = {"step_log": str(workdir / f"{system.label}.steps.jsonl")}
    if system.policy == "inlaid" and predictor_state is not None:
        state = workdir / f"{system.label}.predictor.npz"
        shutil.copy(predictor_state, state)
        scheduler["predictor_state"] = str(state)
    config["scheduler"] = scheduler
    return config


def quantized_base(settings: E2eSettings) -> Path:
    """The MLGPTQ 4-bit base of the suite's nine tasks (inlaid.quant.suite, cached)."""
    from inlaid.quant.suite import ensure_suite_checkpoint, is_complete, plan_suite

    if settings.cheap_base_if_uncached and not is_complete(plan_suite(adapters_dir=ADAPTERS).out_dir):
        return ensure_suite_checkpoint(adapters_dir=ADAPTERS, calib_samples=2, max_tokens=64, save_hessian_state=False,
                                       progress=False)
    return ensure_suite_checkpoint(adapters_dir=ADAPTERS)  # this checkout's adapters, wherever the package lives


def seeded_predictor_state(path: Path, prompts: dict[str, list[int]]) -> Path:
    """The inlaid policy's length predictor fitted on the suite's calib split, saved."""
    from inlaid.scheduling.experiment import length_model, suite_history
    from inlaid.scheduling.suite import load_suite_lengths

    length_model("model", suite_history(load_suite_lengths(), prompts, "calib")).save(path)
    return path


@dataclass
class Replay:
    system: str
    records: list  # RequestRecord
    started: float  # time.monotonic() around the replay: selects its steps in the step log
    ended: float


def replay(server, trace, prompts: dict[str, list[int]], system: str) -> Replay:  # noqa: ANN001
    from inlaid.scheduling.replay import Replay as TraceReplay

    started = time.monotonic()
    records = asyncio.run(TraceReplay(server.address, trace, prompts).run())
    return Replay(system, records, started, time.monotonic())


def server_counts(server) -> dict[str, int]:  # noqa: ANN001
    """What the server says it did (its GetStats)."""
    with server.client(timeout_s=30) as client:
        stats = client.stats()
    return {"received": stats.requests_received, "finished": stats.requests_finished, "failed": stats.requests_failed,
            "tokens_generated": stats.tokens_generated, "rss_bytes": stats.executor_rss_bytes,
            "executor_restarts": stats.executor_restarts}


# ---------------------------------------------------------------------------------- one run

@dataclass(frozen=True)
class Shared:
    """What every task count's servers share."""
    model_dir: Path
    quantized_dir: Path | None
    prompts: dict[str, list[int]]
    predictor_state: Path
    workdir: Path


def run(settings: E2eSettings, out: Path) -> dict[str, Any]:
    from inlaid.models.prepare import default_model_dir
    from inlaid.scheduling.suite import suite_prompts

    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    systems = [s for s in SYSTEMS if s.label in settings.systems]
    model_dir = default_model_dir()
    quantized_dir = quantized_base(settings) if any(s.quantized for s in systems) else None
    prompts = suite_prompts(model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="inlaid-e2e-"))
    report: dict[str, Any] = {"settings": asdict(settings), "systems": {s.label: system_title(s, settings) for s in systems},
                              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores" if settings.device == "cpu"
                              else settings.device, "quantized_dir": quantized_dir and str(quantized_dir),
                              "latency_slos_s": LATENCY_SLOS_S, "workloads": [], "servers": {}}
    all_records: list[dict[str, Any]] = []
    early: dict[int, dict[str, Any]] = {}
    try:
        shared = Shared(model_dir, quantized_dir, prompts,
                        seeded_predictor_state(workdir / "predictor-calib.npz", prompts), workdir)
        # The transformers + PEFT server of every later task count starts now and loads its
        # adapters (~1 minute of one core for 100: hf_peft_batch.add_lora_adapter) beside the
        # earlier sweeps (the other core runs them) instead of before its own.
        for num_tasks in settings.task_counts[1:]:  # each kept as soon as it runs: `finally` stops it
            early[num_tasks] = start_servers(settings, num_tasks, [s for s in systems if s.baseline], shared)
        for num_tasks in settings.task_counts:
            servers, rows, records = run_task_count(settings, num_tasks, systems, shared, early.pop(num_tasks, {}))
            report["servers"][str(num_tasks)] = servers
            report["workloads"] += rows
            all_records += records
            report.update(machine_loadavg_before=load_before, machine_loadavg_after=os.getloadavg(),
                          wall_s=time.perf_counter() - started, finished_task_counts=list(report["servers"]))
            write_report(report, all_records, out)  # each task count's results as soon as they exist
    finally:
        for servers in early.values():
            for server in servers.values():
                server.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def write_report(report: dict[str, Any], records: list[dict[str, Any]], out: Path) -> None:
    from e2e_report import plot_all, write_markdown

    report["headline"] = headline(report)
    report["agreement"] = agreement(records)
    report["memory_computed"] = computed_memory()
    (out / "e2e.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "records.jsonl").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    write_markdown(report, out / "e2e.md")
    plot_all(report, records, out)


def task_dirs(settings: E2eSettings, num_tasks: int) -> dict[str, Path]:
    """The suite's adapters for 9 tasks or fewer; else the replicated ones (cached)."""
    probe = make_trace(settings, num_tasks, "uniform", 1, settings.seed)
    if num_tasks <= 9:
        return {name: ADAPTERS / name for name in probe.tasks}
    return replicated_adapters({n: t.family for n, t in probe.tasks.items()}, settings.perturbation, settings.seed)


def start_servers(settings: E2eSettings, num_tasks: int, systems: list[System], shared: Shared) -> dict[str, Any]:
    """Launch each system's server for `num_tasks` tasks (not waited for)."""
    from inlaid.serve.launcher import ServerProcess

    tasks = task_dirs(settings, num_tasks)
    logs = shared.workdir / str(num_tasks)  # step logs and predictor states of this task count's servers
    logs.mkdir(exist_ok=True)
    servers = {}
    for system in systems:
        config = server_config(system, settings, tasks, shared.model_dir, shared.quantized_dir, logs,
                               shared.predictor_state)
        command = [sys.executable, str(BASELINE_SERVER)] if system.baseline else None
        (logs / system.label).mkdir()
        servers[system.label] = ServerProcess(config, logs / system.label, command=command)
    return servers


def run_task_count(settings: E2eSettings, num_tasks: int, systems: list[System], shared: Shared,
                   started: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Start every system's server with `num_tasks` tasks (those in `started` already are),
    calibrate, sweep the rates; the servers' counts, one summary row per replay, every
    request's record."""
    from tqdm import tqdm

    from inlaid.scheduling.metrics import summarize

    logs = shared.workdir / str(num_tasks)
    starting = time.perf_counter()
    servers = dict(started)
    try:
        # started together, each waits idle for its turn
        servers.update(start_servers(settings, num_tasks, [s for s in systems if s.label not in started], shared))
        servers = {s.label: servers[s.label] for s in systems}  # the systems' order: calibration takes the last
        ready_s = {}
        for label, server in servers.items():
            server.wait_ready(timeout_s=1200)
            ready_s[label] = time.perf_counter() - starting
        bursts = _calibrate(settings, num_tasks, servers, shared.prompts)
        calibration = {one.system: summarize(one.records)["throughput_rps"] for one in bursts}
        inlaid_rps = max(rps for label, rps in calibration.items() if label != "hf-peft")  # as the docs say: Inlaid's
        low = settings.low_load * calibration["hf-peft"]
        high = max(settings.high_load * inlaid_rps, settings.high_vs_baseline * calibration["hf-peft"])
        # ascending even where the baseline's low point lies past Inlaid's high one (short budgets)
        rates = sorted(float(r) for r in np.geomspace(low, high, settings.rates)) if settings.rates > 1 else [high]
        replays: list[tuple[str, int, float, Replay]] = []
        bar = tqdm(total=len(settings.popularities) * len(rates) * len(systems), desc=f"e2e {num_tasks} tasks",
                   unit="replay")
        for popularity in settings.popularities:
            for index, rate in enumerate(rates):
                trace = make_trace(settings, num_tasks, popularity, settings.requests_at(rate),
                                   settings.seed + 1 + index).scaled(rate)
                order = systems[index % len(systems):] + systems[:index % len(systems)]
                for system in order:
                    replays.append((popularity, index, rate, replay(servers[system.label], trace, shared.prompts,
                                                                     system.label)))
                    bar.update(1)
        bar.close()
        counts = {label: server_counts(server) for label, server in servers.items()}
    finally:
        for server in servers.values():
            server.terminate()  # flushes the step logs
    records = []
    phases = [("calibration", "uniform", -1, None, one) for one in bursts]
    for phase, popularity, index, rate, one in phases + [("sweep", *entry) for entry in replays]:
        records += [{"phase": phase, "tasks": num_tasks, "popularity": popularity, "rate_index": index,
                     "rate": rate, "system": one.system, **asdict(r)} for r in one.records]
    info = {"counts": counts, "calibration_rps": calibration, "ready_s": ready_s, "rates": rates}
    return info, summaries(num_tasks, replays, logs), records

def _calibrate(settings: E2eSettings, num_tasks: int, servers: dict, prompts: dict[str, list[int]]) -> list[Replay]:
    """Bursts measuring the saturation throughput of the baseline and of the last Inlaid system:
    every request of a short trace sent at once (throughput: finished requests over the drain)."""
    burst = make_trace(settings, num_tasks, "uniform", settings.calibration_requests, settings.seed + 1000).scaled(1e4)
    labels = ["hf-peft", [label for label in servers if label != "hf-peft"][-1]]
    return [replay(servers[label], burst, prompts, label) for label in labels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run (9 tasks, zipf, 2 rates, <= 5 requests)")
    parser.add_argument("--full", action="store_true", help="Zipf and uniform popularity (~35-40 minutes), into bench/results/e2e-full")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default bench/results/e2e, --full: e2e-full; --quick: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every server (default 1)")
    parser.add_argument("--task-counts", default=None, help="comma-separated, e.g. 9,100")
    parser.add_argument("--popularities", default=None, help="comma-separated: zipf,uniform")
    parser.add_argument("--rates", type=int, default=None, help="points of the rate sweep")
    parser.add_argument("--requests", type=int, default=None, help="the most requests per replay")
    parser.add_argument("--device", default=None, help="every server's device (cpu, cuda)")
    parser.add_argument("--render", action="store_true", help="rewrite e2e.md and the plots from DIR's JSON")
    # main() from bench/run_all.py gets no argv: never read the caller's sys.argv
    args = parser.parse_args(argv if argv is not None else [])
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    out = args.out or (None if args.quick else RESULTS.with_name("e2e-full") if args.full else RESULTS)
    if args.render:
        if out is None:
            return _refuse("--render needs --out DIR (--quick writes into a fresh temp dir)")
        problem = render_problem(out)
        if problem:
            return _refuse(problem)
        report = json.loads((out / "e2e.json").read_text())
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line]
        write_report(report, records, out)
        return 0
    settings = QUICK if args.quick else FULL if args.full else E2eSettings()
    overrides, problem = overrides_problem(args)
    problem = problem or (out_problem(out) if out is not None else None)
    if problem:  # before any server starts
        return _refuse(problem)
    out = out or Path(tempfile.mkdtemp(prefix="inlaid-e2e-quick-"))
    started = time.time()
    try:
        report = run(replace(settings, **overrides), out)
    except KeyboardInterrupt:  # the servers are stopped by run()'s `finally` blocks
        written = (out / "e2e.json").is_file() and (out / "e2e.json").stat().st_mtime >= started
        where = (f"the results of the finished task counts are in {out}/e2e.json and e2e.md" if written
                 else "no task count had finished: no report written")
        print(f"e2e: interrupted; the servers are stopped; {where}", file=sys.stderr)
        return 130
    print((out / "e2e.md").read_text())
    print(f"wrote {out}/e2e.json, e2e.md, records.jsonl and the plots in {report['wall_s']:.0f} s")
    return 0 if all(row["failed"] == 0 for row in report["workloads"]) else 1


def _refuse(message: str) -> int:
    print(f"e2e: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
