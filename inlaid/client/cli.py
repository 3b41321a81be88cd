"""`inlaid client ...`: quick calls to a running server. Imports no torch.

    inlaid client generate "The capital of France is" --task qa --max-tokens 16 --stream
    inlaid client generate "Hi there" --chat
    inlaid client health | stats | tasks | metrics
    INLAID_ADMIN_TOKEN=... inlaid client add-task sentiment /srv/adapters/sentiment
    INLAID_ADMIN_TOKEN=... inlaid client add-task code /srv/adapters/code --calibration code.jsonl --wait
    INLAID_ADMIN_TOKEN=... inlaid client task-status code
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable

import msgspec

from inlaid.cli_args import MAX_SECONDS
from inlaid.client.messages import MSGPACK_INTEGERS
from inlaid.protocol import REDO_NOT_SERVED, TaskStatusReply
from inlaid.quant.job_effect import JobEffect, TaskEffect, effect_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="server address (default: $INLAID_ADDRESS or tcp://127.0.0.1:5555)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer (default 120)")
    parser.add_argument("--json", action="store_true", help="print replies as JSON")
    # --json is also taken after the action (`task-status code --json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print replies as JSON")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_parser = functools.partial(actions.add_parser, parents=[common])
    generate = add_parser("generate", help="generate text")
    generate.add_argument("prompt")
    generate.add_argument("--task", default=None, help="task (adapter) name; default: the base model")
    generate.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    generate.add_argument("--max-tokens", type=int, default=64, help="default 64")
    generate.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="default 0: off")
    generate.add_argument("--top-p", type=float, default=1.0, help="default 1: off")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--deadline", type=float, default=None, help="server-side deadline in seconds")
    generate.add_argument("--stream", action="store_true",
                          help="print text as it is generated (with --json: one JSON line per chunk as it comes, "
                               "then one for the result)")
    add_parser("health", help="is the server up and its executor ready")
    add_parser("stats", help="server counters and step timings")
    add_parser("tasks", help="list the tasks (adapters) served")
    add_parser("metrics", help="the server's Prometheus metrics (text format)")
    add = add_parser("add-task", help="admin: add a task (needs $INLAID_ADMIN_TOKEN)")
    add.add_argument("name")
    add.add_argument("adapter_dir")
    add.add_argument("--calibration", default=None, metavar="JSONL",
                     help="the task's calibration samples: the server then re-quantizes its base for it")
    add.add_argument("--wait", action="store_true",
                     help="wait until the re-quantization has ended, printing its progress; exit 1 if it failed")
    add.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds --wait waits at most (default 3600)")
    remove = add_parser("remove-task", help="admin: remove a task (needs $INLAID_ADMIN_TOKEN)")
    remove.add_argument("name")
    status = add_parser("task-status", help="admin: a task's re-quantization (needs $INLAID_ADMIN_TOKEN)")
    status.add_argument("name")
    for action in (add, status):
        action.add_argument("--verbose", action="store_true",
                            help="list every linear the quality gate kept as served (default: the first, and how many)")


def _print(message: object, as_json: bool) -> None:
    fields = msgspec.to_builtins(message)
    if as_json or not isinstance(fields, dict):
        print(json.dumps(fields, indent=2))
        return
    for name, value in fields.items():  # one "name: value" line each, nested values as JSON
        if name not in ("type", "request_id"):
            print(f"{name}: {_shown(value)}")


def _shown(value: object) -> str:
    """A value for a person: floats to 4 significant digits (uptime_seconds 30.351641882007243
    read as noise), nested values as JSON with theirs rounded too (--json keeps every digit)."""
    if isinstance(value, float):
        return str(_rounded(value))
    if isinstance(value, (str, int)):
        return str(value)
    return json.dumps(_rounded(value))


def _rounded(value: object) -> object:
    if isinstance(value, float):  # (below 1e4 `.4g` stays positional; NaN and infinities as they are)
        if not math.isfinite(value):
            return value
        return float(f"{value:.4g}") if abs(value) < 1e4 else round(value)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _print_status(status: TaskStatusReply, as_json: bool, verbose: bool = False) -> None:
    if as_json:
        return _print(status, True)
    line = f"{status.name}: {status.phase}"
    if status.version:  # else nothing is re-quantized for it: no layers to count
        line += (f", layers {status.layers_done}/{status.layers_total}, version {status.version} (served up to "
                 f"{status.served_version}), {status.layers_swapped} of its layers served now")
        if status.layers_superseded:  # "30 of 30 swapped in" below is then history
            line += f", {status.layers_superseded} replaced by later versions"
        if status.layers_not_served:
            line += (f", {status.layers_not_served} changed layers not served at its version (a failed swap, or "
                     "a committed file found corrupt or missing at a restart: an older version or the checkpoint's "
                     f"layer serves; {REDO_NOT_SERVED})")
    print(line)
    gated = [kept for kept in status.kept if kept.action != "kept-unchanged"]
    # One line each was ~200 lines for a job on the default model: a count and the first, unless asked
    for kept in gated if verbose else gated[:1]:
        print(f"  kept layer {kept.layer} {kept.linear}: {kept.reason}")
    if len(gated) > 1 and not verbose:
        print(f"  ... and {len(gated) - 1} more linears kept as served by the quality gate (--verbose lists each)")
    if status.message:
        print(f"  {status.message}")
    if status.phase in ("ready", "failed"):  # what the job did to the tasks already served
        effect = JobEffect(status.aggregate_change_median, status.aggregate_change_max,
                           [TaskEffect(e.task, e.error_before, e.error_after) for e in status.task_errors])
        for line in effect_lines(effect if status.aggregate_change_max or status.task_errors else None,
                                 status.change_threshold):
            print(line)


def run(args: argparse.Namespace) -> int:
    from inlaid.client import Client, InlaidError, UnauthorizedError
    from inlaid.client.messages import DEFAULT_ADDRESS

    address = args.address or DEFAULT_ADDRESS
    token = os.environ.get("INLAID_ADMIN_TOKEN")
    for name in ("timeout", "wait_timeout", "deadline"):  # the durations the action takes (deadline: optional)
        value = getattr(args, name, None)
        if value is not None and not 0 < value <= MAX_SECONDS:  # NaN fails this too (it fails every comparison)
            print(f"inlaid client: --{name.replace('_', '-')} must be > 0 and <= {MAX_SECONDS:.0f} seconds, "
                  f"got {value}", file=sys.stderr)
            return 2
    # Each refused before any connection: with no server (or a port nothing can listen on)
    # they waited the whole --timeout first, then said "no answer".
    problem = (_address_problem(args.address, address) or _text_problem(args)
               or (_sampling_problem(args) if args.action == "generate" else None)
               # the server's refusal, said here with `inlaid generate --prompt ""`'s exit code
               or ("the prompt (PROMPT) is empty" if args.action == "generate" and not args.chat and not args.prompt
                   else None))
    if problem:
        print(f"inlaid client: {problem}", file=sys.stderr)
        return 2
    try:
        with Client(address, timeout_s=args.timeout, admin_token=token, client_name="inlaid-cli") as client:
            if args.action == "generate":
                kwargs = dict(task=args.task, max_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                              deadline_s=args.deadline)
                prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
                if args.stream:
                    stream = client.stream(**prompt, **kwargs)
                    line_open = False  # text printed with no newline after it yet
                    try:
                        for chunk in stream:
                            if args.json:  # JSON Lines as they come (--json printed nothing until the end)
                                print(json.dumps(msgspec.to_builtins(chunk)), flush=True)
                            elif chunk.text:
                                print(chunk.text, end="", flush=True)
                                line_open = not chunk.text.endswith("\n")
                    except (InlaidError, KeyboardInterrupt):
                        if line_open:  # the partial text gets its own line; the error (or Ctrl-C's) follows
                            print(flush=True)
                        raise
                    if args.json:
                        print(json.dumps(msgspec.to_builtins(stream.result)), flush=True)
                    else:
                        print()
                else:
                    result = client.generate(**prompt, **kwargs)
                    _print(result, True) if args.json else print(result.text)
            elif args.action == "health":
                _print(client.health(), args.json)
            elif args.action == "stats":
                _print(client.stats(), args.json)
            elif args.action == "tasks":
                tasks = client.list_tasks()
                if args.json:
                    _print(tasks, True)
                for task in tasks if not args.json else []:
                    print(f"{task.name}\t{task.adapter_dir}\t{task.active_requests} active")
            elif args.action == "metrics":
                print(client.metrics(), end="")
            elif args.action == "add-task":
                reply = client.add_task_reply(args.name, os.path.abspath(args.adapter_dir),
                                              os.path.abspath(args.calibration) if args.calibration else None)
                if not args.json:
                    print(reply.message)
                elif not args.wait:
                    _print(reply, True)
                if args.wait:
                    try:
                        final = client.wait_task(args.name, timeout_s=args.wait_timeout, poll_s=1.0,
                                                 on_status=_progress_printer(),
                                                 on_silence=_silence_printer(args.wait_timeout))
                    except KeyboardInterrupt:  # only the wait ends: said, or it read as the add undone
                        print(f"stopped waiting; the server goes on with task {args.name!r} (follow it with "
                              f"`inlaid client task-status {args.name}`)", file=sys.stderr, flush=True)
                        raise
                    if args.json:  # one JSON document on stdout: the add's reply and the wait's end
                        document = {"added": msgspec.to_builtins(reply), "final_status": msgspec.to_builtins(final)}
                        print(json.dumps(document, indent=2))
                    else:
                        _print_status(final, False, args.verbose)
                    if final.phase == "failed":
                        return 1
            elif args.action == "task-status":
                _print_status(client.task_status(args.name), args.json, args.verbose)
            elif args.action == "remove-task":
                reply = client.remove_task_reply(args.name)
                _print(reply, True) if args.json else print(reply.message)
    except InlaidError as error:
        hint = ""
        if isinstance(error, UnauthorizedError) and not token:  # the likeliest cause, said
            hint = f" (INLAID_ADMIN_TOKEN is {'empty' if token == '' else 'not set'}: admin calls send its value)"
        print(f"inlaid client: {error}{hint}", file=sys.stderr)
        return 1
    return 0  # an address ZeroMQ cannot parse raises ZMQError: `inlaid.cli.main` prints it in one line


def _progress_printer():  # type: ignore[no-untyped-def]
    """A line on stderr whenever a waited-for re-quantization moves (phase or layers)."""
    last: list[tuple[str, int]] = []

    def show(status: TaskStatusReply) -> None:
        now = (status.phase, status.layers_done)
        if not last or last[-1] != now:
            last.append(now)
            # layers only for a job's version: "serving, layers 0/30" read as work to come
            layers = f", layers {status.layers_done}/{status.layers_total}" if status.version else ""
            print(f"{status.name}: {status.phase}{layers}", file=sys.stderr, flush=True)

    return show


# generate's integer options: each must fit the wire's integers (msgpack: signed or unsigned
# 64-bit); beyond them the SDK refused it unsent, which exited 1 as if the server had.
_INTEGER_OPTIONS = ("max_tokens", "top_k", "seed")


def _sampling_problem(args: argparse.Namespace) -> str | None:
    """What the server would refuse in `generate`'s sampling options (its own check), or None."""
    from inlaid.protocol import SamplingError, SamplingParams

    for name in _INTEGER_OPTIONS:
        value = getattr(args, name)
        if value is not None and value not in MSGPACK_INTEGERS:
            return f"--{name.replace('_', '-')} must be an integer in [-2**63, 2**64), got {value}"
    try:
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       stop=args.stop).validate()
    except SamplingError as error:
        return f"--{error.field.replace('_', '-')}: {error}"
    return None


