"""The scheduling simulator sweep: policies x load x tasks x burstiness x popularity.

Runs the real scheduler and policies (`inlaid/scheduling/simulator.py`) on the fitted
executor cost model (`bench/results/sched_cost_model.json`) over traces drawn from the
task suite's recorded requests (held-out eval split; the length predictor starts from the
calib split and keeps learning online). For each configuration the load is a fraction of
FIFO's saturation throughput (measured on the same trace, overloaded). Writes

    bench/results/sched_sim.json   every run's metrics (32 adapter slots)
    bench/results/sched_sim.md     headline, oracle, full and ablation tables, the long-run timing
    bench/results/sched_sim_jct.png, sched_sim_slo.png   mean JCT and SLO attainment vs load
    bench/results/sched_sim_slots8.*   the same with the server's default 8 slots
    bench/results/sched_sim_quick*.*   `--quick` (a 30-s smoke run) writes its own set instead
    (`--out-dir DIR`: every one of them in DIR instead of bench/results)

    .venv/bin/python bench/sched_sim.py [--requests 1200] [--workers 2] [--slots 32,8] [--quick] [--tag NAME]

Every option is checked before any work starts (one line, exit status 2): --slots, --requests,
--workers, --long-run-s, --suite-lengths (read and checked here, not only in the workers),
--out-dir, the cost model, and with --render the JSON files it reads. `--quick` runs 300
requests unless --requests is given.

`--tag xeon` sweeps on sched_cost_model_xeon.json (bench/sched_cost.py --tag xeon) and
writes sched_sim*_xeon.*. `--device cuda` runs the inlaid variants (not the oracles) from
the defaults a server on a GPU starts with (`srtf.CUDA_DEFAULTS`), for a GPU's cost model:
`--tag h200 --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

RESULTS = Path(__file__).parent / "results"
TASK_COUNTS = (10, 100, 1000)
CVS = (1.0, 4.0)
POPULARITIES = ("uniform", "zipf")
LOADS = (0.5, 0.8, 0.9, 1.0)
HEADLINE_LOADS = (0.8, 0.9)
SLO_SCALE = "10x"
ZIPF_ALPHA = 1.0
SEED = 7
# Two servers: one meant for many tasks, 32 adapter slots (its results: sched_sim.*), and
# the default 8 (sched_sim_slots8.*), where 100 and 1,000 tasks contend for slots; every
# other limit is the server default.
SLOTS = 32
SLOT_COUNTS = (SLOTS, 8)
# Bounds of the options: far beyond any server (slots) or sweep (requests: a rate-1 trace
# of more spans over the 30 days a trace may); the long run's at most a day of simulated time.
MAX_SLOTS = 4096
MAX_REQUESTS = 2_592_000
MAX_WORKERS = 256
MAX_LONG_RUN_S = 86_400.0
QUICK_REQUESTS = 300

_context: dict = {}



def cost_model_file(tag: str = "") -> Path:
    """The fitted step-cost model `bench/sched_cost.py [--tag TAG]` wrote."""
    return RESULTS / (f"sched_cost_model_{tag}.json" if tag else "sched_cost_model.json")


def check_cost_model(parser: argparse.ArgumentParser, path: Path) -> None:
    """A missing or unusable cost model file (`StepCostModel` refuses non-finite, negative
    or absurd coefficients) is a one-line usage error (exit status 2) before the sweep, not
    a worker's traceback minutes into it."""
    from inlaid.scheduling.autotune import load_cost_model

    try:
        load_cost_model(str(path))
    except ValueError as error:
        parser.error(f"--tag: {error}")


def check_out_dir(parser: argparse.ArgumentParser, out_dir: Path) -> None:
    """--out-dir must be a folder it can write (found now, not after the sweep)."""
    from inlaid.cli_args import writable_dir_problem

    problem = writable_dir_problem(out_dir, "--out-dir")
    if problem:
        parser.error(problem)


