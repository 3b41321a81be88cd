"""`python -m inlaid.scheduling.replay`: replay a trace against a running `inlaid serve`,
open loop, and write one JSON line of timings per request.

    python -m inlaid.scheduling.replay --trace trace.jsonl --address tcp://127.0.0.1:5555 \\
        --out timings.jsonl

The trace is a `bench/traces.py` file (a header line, then one request a line, in arrival
order). Each request is sent at its arrival time whether or not earlier ones were answered.
Prompts are the suite records the trace names (rebuilt with --model's tokenizer), or with
--synthetic-prompts token ids of each request's prompt length (any trace, no suite needed).

Before any request is sent: the trace is read and checked, --out is checked writable, the
server must answer and be ready within --ready-timeout-s and serve every task the trace
names. Each of these is a one-line error with exit status 2. --out gets one JSON line per
request (`inlaid.scheduling.metrics.RequestRecord`: arrival, first scheduled, every token's
time, finish, in seconds from the replay's start; `error` for a failed request); the summary
is printed as strict JSON. Exit status: 0; 1 when every request failed; 2 as above.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from inlaid.cli_args import MAX_SECONDS, positive_float, writable_file_problem
from inlaid.client.messages import checked_address
from inlaid.scheduling.replay import DEFAULT_READY_TIMEOUT_S
from inlaid.scheduling.traces import Trace

# Token ids of --synthetic-prompts: ordinary ids in every tokenizer the server loads (the
# suite's 135M model has 49,152), cycled so a prompt is not one token repeated.
_SYNTHETIC_TOKEN_IDS = tuple(range(1000, 1100))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inlaid.scheduling.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", required=True, help="the trace (JSON lines: bench/traces.py's format)")
    parser.add_argument("--address", required=True, help="the server's address, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--out", default=None,
                        help="per-request timings, one JSON line each (missing folders are created)")
    parser.add_argument("--ready-timeout-s", type=_seconds, default=DEFAULT_READY_TIMEOUT_S,
                        help="how long to wait for the server to answer and be ready (default %(default)g s)")
    parser.add_argument("--timeout-s", type=_seconds, default=3600.0,
                        help="the longest one request may take (default %(default)g s)")
    parser.add_argument("--model", default=None,
                        help="model directory whose tokenizer rebuilds the suite prompts (default: the default model)")
    parser.add_argument("--synthetic-prompts", action="store_true",
                        help="send each request a prompt of its trace length in plain token ids instead of the "
                             "suite record it names")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every request runs to its max_tokens (a model with random weights)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    return parser


def _seconds(text: str) -> float:
    value = positive_float(text)
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:g} seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every input is checked before anything is sent: timings lost at the end of a long
    # replay to an unwritable --out cost the whole run.
    problem = writable_file_problem(Path(args.out), "--out") if args.out else None
    if problem:
        return _refuse(problem)
    try:
        trace = Trace.load(args.trace)
    except OSError as error:
        return _refuse(f"--trace: cannot read {args.trace}: {error.strerror or error}")
    except ValueError as error:  # names the file and the line
        return _refuse(f"--trace: {error}")
    try:
        checked_address(args.address)
    except ValueError as error:
        return _refuse(f"--address: {error}")
    if args.synthetic_prompts:
        trace, prompts = synthetic_prompts(trace)
    else:
        from inlaid.scheduling.suite import suite_prompts

        try:
            prompts = suite_prompts(args.model)
        except (OSError, ValueError) as error:
            return _refuse(f"--model: cannot rebuild the suite prompts: {error} (or use --synthetic-prompts)")
        unknown = sorted({request.source for request in trace.requests if request.source not in prompts})
        if unknown:
            return _refuse(f"{len(unknown)} trace source(s) are no suite record, e.g. {unknown[:3]}: this trace "
                           "was not drawn from the suite; replay it with --synthetic-prompts")
    return _replay(args, trace, prompts)


def synthetic_prompts(trace: Trace) -> tuple[Trace, dict[str, list[int]]]:
    """The trace with a source of its own for every request, and for each a prompt of the
    request's length."""
    requests = [dataclasses.replace(request, source=f"synthetic-{index}")
                for index, request in enumerate(trace.requests)]
    prompts = {request.source: [_SYNTHETIC_TOKEN_IDS[i % len(_SYNTHETIC_TOKEN_IDS)]
                                for i in range(max(1, request.prompt_tokens))] for request in requests}
    return Trace(requests, trace.tasks, trace.meta), prompts


def _replay(args: argparse.Namespace, trace: Trace, prompts: dict[str, list[int]]) -> int:
    from inlaid.scheduling.metrics import json_safe, save_records, summarize
    from inlaid.scheduling.replay import ReplaySetupError, replay_trace

    try:
        records = asyncio.run(replay_trace(args.address, trace, prompts, args.timeout_s, progress=args.progress,
                                           ignore_eos=args.ignore_eos, ready_timeout_s=args.ready_timeout_s))
    except ReplaySetupError as error:
        return _refuse(str(error))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_records(args.out, records)
    print(json.dumps(json_safe(summarize(records)), indent=1, allow_nan=False))
    failed = [record for record in records if not record.finished]
    if len(failed) == len(records):
        print(f"replay: all {len(records)} requests failed, e.g. {failed[0].error}", file=sys.stderr)
        return 1
    return 0


def _refuse(message: str) -> int:
    print(f"replay: {message}", file=sys.stderr)
    return 2
