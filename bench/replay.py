"""Replay a trace against a running `inlaid serve`, open loop, and save per-request timings.

    .venv/bin/python bench/replay.py --address tcp://127.0.0.1:5555 --trace bench/results/sched_trace_real.jsonl \
        --out timings.jsonl

Prompts are the suite records each trace request names (token ids, rebuilt with the
default model's tokenizer). Prints the metrics summary; `--out` gets one JSON line per
request (`inlaid.scheduling.metrics.RequestRecord`).
"""

from __future__ import annotations

import argparse
import asyncio
import json


def replay_cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    from inlaid.scheduling.metrics import save_records, summarize
    from inlaid.scheduling.replay import replay_trace
    from inlaid.scheduling.suite import suite_prompts
    from inlaid.scheduling.traces import Trace

    try:
        trace = Trace.load(args.trace)
    except (OSError, ValueError) as error:
        parser.error(f"--trace: {error}")
    records = asyncio.run(replay_trace(args.address, trace, suite_prompts(), args.timeout_s, progress=True))
    if args.out:
        save_records(args.out, records)
    print(json.dumps(summarize(records), indent=1, default=float))


if __name__ == "__main__":
    replay_cli()