def slot_counts(text: str) -> tuple[int, ...]:
    """argparse type of --slots: `8,,4` ran the whole 8-slot sweep before failing on the
    empty one, `abc` was a ValueError traceback, `0` a SimulationStuckError in the sweep."""
    parts = text.split(",")
    if not all(part.strip().isdigit() and 1 <= int(part) <= MAX_SLOTS for part in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers in 1..{MAX_SLOTS}, got '{text}'")
    return tuple(int(part) for part in parts)


def bounded_int(low: int, high: int):  # noqa: ANN201  (an argparse type)
    """argparse type for an integer in [low, high] (argparse names the option on refusal)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got '{text}'") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {value}")
        return value
    return parse


def long_run_seconds(text: str) -> float:
    """argparse type of --long-run-s: NaN ran the whole sweep, then failed converting NaN
    requests to an integer; a negative value ran a long run of no requests."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_LONG_RUN_S:  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, {MAX_LONG_RUN_S:g}], got '{text}'")
    return value


def check_suite_lengths(path: str | None, prog: str = "sched_sim.py") -> None:
    """Read --suite-lengths here: read only in the pool's initializer, a bad file failed in
    every worker and the pool respawned them forever (a hang). `prog` names the script that
    refuses it (sched_tune.py's sweep uses this pool too)."""
    from inlaid.scheduling.suite import SUITE_LENGTHS_FILE, load_suite_lengths

    name = path or SUITE_LENGTHS_FILE
    try:
        records = load_suite_lengths(name)
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        _refuse(f"--suite-lengths: cannot use {name}: {type(error).__name__}: {error}", prog)
    if not any(record.split == "eval" for record in records):  # the traces are drawn from them
        _refuse(f"--suite-lengths: {name} has no records of the eval split to draw traces from", prog)


def check_render_inputs(paths: list[Path]) -> None:
    """--render reads each sweep's JSON: a missing or malformed one is one line, before any is rewritten."""
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as error:
            _refuse(f"--render: cannot read {path}: {getattr(error, 'strerror', None) or error} "
                    "(run the sweep first, or give the --out-dir/--tag/--slots it was written with)")
        if not isinstance(report, dict) or "runs" not in report:
            _refuse(f"--render: {path} is not a sched_sim report (no 'runs')")


def _refuse(message: str, prog: str = "sched_sim.py") -> NoReturn:
    """A bad input file: one line naming it, exit status 2 (the usage above it says nothing more)."""
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(2)


def _load_context(suite_lengths: str | None, slots: int = SLOTS, tag: str = "") -> None:
    from inlaid.scheduling.cost_model import StepCostModel
    from inlaid.scheduling.experiment import suite_history
    from inlaid.scheduling.simulator import EngineShape
    from inlaid.scheduling.suite import SUITE_LENGTHS_FILE, load_suite_lengths, suite_prompts

    records = load_suite_lengths(suite_lengths or SUITE_LENGTHS_FILE)
    prompts = suite_prompts()
    model_file = cost_model_file(tag)
    _context.update(cost=StepCostModel.load(model_file), shape=EngineShape(max_lora_slots=slots),
                    records=records, prompts=prompts, history=suite_history(records, prompts, "calib"))


def _trace(tasks: int, cv: float, popularity: str, requests: int):
    from inlaid.scheduling.traces import TraceSpec, generate_trace

    held_out = [r for r in _context["records"] if r.split == "eval"]
    spec = TraceSpec(rate=1.0, num_requests=requests, cv=cv, num_tasks=tasks, popularity=popularity,
                     alpha=ZIPF_ALPHA, seed=SEED)
    return generate_trace(spec, held_out)


def simulate_job(job: dict, variant) -> tuple[dict, float]:  # noqa: ANN001  (a PolicyVariant)
    """`variant` on the job's trace (tasks, cv, popularity, requests, rate): summarize()'s
    metrics, and the wall seconds of the simulation itself."""
    from inlaid.scheduling.experiment import make_variant
    from inlaid.scheduling.metrics import summarize
    from inlaid.scheduling.simulator import simulate

    if job.get("device", "cpu") == "cuda" and variant.policy == "inlaid" and not variant.label.startswith("oracle"):
        from dataclasses import replace

        from inlaid.scheduling.srtf import CUDA_DEFAULTS

        variant = replace(variant, options={**CUDA_DEFAULTS, **variant.options})
    trace = _trace(job["tasks"], job["cv"], job["popularity"], job["requests"]).scaled(job["rate"])
    policy = make_variant(variant, _context["cost"], _context["shape"], _context["history"], trace, _context["prompts"])
    started = time.perf_counter()
    result = simulate(trace, policy, _context["cost"], _context["shape"], _context["prompts"])
    summary = summarize(result.requests, result.steps, warmup_fraction=0.05, service_gap=result.service_gap)
    return summary, time.perf_counter() - started


