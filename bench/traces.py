"""Canonical workload traces: written to bench/results/sched_traces/, with a summary table.

Each trace draws from the task suite's recorded requests (`inlaid/scheduling/traces.py`):
Gamma arrivals at 1 request/s (scale them with `Trace.scaled(rate)`), 1,000 requests.

    .venv/bin/python bench/traces.py                  # the canonical set
    .venv/bin/python bench/traces.py --tasks 100 --cv 4 --popularity zipf --rate 2 \\
        --requests 5000 --out my_trace.jsonl          # any other
    .venv/bin/python bench/traces.py --tasks 9 --suite-task-names --out real.jsonl   # replayable on `inlaid serve`

Tasks are named task-0000, task-0001, ... unless `--suite-task-names` names each after the
suite task it draws from (at most 9 tasks): the names a server of the suite's adapters
serves, so `bench/replay.py` can replay the trace against it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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
    parser.add_argument("--tasks", type=int, help="tasks of the one trace (1..100000; without it: the canonical set)")
    parser.add_argument("--cv", type=float, default=1.0,
                        help="coefficient of variation of the Gamma inter-arrival times (1: Poisson; default 1)")
    parser.add_argument("--popularity", default="uniform",
                        help="task popularity: uniform, zipf (P(i) ~ 1/(i+1)^alpha) or power (S-LoRA's "
                             "floor(N * x), x ~ power(alpha)); default uniform")
    parser.add_argument("--alpha", type=float, default=1.0, help="zipf / power exponent (default 1)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (default 1)")
    parser.add_argument("--requests", type=int, default=1000, help="requests in the trace (default 1000)")
    parser.add_argument("--base-fraction", type=float, default=0.0,
                        help="fraction of requests for the bare base model, without an adapter (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--suite-task-names", action="store_true",
                        help="name each task after its suite task (at most 9): what a server of the suite's adapters "
                             "serves, so bench/replay.py can replay the trace")
    parser.add_argument("--out", help="with --tasks: write the trace here (default: trace.jsonl in the current "
                                      "directory; missing folders are created)")
    args = parser.parse_args(argv)
    from inlaid.cli_args import writable_file_problem
    from inlaid.scheduling.suite import load_suite_lengths
    from inlaid.scheduling.traces import RATE_FAITHFUL_GAPS, TraceSpec, generate_trace, max_faithful_cv

    one_trace = {option for option in ("out", "cv", "popularity", "alpha", "rate", "requests", "base_fraction", "seed",
                                       "suite_task_names")
                 if getattr(args, option) != parser.get_default(option)}
    if args.tasks is None and one_trace:
        # Without --tasks this writes the canonical set over the committed one: never as a
        # side effect of options meant for a single trace.
        parser.error(f"--{sorted(one_trace)[0].replace('_', '-')} describes one trace: give --tasks too "
                     "(without options, this writes the canonical set to bench/results/sched_traces/)")
    records = [r for r in load_suite_lengths() if r.split == "eval"]
    if args.tasks is not None:
        spec = TraceSpec(rate=args.rate, num_requests=args.requests, cv=args.cv, num_tasks=args.tasks,
                         popularity=args.popularity, alpha=args.alpha, base_fraction=args.base_fraction,
                         suite_task_names=args.suite_task_names, seed=args.seed)
        if args.out == "":
            parser.error("--out is empty: give the trace's path (or leave --out out for ./trace.jsonl)")
        out = Path(args.out or "trace.jsonl")
        problem = writable_file_problem(out, "--out")
        if problem:
            parser.error(problem)
        try:
            spec.validate()
            # Here a rate is asked for: refuse a CV whose draws of this many requests miss it
            # (library callers may want a short bursty trace; the spec allows up to MAX_CV).
            if args.cv > max_faithful_cv(args.requests):
                raise ValueError(f"cv {args.cv:g} with {args.requests} requests: the trace's rate would typically "
                                 f"miss the {args.rate:g}/s asked by over 20 % (the span of n gaps spreads by CV / "
                                 f"sqrt(n)); at this count use --cv <= {max_faithful_cv(args.requests):.3g}, or "
                                 f"--requests >= {math.ceil(RATE_FAITHFUL_GAPS * args.cv ** 2)}")
            trace = generate_trace(spec, records)
        except ValueError as error:  # one line naming the value (not the whole usage above it)
            print(f"traces.py: {error}", file=sys.stderr)
            sys.exit(2)
        out.parent.mkdir(parents=True, exist_ok=True)
        trace.save(out)
        summary = trace.summary()
        print(json.dumps(summary, indent=1))
        if abs(summary["rate"] / args.rate - 1) > 0.2:
            # Not a fault: a renewal process's span spreads by CV / sqrt(requests) around its mean.
            print(f"note: this draw's rate is {summary['rate']:.3g}/s against the {args.rate:g}/s asked (at CV "
                  f"{args.cv:g}, {args.requests} requests spread by about {args.cv / args.requests ** 0.5:.0%}); "
                  "more requests or another --seed come closer", file=sys.stderr)
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