def _address_problem(given: str | None, address: str) -> str | None:
    """Why no server can be at `address` (--address, else $INLAID_ADDRESS), or None: the SDK's
    check (`messages.checked_address`: the rule the server's config follows too), said before
    a connection waits the whole --timeout, naming where the address came from."""
    from inlaid.client.messages import checked_address

    try:
        checked_address(address, "--address" if given is not None else "$INLAID_ADDRESS")
    except ValueError as error:
        return str(error)
    return None


# The options and arguments that are sent as text, as the messages name them.
_TEXT_ARGUMENTS = {"prompt": "the prompt (PROMPT)", "task": "--task", "stop": "--stop", "name": "NAME",
                   "adapter_dir": "ADAPTER_DIR", "calibration": "--calibration"}


def _text_problem(args: argparse.Namespace) -> str | None:
    """Which text argument is not valid UTF-8, or None. Python hands over undecodable argv
    bytes as lone surrogates, and the SDK's refusal of those ("'\\udcff' ... is a lone
    surrogate") exited 1 as if the server had refused, naming no argument."""
    for name, label in _TEXT_ARGUMENTS.items():
        value = getattr(args, name, None)
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                return f"{label} is not valid UTF-8 ({_bad_byte(text, error.start)}); pass it in UTF-8"
    return None


def _bad_byte(text: str, index: int) -> str:
    """The first undecodable byte of an argument as the user typed it, when it came from argv."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
        raw.decode("utf-8")
    except UnicodeEncodeError:  # a surrogate argv cannot hold: only a caller of main() passes one
        return f"a lone surrogate at character {index}"
    except UnicodeDecodeError as error:
        return f"byte 0x{raw[error.start]:02x} at byte {error.start}"
    return f"character {index}"


def _silence_printer(wait_timeout_s: float) -> Callable[[float, TaskStatusReply | None], None]:
    """A line on stderr after each poll the server left unanswered: the wait goes on (a server
    restarting mid-wait is waited for), and the user sees why nothing moves and until when."""
    until = time.strftime("%H:%M:%S", time.localtime(time.time() + wait_timeout_s))

    def show(silent_s: float, last: TaskStatusReply | None) -> None:
        known = f"; last known: {last.phase}, layers {last.layers_done}/{last.layers_total}" if last else ""
        print(f"inlaid client: no answer from the server for {silent_s:.0f} s; still waiting until {until} "
              f"(--wait-timeout){known}", file=sys.stderr, flush=True)

    return show