def _run(job: dict) -> dict:
    from inlaid.scheduling.experiment import ABLATIONS, MAIN_VARIANTS, ORACLE_REFERENCES, ORACLES

    variants = {v.label: v for v in MAIN_VARIANTS + ABLATIONS + ORACLES + ORACLE_REFERENCES}
    summary, wall_s = simulate_job(job, variants[job["policy"]])
    summary.pop("jct_by_task")
    return {**job, "wall_s": wall_s, "simulated_s": summary["makespan_s"], **summary}


def _pool(workers: int, suite_lengths: str | None, slots: int, tag: str = ""):
    import multiprocessing

    # Loaded here, then inherited by the forked workers: a failing pool initializer is
    # respawned forever (a hang); here it fails once, in this process.
    _load_context(suite_lengths, slots, tag)
    if workers <= 1:
        return None
    # Ctrl-C reaches the workers too (one process group): they leave it to this process, which
    # ends them (each printed a KeyboardInterrupt traceback: an outside probe)
    return multiprocessing.get_context("fork").Pool(workers, initializer=signal.signal,
                                                    initargs=(signal.SIGINT, signal.SIG_IGN))


def end_pool(pool) -> None:  # noqa: ANN001
    """Wait for a pool's workers, or end them at once when an exception (Ctrl-C) is on its way."""
    if pool is None:
        return
    if sys.exc_info()[0] is not None:
        pool.terminate()
    else:
        pool.close()
    pool.join()


