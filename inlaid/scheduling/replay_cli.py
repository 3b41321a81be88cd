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
is printed as strict JSON; its makespan is the wall time from the first arrival to the end.
A lost connection fails every request not yet answered at once (no more is sent). Ctrl-C or
SIGTERM stops the replay: `replay: interrupted`, the records so far and the summary
(`partial`, `stopped`) are still written. Exit status: 0 when every request succeeded; 1 when
any failed; 2 as above; 130 on SIGINT (143 on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from inlaid.cli_args import MAX_SECONDS, positive_float, writable_file_problem
from inlaid.client.messages import checked_address
from inlaid.scheduling.replay import DEFAULT_READY_TIMEOUT_S
from inlaid.scheduling.traces import Trace

if TYPE_CHECKING:
    from inlaid.engine.tokenizer import Tokenizer
    from inlaid.scheduling.metrics import RequestRecord
    from inlaid.scheduling.replay import Replay

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
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before or after the replay itself (which handles its own signals)
        print("replay: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every input is checked before anything is sent: timings lost at the end of a long
    # replay to an unwritable --out cost the whole run.
    problem = writable_file_problem(Path(args.out), "--out") if args.out else None
    if problem:
        return _refuse(problem)
    if args.out and os.path.exists(args.out) and os.path.exists(args.trace) and os.path.samefile(args.out, args.trace):
        return _refuse(f"--out {args.out} is the --trace file: the timings would replace the trace; give another path")
    try:
        trace = Trace.load(args.trace)
    except OSError as error:
        return _refuse(f"--trace: cannot read {args.trace}: {error.strerror or error}")
    except ValueError as error:  # names the file and the line
        return _refuse(f"--trace: {error}")
    try:
        checked_address(args.address, "--address")
    except ValueError as error:
        return _refuse(str(error))
    if args.synthetic_prompts:
        trace, prompts = synthetic_prompts(trace)
    else:
        from inlaid.scheduling.suite import suite_prompts

        tokenizer, problem = _load_tokenizer(args.model)
        if problem:
            return _refuse(f"--model: {problem} (or use --synthetic-prompts)")
        try:
            prompts = suite_prompts(tokenizer=tokenizer)  # the tokenizer the check loaded
        except (OSError, ValueError) as error:
            return _refuse(f"--model: cannot rebuild the suite prompts: {error} (or use --synthetic-prompts)")
        unknown = sorted({request.source for request in trace.requests if request.source not in prompts})
        if unknown:
            return _refuse(f"{len(unknown)} trace source(s) are no suite record, e.g. {unknown[:3]}: this trace "
                           "was not drawn from the suite; replay it with --synthetic-prompts")
    return _replay(args, trace, prompts)


def _load_tokenizer(model: str | None) -> tuple[Tokenizer | None, str | None]:
    """--model's tokenizer (None: the default model's), or why it cannot be loaded: a missing
    folder and a malformed tokenizer.json ended in a traceback (the tokenizers library raises
    a bare Exception)."""
    from inlaid.engine.tokenizer import Tokenizer

    if model is not None and not Path(model).is_dir():
        return None, f"{model} is not a directory"
    if model is None:
        from inlaid.models.prepare import default_model_dir

        model = str(default_model_dir())
    try:
        return Tokenizer(model), None
    except Exception as error:  # noqa: BLE001 - ModelLoadError, OSError, the tokenizers library's Exception
        return None, f"cannot load the tokenizer of {model}: {type(error).__name__}: {error}"


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
    from inlaid.scheduling.replay import Replay, ReplaySetupError

    span_s = trace.requests[-1].arrival_s - trace.requests[0].arrival_s
    if span_s > 3600:  # a trace of hours (a tiny --rate) otherwise looks like a hung replay
        print(f"replay: the trace's arrivals span {span_s / 3600:.3g} h ({len(trace.requests)} requests)",
              file=sys.stderr)
    try:
        replay = Replay(args.address, trace, prompts, args.timeout_s, progress=args.progress,
                        ignore_eos=args.ignore_eos, ready_timeout_s=args.ready_timeout_s)
        records, signum = asyncio.run(_run_until_signal(replay))
    except ReplaySetupError as error:
        return _refuse(str(error))
    summary = summarize(records)
    # The replay's wall time, not the span of its finished requests: after a lost connection
    # or an interrupt that span flattered throughput (and all-failed gave a 1e-9 s sentinel).
    wall_s = replay.wall_s
    summary["makespan_s"] = wall_s
    summary["throughput_rps"] = summary["finished"] / wall_s if wall_s else None
    summary["throughput_tokens_s"] = (sum(len(r.token_times) for r in records if r.finished) / wall_s
                                      if wall_s else None)
    not_sent = sum(record.error.startswith("not sent") for record in records)
    summary.update(partial=bool(replay.stopped), stopped=replay.stopped or None, not_sent=not_sent)
    if signum is not None:
        print("replay: interrupted", file=sys.stderr)
    elif replay.stopped:
        print(f"replay: {replay.stopped}: the {not_sent} requests not yet sent failed at once", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_records(args.out, records)
    print(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    if signum is not None:
        return 128 + signum
    failed = [record for record in records if not record.finished]
    if failed:
        count = f"all {len(records)}" if len(failed) == len(records) else f"{len(failed)} of {len(records)}"
        print(f"replay: {count} requests failed (exit status 1), e.g. {failed[0].error}", file=sys.stderr)
        return 1
    return 0


async def _run_until_signal(replay: "Replay") -> tuple[list[RequestRecord], int | None]:
    """The replay's records, and the signal (SIGINT, SIGTERM) that stopped it or None: a
    signal stops the replay and its records so far are kept, with no traceback."""
    loop = asyncio.get_running_loop()
    caught: list[int] = []

    def on_signal(signum: int) -> None:
        caught.append(signum)
        replay.stop(f"interrupted ({signal.Signals(signum).name})")

    # A signal ignored at start (`nohup`, a background job) stays ignored.
    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        records = await replay.run()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return records, (caught[0] if caught else None)


def _refuse(message: str) -> int:
    print(f"replay: {message}", file=sys.stderr)
    return 2
