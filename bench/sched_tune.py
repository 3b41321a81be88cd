"""Tune the `inlaid` policy for one machine: a few option sets on that machine's cost model.

The policy's defaults were chosen on one executor's step costs (docs/scheduling.md); on an
executor whose costs balance differently (a larger fixed part per step, cheaper adapters,
dearer loads) other settings win. This runs the simulator sweep's twelve configurations
(10 / 100 / 1,000 tasks x CV 1 / 4 x uniform / Zipf) at one load with FIFO and each option
set below, on `sched_cost_model[_TAG].json` (`bench/sched_cost.py [--tag TAG]` fits it on
the machine that will serve), and reports, per option set, against FIFO on the same trace:
the geometric mean of mean-JCT ratios, in how many configurations SLO attainment (10x the
isolated latency) reaches 2x FIFO's (or is out of reach: FIFO above 50 %), in how many p99
first-token latency is no worse, and the longest wait. Writes

    bench/results/sched_tune[_TAG].json and .md   (--out-dir DIR: there instead)

    .venv/bin/python bench/sched_tune.py [--tag xeon] [--requests 600] [--load 0.8] [--slots 32]
        [--suite-lengths inlaid/scheduling/data/suite_lengths_4bit.jsonl]   # a 4-bit server's workload

About 3 minutes with 2 workers at 600 requests a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # sched_sim beside this file (bench/ is no package)
import sched_sim  # noqa: E402

from inlaid.cli_args import fraction  # noqa: E402
from inlaid.scheduling.autotune import CANDIDATES, choose, resolved_options, score_candidates  # noqa: E402

RESULTS = BENCH / "results"
SLO = "10x"
# label -> [scheduler] options of the inlaid policy (the rest: its defaults); the same sets a
# server with `[scheduler] autotune_cost_model` chooses among at start-up
OPTION_SETS: dict[str, dict] = CANDIDATES


def _run(job: dict) -> dict:
    from inlaid.scheduling.experiment import PolicyVariant

    variant = (PolicyVariant("fifo", "fifo") if job["label"] == "fifo"
               else PolicyVariant(job["label"], "inlaid", job["options"]))
    summary, _ = sched_sim.simulate_job(job, variant)
    return {**job, "mean_jct_s": summary["latency_s"]["mean"], "slo": summary["slo_attainment"][SLO],
            "p99_ttft_s": summary["ttft_s"]["p99"], "max_wait_s": summary["max_wait_s"],
            "throughput_rps": summary["throughput_rps"]}


def sweep(tag: str, requests: int, load: float, slots: int, workers: int, suite_lengths: str | None = None) -> dict:
    from inlaid.scheduling.cost_model import StepCostModel
    from inlaid.scheduling.simulator import EngineShape

    configs = [(t, cv, p) for t in sched_sim.TASK_COUNTS for cv in sched_sim.CVS for p in sched_sim.POPULARITIES]
    cost = StepCostModel.load(sched_sim.cost_model_file(tag))
    option_sets = {label: resolved_options(options, cost, EngineShape(max_lora_slots=slots))
                   for label, options in OPTION_SETS.items()}
    pool = sched_sim._pool(workers, suite_lengths, slots, tag)
    started = time.perf_counter()
    try:
        saturation = [dict(tasks=t, cv=cv, popularity=p, requests=requests, rate=1000.0, label="fifo")
                      for t, cv, p in configs]
        capacity = {(r["tasks"], r["cv"], r["popularity"]): r["throughput_rps"]
                    for r in sched_sim._map(pool, saturation, "saturation", _run)}
        jobs = [dict(tasks=t, cv=cv, popularity=p, requests=requests, rate=load * capacity[(t, cv, p)], label=label,
                     options=option_sets.get(label, {}))
                for t, cv, p in configs for label in ["fifo", *option_sets]]
        runs = sched_sim._map(pool, jobs, "simulate", _run)
    finally:
        sched_sim.end_pool(pool)
    return {"tag": tag, "requests": requests, "load": load, "slots": slots, "option_sets": option_sets,
            "suite_lengths": Path(suite_lengths).name if suite_lengths else "suite_lengths.jsonl",
            "wall_s": time.perf_counter() - started, "loadavg": os.getloadavg(), "runs": runs}


def summary_rows(report: dict) -> list:
    """Per option set: its figures against FIFO over the twelve configurations
    (`inlaid.scheduling.autotune.CandidateScore`, as the start-up tuning scores them)."""
    return score_candidates(report["runs"], report["option_sets"], key=lambda r: (r["tasks"], r["cv"], r["popularity"]))


def write_markdown(report: dict, path: Path) -> None:
    fifo_wait = max(r["max_wait_s"] for r in report["runs"] if r["label"] == "fifo")
    lines = ["# Tuning the inlaid policy on one cost model", "",
             f"Cost model `sched_cost_model{'_' + report['tag'] if report['tag'] else ''}.json`; "
             f"{report['slots']} adapter slots; {report['requests']} requests a run; output lengths from "
             f"`{report.get('suite_lengths', 'suite_lengths.jsonl')}`; load "
             f"{report['load']:.0%} of FIFO's saturation; the twelve configurations of the simulator sweep. "
             f"Ratios against FIFO on the same trace. SLO: latency <= {SLO} the isolated latency; "
             f"'out of reach' = FIFO already above 50 %. Sweep wall time {report['wall_s']:.0f} s; "
             f"FIFO's longest wait {fifo_wait:.0f} s.", "",
             "| option set | mean JCT / FIFO: geometric mean (best - worst) | configurations with mean JCT <= FIFO | "
             "SLO >= 2x FIFO or out of reach | p99 TTFT <= FIFO | longest wait s |", "|---|---|---|---|---|---|"]
    rows = summary_rows(report)
    chosen = choose(rows)
    for row in rows:
        n = row.workloads
        mark = " **(start-up tuning's choice)**" if row is chosen else ""
        lines.append(f"| {row.label}{mark} | {row.jct_geomean:.2f}x ({row.jct_best:.2f} - {row.jct_worst:.2f}) | "
                     f"{row.jct_at_most_fifo} / {n} | {row.slo_2x_or_out_of_reach} / {n} | "
                     f"{row.p99_ttft_at_most_fifo} / {n} | {row.max_wait_s:.0f} |")
    lines += ["", "Options of each set (the rest are the policy's defaults):", ""]
    lines += [f"- {label}: `{json.dumps(options) if options else '{}'}`" for label, options in report["option_sets"].items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="", help="the cost model sched_cost_model_TAG.json (default: the committed one)")
    # each checked here: `--load 0` failed after the saturation runs, `--slots -1` stuck the
    # simulator, `--load 2` swept 200 % of saturation (an outside probe)
    parser.add_argument("--requests", type=sched_sim.bounded_int(1, sched_sim.MAX_REQUESTS), default=600)
    parser.add_argument("--load", type=fraction, default=0.8, help="fraction of FIFO's saturation throughput, in (0, 1]")
    parser.add_argument("--slots", type=sched_sim.bounded_int(1, sched_sim.MAX_SLOTS), default=sched_sim.SLOTS)
    parser.add_argument("--workers", type=sched_sim.bounded_int(1, sched_sim.MAX_WORKERS), default=2)
    parser.add_argument("--suite-lengths", default=None,
                        help="recorded output lengths to draw from (default: the fp32 model's; "
                             "inlaid/scheduling/data/suite_lengths_4bit.jsonl: the 4-bit base's)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="folder of the files it writes (default bench/results)")
    args = parser.parse_args(argv)
    sched_sim.check_out_dir(parser, args.out_dir)
    sched_sim.check_cost_model(parser, sched_sim.cost_model_file(args.tag))
    sched_sim.check_suite_lengths(args.suite_lengths, prog="sched_tune.py")
    report = sweep(args.tag, args.requests, args.load, args.slots, args.workers, args.suite_lengths)
    suffix = f"_{args.tag}" if args.tag else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"sched_tune{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.out_dir / f"sched_tune{suffix}.md")
    print((args.out_dir / f"sched_tune{suffix}.md").read_text())
    return report


if __name__ == "__main__":
    sys.exit(sched_sim.run_script(lambda: main(sys.argv[1:]), "sched_tune.py"))
