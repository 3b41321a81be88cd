"""A burst far beyond the seats: what the first-token rule costs at saturation.

Every request of a trace arrives at once (suite lengths, held-out split) on a server shaped
like `make bench`'s (16 sequences, 16 adapter slots, 512 KV blocks), simulated on a fitted
cost model with the same scheduler and policy code the server runs. Compared: FIFO, the
inlaid policy with its defaults, without the first-token rule, and with
`first_token_within_seats` (docs/scheduling.md). Writes

    bench/results/sched_burst[_TAG].json and .md

    .venv/bin/python bench/sched_burst.py --tag amd4bit \
        --suite-lengths inlaid/scheduling/data/suite_lengths_4bit.jsonl [--requests 200]

A few seconds; the figures are simulated, so they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # sched_sim beside this file (bench/ is no package)
import sched_sim  # noqa: E402

# label -> (policy, options)
VARIANTS = {
    "fifo": ("fifo", {}),
    "inlaid (defaults)": ("inlaid", {}),
    "inlaid, no first-token rule": ("inlaid", {"first_token_first": False}),
    "inlaid, first tokens within seats": ("inlaid", {"first_token_within_seats": True}),
}
WORKLOADS = ((9, "zipf"), (9, "uniform"), (100, "zipf"), (100, "uniform"))  # (tasks, popularity)


def run(tag: str, suite_lengths: str | None, requests: int) -> dict:
    from inlaid.scheduling.experiment import PolicyVariant
    from inlaid.scheduling.simulator import EngineShape

    sched_sim._load_context(suite_lengths, 16, tag)
    sched_sim._context["shape"] = EngineShape(max_num_seqs=16, max_lora_slots=16, num_kv_blocks=512)
    rows = []
    for tasks, popularity in WORKLOADS:
        job = dict(tasks=tasks, cv=1.0, popularity=popularity, requests=requests, rate=1e6)  # all at once
        for label, (policy, options) in VARIANTS.items():
            summary, _ = sched_sim.simulate_job(job, PolicyVariant(label, policy, options))
            rows.append({"tasks": tasks, "popularity": popularity, "policy": label,
                         "throughput_rps": summary["throughput_rps"], "mean_latency_s": summary["latency_s"]["mean"],
                         "p50_latency_s": summary["latency_s"]["p50"], "preemptions": summary["preemptions"]})
    return {"tag": tag, "suite_lengths": Path(suite_lengths).name if suite_lengths else "suite_lengths.jsonl",
            "requests": requests, "rows": rows}


def markdown(report: dict) -> str:
    lines = ["# A burst beyond the seats: the first-token rule at saturation", "",
             f"{report['requests']} requests at once; 16 sequences, 16 adapter slots, 512 KV blocks; cost model "
             f"`{sched_sim.cost_model_file(report['tag']).name}`; output lengths from `{report['suite_lengths']}`. "
             "Simulated (`bench/sched_burst.py`).", "",
             "| tasks | popularity | policy | requests/s | mean latency s | p50 latency s | preemptions |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tasks']} | {r['popularity']} | {r['policy']} | {r['throughput_rps']:.2f} | "
              f"{r['mean_latency_s']:.1f} | {r['p50_latency_s']:.1f} | {r['preemptions']} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="", help="the cost model sched_cost_model_TAG.json (default: the committed one)")
    parser.add_argument("--suite-lengths", default=None, help="recorded output lengths (default: the fp32 model's)")
    parser.add_argument("--requests", type=sched_sim.bounded_int(1, sched_sim.MAX_REQUESTS), default=200)
    parser.add_argument("--out-dir", type=Path, default=sched_sim.RESULTS,
                        help="folder of the files it writes (default bench/results)")
    args = parser.parse_args(argv)
    # checked as sched_sim.py checks them: a missing cost model or a bad lengths file was a traceback
    sched_sim.check_out_dir(parser, args.out_dir)
    sched_sim.check_cost_model(parser, sched_sim.cost_model_file(args.tag))
    sched_sim.check_suite_lengths(args.suite_lengths, prog="sched_burst.py")
    report = run(args.tag, args.suite_lengths, args.requests)
    suffix = f"_{args.tag}" if args.tag else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"sched_burst{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"sched_burst{suffix}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(sched_sim.run_script(lambda: main(sys.argv[1:]), "sched_burst.py"))
