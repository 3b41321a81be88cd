"""bench/e2e.py's arguments, checked before any server starts: a bad value found after the
servers were started (or, as `--quick --rates 0` did, never) cost minutes or ran a
different benchmark than the one asked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from inlaid.cli_args import writable_dir_problem
from inlaid.engine.config import check_device
from inlaid.scheduling.traces import POPULARITIES


def overrides_problem(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The settings the options override, or the first problem with one (a line to print)."""
    overrides: dict[str, Any] = {}
    for option in ("threads", "rates", "requests"):
        value = getattr(args, option)
        if value is not None:
            if value < 1:
                return {}, f"--{option} must be >= 1, got {value}"
            overrides[option] = value
    if args.task_counts is not None:
        try:
            counts = tuple(int(x) for x in args.task_counts.split(","))
        except ValueError:
            return {}, f"--task-counts must be comma-separated positive integers, got {args.task_counts!r}"
        if not counts or min(counts) < 1:
            return {}, f"--task-counts must be comma-separated positive integers, got {args.task_counts!r}"
        overrides["task_counts"] = counts
    if args.popularities is not None:
        popularities = tuple(args.popularities.split(","))
        unknown = [p for p in popularities if p not in POPULARITIES]
        if unknown:
            return {}, f"--popularities: unknown {', '.join(map(repr, unknown))} (known: {', '.join(POPULARITIES)})"
        overrides["popularities"] = popularities
    if args.device is not None:
        try:
            check_device("--device", args.device)
        except ValueError as error:
            return {}, str(error)
        overrides["device"] = args.device
    return overrides, None


def out_problem(out: Path) -> str | None:
    """Why the report folder cannot be written, or None."""
    return writable_dir_problem(out, "--out")


def render_problem(out: Path) -> str | None:
    """Why `--render` has nothing to render in `out`, or None."""
    for name in ("e2e.json", "records.jsonl"):
        path = out / name
        try:
            text = path.read_text()
        except OSError as error:
            return f"--render: cannot read {path}: {error.strerror or error} (run the benchmark into {out} first)"
        if name == "e2e.json":
            try:
                json.loads(text)
            except ValueError as error:
                return f"--render: {path} is not JSON ({error})"
    return None