def run_script(main, name: str) -> int:  # noqa: ANN001
    """A sweep script's `main`, Ctrl-C included: one line and exit 130 (it wrote nothing: its
    files are written once the sweep ends), not tracebacks of it and of every worker."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted; the sweep in progress wrote nothing (each sweep writes its files as it ends)",
              file=sys.stderr)
        return 130
    return 0


def _map(pool, jobs: list[dict], desc: str, run=None) -> list[dict]:  # noqa: ANN001
    """`run` (default `_run`) over `jobs`, in `pool` or here, with a progress bar."""
    from tqdm import tqdm

    run = run or _run
    iterator = pool.imap(run, jobs) if pool is not None else map(run, jobs)
    return list(tqdm(iterator, total=len(jobs), desc=desc, unit="run"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=bounded_int(1, MAX_REQUESTS), default=None,
                        help=f"requests per run (default 1200; {QUICK_REQUESTS} with --quick)")
    parser.add_argument("--workers", type=bounded_int(1, MAX_WORKERS), default=2)
    parser.add_argument("--quick", action="store_true",
                        help=f"one configuration, {QUICK_REQUESTS} requests unless --requests (a smoke run)")
    parser.add_argument("--long-run-s", type=long_run_seconds, default=3600.0,
                        help="simulated seconds of the long run (not run with --quick)")
    parser.add_argument("--suite-lengths", default=None, help="suite lengths JSONL (default: the committed one)")
    parser.add_argument("--slots", type=slot_counts, default=SLOT_COUNTS,
                        help="adapter slots of the simulated server, one sweep per count (comma-separated)")
    parser.add_argument("--render", action="store_true", help="rewrite the report and plots from sched_sim.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the inlaid variants start from the GPU defaults (srtf.CUDA_DEFAULTS)")
    parser.add_argument("--tag", default="", help="sweep on sched_cost_model_TAG.json (bench/sched_cost.py --tag), "
                                                  "writing sched_sim*_TAG.*")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="folder of every file it writes (and --render reads; default bench/results)")
    args = parser.parse_args(argv)
    check_out_dir(parser, args.out_dir)
    suffixes = {slots: (("_quick" if args.quick else "") + ("" if slots == SLOTS else f"_slots{slots}")
                        + (f"_{args.tag}" if args.tag else "")) for slots in args.slots}
    if args.render:
        check_render_inputs([args.out_dir / f"sched_sim{suffix}.json" for suffix in suffixes.values()])
    else:
        check_cost_model(parser, cost_model_file(args.tag))
        check_suite_lengths(args.suite_lengths)
    reports = {}
    for slots, suffix in suffixes.items():
        reports[slots] = _render(suffix, args.out_dir) if args.render else _sweep(args, slots, suffix)
    return reports


def _render(suffix: str, out_dir: Path) -> dict:
    from sched_report import plot_sweep, write_sim_markdown

    report = json.loads((out_dir / f"sched_sim{suffix}.json").read_text())
    write_sim_markdown(report, out_dir / f"sched_sim{suffix}.md")
    plot_sweep(report, out_dir / f"sched_sim{suffix}")
    return report


def _long_jobs(long_run_s: float, capacity: dict, device: dict) -> list[dict]:
    """FIFO and inlaid for `long_run_s` simulated seconds at 80 % of saturation (1,000 tasks,
    CV 4, Zipf); only built when the long run runs (--quick skips it)."""
    long_rate = 0.8 * capacity.get((1000, 4.0, "zipf"), next(iter(capacity.values())))
    requests = max(1, int(long_run_s * long_rate))  # its span is long_run_s: within a trace's 30 days
    return [dict(tasks=1000, cv=4.0, popularity="zipf", requests=requests, rate=long_rate, load=0.8, policy=label,
                 **device) for label in ("fifo", "inlaid")]


def _sweep(args: argparse.Namespace, slots: int, suffix: str) -> dict:
    from inlaid.scheduling.experiment import ABLATIONS, MAIN_VARIANTS, ORACLE_REFERENCES, ORACLES, prefill_weight
    from inlaid.scheduling.srtf import CUDA_DEFAULTS, InlaidOptions

    configs = [(t, cv, p) for t in TASK_COUNTS for cv in CVS for p in POPULARITIES]
    requests = args.requests or (QUICK_REQUESTS if args.quick else 1200)
    if args.quick:
        configs = [(100, 4.0, "zipf")]
    load_before = os.getloadavg()
    started = time.perf_counter()
    pool = _pool(args.workers, args.suite_lengths, slots, args.tag)
    try:
        # Saturation: FIFO's throughput with every request queued almost at once.
        capacity_jobs = [dict(tasks=t, cv=cv, popularity=p, requests=requests, rate=1000.0, policy="fifo",
                              load=math.inf) for t, cv, p in configs]
        device = {"device": args.device}
        capacity = {(j["tasks"], j["cv"], j["popularity"]): j["throughput_rps"]
                    for j in _map(pool, capacity_jobs, "saturation")}
        jobs = [dict(tasks=t, cv=cv, popularity=p, requests=requests, rate=load * capacity[(t, cv, p)], load=load,
                     policy=v.label, **device) for t, cv, p in configs for load in LOADS for v in MAIN_VARIANTS]
        jobs += [dict(tasks=t, cv=cv, popularity=p, requests=requests, rate=0.9 * capacity[(t, cv, p)], load=0.9,
                      policy=v.label, **device) for t, cv, p in configs for v in ABLATIONS]
        jobs += [dict(tasks=t, cv=cv, popularity=p, requests=requests, rate=load * capacity[(t, cv, p)], load=load,
                      policy=v.label, **device) for t, cv, p in configs for load in HEADLINE_LOADS
                 for v in ORACLES + ORACLE_REFERENCES]
        runs = _map(pool, jobs, "simulate")
        long_runs = [] if args.quick else _map(pool, _long_jobs(args.long_run_s, capacity, device), "long run")
    finally:
        end_pool(pool)
    report = {
        "machine_loadavg_before": load_before, "machine_loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started, "requests_per_run": requests, "slo_scale": SLO_SCALE,
        "device": args.device,
        "inlaid_defaults": asdict(InlaidOptions(**(CUDA_DEFAULTS if args.device == "cuda" else {}))),
        "prefill_weight": prefill_weight(_context["cost"], _context["shape"]),
        "engine_shape": asdict(_context["shape"]), "cost_model": _context["cost"].description,
        "capacity_rps": {f"{t}/{cv:g}/{p}": c for (t, cv, p), c in capacity.items()},
        "runs": runs, "long_runs": long_runs, "ablations": [v.label for v in ABLATIONS],
        "oracles": [v.label for v in ORACLES], "oracle_references": [v.label for v in ORACLE_REFERENCES],
        "variants": [v.label for v in MAIN_VARIANTS],
        "variant_options": {v.label: v.options for v in MAIN_VARIANTS},  # what a later --render states
    }
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"sched_sim{suffix}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    from sched_report import plot_sweep, write_sim_markdown

    write_sim_markdown(report, out_dir / f"sched_sim{suffix}.md")
    plot_sweep(report, out_dir / f"sched_sim{suffix}")
    print(f"wrote {out_dir / f'sched_sim{suffix}.md'} in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    sys.exit(run_script(main, "sched_sim.py"))
