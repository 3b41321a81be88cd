"""Canonical workload traces: written to bench/results/sched_traces/, with a summary table.

Each trace draws from the task suite's recorded requests (`inlaid/scheduling/traces.py`):
Gamma arrivals at 1 request/s (scale them with `Trace.scaled(rate)`), 1,000 requests.

    .venv/bin/python bench/traces.py                  # the canonical set
    .venv/bin/python bench/traces.py --tasks 100 --cv 4 --popularity zipf --rate 2 \
        --requests 5000 --out my_trace.jsonl          # any other
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CANONICAL = [  # (tasks, cv, popularity, alpha)
    (10, 1.0, "uniform", 1.0),
    (10, 4.0, "zipf", 1.0),
    (100, 4.0, "zipf", 1.0),
    (1000, 1.0, "uniform", 1.0),
    (1000, 4.0, "power", 0.3),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--popularity", default="uniform")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--base-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write this one trace here")
    args = parser.parse_args(argv)
    from inlaid.scheduling.suite import load_suite_lengths
    from inlaid.scheduling.traces import TraceSpec, generate_trace

    one_trace = {option for option in ("out", "cv", "popularity", "alpha", "rate", "requests", "base_fraction", "seed")
                 if getattr(args, option) != parser.get_default(option)}
    if args.tasks is None and one_trace:
        # Without --tasks this writes the canonical set over the committed one: never as a
        # side effect of options meant for a single trace.
        parser.error(f"--{sorted(one_trace)[0].replace('_', '-')} describes one trace: give --tasks too "
                     "(without options, this writes the canonical set to bench/results/sched_traces/)")
    records = [r for r in load_suite_lengths() if r.split == "eval"]
    if args.tasks is not None:
        spec = TraceSpec(rate=args.rate, num_requests=args.requests, cv=args.cv, num_tasks=args.tasks,
                         popularity=args.popularity, alpha=args.alpha, base_fraction=args.base_fraction, seed=args.seed)
        try:
            spec.validate()
        except ValueError as error:
            parser.error(str(error))
        trace = generate_trace(spec, records)
        trace.save(args.out or "trace.jsonl")
        print(json.dumps(trace.summary(), indent=1))
        return
    folder = RESULTS / "sched_traces"
    folder.mkdir(exist_ok=True)
    lines = ["# Canonical traces", "", "1,000 requests each at 1 request/s from the suite's eval split; "
             "`Trace.load(path).scaled(rate)` replays one at another rate.", "",
             "| file | tasks | CV (measured) | popularity | top task share | top 10% tasks share | prompt tokens mean "
             "/ p90 | output tokens mean / p90 / max |", "|---|---|---|---|---|---|---|---|"]
    for tasks, cv, popularity, alpha in CANONICAL:
        spec = TraceSpec(rate=1.0, num_requests=1000, cv=cv, num_tasks=tasks, popularity=popularity, alpha=alpha, seed=1)
        trace = generate_trace(spec, records)
        name = f"{tasks}tasks_cv{cv:g}_{popularity}{'' if popularity == 'uniform' else f'{alpha:g}'}.jsonl"
        trace.save(folder / name)
        s = trace.summary()
        lines.append(f"| `{name}` | {tasks} ({s['tasks_used']} used) | {s['cv']:.2f} | {popularity} {alpha:g} | "
                     f"{s['top_task_share']:.1%} | {s['top_10pct_tasks_share']:.1%} | {s['prompt_tokens']['mean']:.0f} / "
                     f"{s['prompt_tokens']['p90']:.0f} | {s['output_tokens']['mean']:.1f} / {s['output_tokens']['p90']:.0f}"
                     f" / {s['output_tokens']['max']:.0f} |")
    lines += ["", "Reproduce: `.venv/bin/python bench/traces.py` (also run by `make bench`).", ""]
    (folder / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
