"""Replay a trace against a running `inlaid serve`, open loop, and save per-request timings.

    .venv/bin/python bench/replay.py --address tcp://127.0.0.1:5555 --trace bench/results/sched_trace_real.jsonl \
        --out timings.jsonl

The trace's tasks must be ones the server serves (`bench/traces.py --suite-task-names` names
them after the suite's tasks, as `inlaid serve` names the suite's adapters); this is checked,
with the server's readiness (`--ready-timeout-s`), before any request is sent. Prompts are
the suite records each trace request names (token ids, rebuilt with the default model's
tokenizer). Prints the metrics summary as strict JSON (a figure that cannot be computed,
such as the SLO attainment without isolated latencies, is null); `--out` gets one JSON line
per request (`inlaid.scheduling.metrics.RequestRecord`). Exit status: 0; 2 for a bad input
or a server not ready or not serving the trace's tasks (one line on stderr); 1 when every
request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from inlaid.cli_args import positive_float, writable_file_problem


def replay_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--out", default=None, help="one JSON line per request (missing folders are created)")
    parser.add_argument("--timeout-s", type=positive_float, default=3600.0, help="the longest a request may take")
    parser.add_argument("--ready-timeout-s", type=positive_float, default=30.0,
                        help="how long to wait for the server to answer and be ready before giving up")
    args = parser.parse_args(argv)
    from inlaid.client.messages import checked_address
    from inlaid.scheduling.metrics import json_safe, save_records, summarize
    from inlaid.scheduling.replay import ReplaySetupError, replay_trace
    from inlaid.scheduling.suite import suite_prompts
    from inlaid.scheduling.traces import Trace

    # Every input is checked before the replay: the timings of a whole trace were lost at the
    # end to a missing --out folder.
    problem = writable_file_problem(Path(args.out), "--out") if args.out else None
    if problem:
        parser.error(problem)
    try:
        checked_address(args.address)
    except ValueError as error:
        parser.error(f"--address: {error}")
    try:
        trace = Trace.load(args.trace)
    except (OSError, ValueError) as error:
        parser.error(f"--trace: {error}")
    try:
        records = asyncio.run(replay_trace(args.address, trace, suite_prompts(), args.timeout_s, progress=True,
                                           ready_timeout_s=args.ready_timeout_s))
    except ReplaySetupError as error:
        print(f"replay: {error}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_records(args.out, records)
    print(json.dumps(json_safe(summarize(records)), indent=1, allow_nan=False))
    failed = [r for r in records if not r.finished]
    if len(failed) == len(records):
        print(f"replay: all {len(records)} requests failed, e.g. {failed[0].error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(replay_cli())
