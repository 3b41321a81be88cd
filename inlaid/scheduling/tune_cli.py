"""`inlaid tune-scheduler`: choose the inlaid policy's options on a fitted cost model and
print the comparison (what a server with `[scheduler] autotune_cost_model` does at start)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from inlaid.cli_args import fraction, positive_int, writable_file_problem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost-model", required=True, help="a StepCostModel JSON (bench/sched_cost.py writes it)")
    parser.add_argument("--config", default=None,
                        help="a server TOML: its task count, [executor] limits and explicit [scheduler] options")
    parser.add_argument("--tasks", type=positive_int, default=None, help="task count (default: the config's, else 9)")
    parser.add_argument("--slots", type=positive_int, default=None,
                        help="adapter slots (default: the config's, else 8)")
    parser.add_argument("--requests", type=positive_int, default=200, help="requests per simulated workload")
    parser.add_argument("--load", type=fraction, default=0.8, help="fraction of FIFO's saturation, in (0, 1]")
    parser.add_argument("--lengths", default=None,
                        help="recorded requests the workloads draw from (inlaid/scheduling/suite.py's JSONL; "
                             "default: the config's scheduler.autotune_lengths or its base's suite lengths, "
                             "else the fp32 model's)")
    parser.add_argument("--json", default=None, help="also write every score and simulation here")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from inlaid.scheduling.autotune import (MAX_TUNING_REQUESTS, MAX_TUNING_TASKS, MIN_TUNING_REQUESTS,
                                            explain_choice, load_cost_model, tune_inlaid_options)
    from inlaid.scheduling.simulator import EngineShape

    from inlaid.scheduling.suite import SUITE_LENGTHS_FILE

    from inlaid.engine.config import EngineConfig

    # without --config: a default CPU server's limits (its cap on prompt tokens beside decodes)
    shape, tasks, explicit = EngineShape.of(EngineConfig(model_dir="")), 9, {}
    lengths = str(SUITE_LENGTHS_FILE)
    if not MIN_TUNING_REQUESTS <= args.requests <= MAX_TUNING_REQUESTS:  # named now, before any progress line
        return _refuse(f"--requests must be from {MIN_TUNING_REQUESTS} to {MAX_TUNING_REQUESTS} (requests per "
                       f"simulated workload), got {args.requests}")
    problem = writable_file_problem(Path(args.json), "--json") if args.json else None
    if problem:  # found now, not after the whole tuning ran
        return _refuse(problem)
    if args.config:
        from inlaid.serve.config import ConfigError, load_config

        try:
            config = load_config(args.config, admin_token=False)  # it makes no admin call
        except ConfigError as error:
            return _refuse(str(error))
        if config.policy != "inlaid":  # as the server refuses autotune_cost_model for it
            if not _sets_policy(args.config):
                return _refuse(f"it tunes the inlaid policy; {args.config} sets no server.policy, and the default "
                               "is fifo: set policy = \"inlaid\" in its [server]")
            return _refuse(f"it tunes the inlaid policy; {args.config} has server.policy = {config.policy!r}")
        shape = EngineShape.of(config.planning_engine())
        tasks, explicit = max(1, len(config.tasks)), {k: v for k, v in config.scheduler.items() if k != "step_log"}
        problem = _server_predictor_problem(explicit)
        if problem:
            return _refuse(problem)
        lengths = config.tuning_lengths_file()
    lengths = args.lengths or lengths
    if args.slots is not None:
        shape.max_lora_slots = args.slots
    tasks = args.tasks if args.tasks is not None else tasks
    if tasks > MAX_TUNING_TASKS:  # named now, before the cost model and lengths load
        return _refuse(f"--tasks must be <= {MAX_TUNING_TASKS} (tasks of the simulated server), got {tasks}")
    try:
        cost = load_cost_model(args.cost_model, shape.max_num_seqs)
    except ValueError as error:
        return _refuse(str(error))
    from tqdm import tqdm

    bars: list[Any] = []  # made at the first simulation's end: an input error before it shows no bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="simulate", unit="run", total=total))
        bars[0].update(1)

    failure = None
    try:
        result = tune_inlaid_options(cost, shape, tasks, explicit, requests=args.requests, load=args.load,
                                     progress=progress, lengths_file=lengths)
    except (OSError, ValueError) as error:
        failure = str(error)  # said after the bar closed: the message must not share its line
    finally:
        # Ctrl-C too: left open, the bar was redrawn when it was collected after inlaid/cli.py
        # printed "interrupted", so the bar was the last line and the message hidden in it.
        for bar in bars:
            bar.close()
    if failure is not None:
        return _refuse(failure)
    print(f"{tasks} tasks, {shape.max_lora_slots} adapter slots, {args.requests} requests a workload, "
          f"{args.load:.0%} of FIFO's saturation; lengths: {lengths}; "
          f"cost model: {cost.description or args.cost_model}\n")
    print(result.table())
    print(f"\nchosen: {result.chosen.label}; [scheduler] options: {json.dumps({**result.chosen.options, **explicit})}")
    print("\n".join(explain_choice(result)))
    best = min(score.jct_geomean for score in result.scores)
    if best > 1.005:  # every option set loses to FIFO (past a tie's rounding): say so, do not just pick
        print(f"note: every option set's mean JCT (geometric mean over the workloads) is above FIFO's, the best "
              f"{best:.3f}x: on this machine and load, [scheduler] policy = \"fifo\" may serve better "
              "(docs/scheduling.md, Limits)")
    if args.json:
        path = Path(args.json).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # as writable_file_problem promised above
            with open(path, "w") as file:
                json.dump({"chosen": result.chosen.label, "scores": [asdict(s) for s in result.scores],
                           "runs": result.runs}, file, indent=1)
        except OSError as error:  # the disk filled, or the folder went, during the tuning
            return _refuse(f"--json {path}: {error.strerror or error}")
    return 0


def _server_predictor_problem(explicit: dict[str, Any]) -> str | None:
    """The server's own refusal of the config's length predictor (`registry.build_length_model`:
    'exact' is the simulator's oracle), or None. The tuning's simulations replace the predictor,
    so without this a config `inlaid serve` refuses was tuned with the oracle and exited 0."""
    from inlaid.scheduling.autotune import SERVER_LEARNING_OPTIONS
    from inlaid.scheduling.registry import build_length_model, parse_options

    try:  # without the state file: load_config checked it, and nothing here learns into it
        build_length_model(parse_options("inlaid", {k: v for k, v in explicit.items()
                                                     if k not in SERVER_LEARNING_OPTIONS}))
    except ValueError as error:
        return f"[scheduler]: {error}"
    return None


def _sets_policy(config_path: str) -> bool:
    """Whether the TOML names a server.policy (else the server runs its default, fifo)."""
    import tomllib

    try:
        with open(config_path, "rb") as file:
            server = tomllib.load(file).get("server", {})
    except (OSError, ValueError):  # load_config read it already; say the policy as it found it
        return True
    return isinstance(server, dict) and "policy" in server


def _refuse(message: str) -> int:
    print(f"inlaid tune-scheduler: {message}", file=sys.stderr)
    return 2
