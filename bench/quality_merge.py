"""bench/quality.py's report as it grows: the report a --merge run extends, the results of
other runs (--merge-from) copied in, and what a configuration still lacks per method (so an
interrupted or extended run measures only that)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _report_on_terms(path: Path, terms: dict, option: str) -> dict:
    """The report at `path`; refuses (naming `option`) one measured on other terms."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"{option}: {path} is not a readable report ({error}); move it aside or run without "
                         f"{option}") from None
    if not isinstance(report, dict) or not all(isinstance(report.get(key), kind) for key, kind in
                                               (("methods", list), ("configs", dict))):
        raise SystemExit(f"{option}: {path} is not a report of bench/quality.py (no methods list and configs "
                         f"table); move it aside or run without {option}")
    differing = {k: (report.get(k), v) for k, v in terms.items() if report.get(k) != v}
    if differing:
        raise SystemExit(f"{option}: {path} was measured with other settings (theirs, ours): {differing}")
    return report


def previous_report(out: Path, merge: bool, terms: dict) -> dict | None:
    """The report at --out when --merge asks to extend it; refuses one measured on other terms."""
    if not merge or not out.is_file():
        return None
    return _report_on_terms(out, terms, "--merge")


def merge_from(report: dict, others: list[Path], terms: dict) -> None:
    """Copy into `report` every method result of `others` it does not hold yet."""
    for path in others:
        other = _report_on_terms(path, terms, "--merge-from")
        report["methods"] += [m for m in other["methods"] if m not in report["methods"]]
        report.setdefault("variants", {}).update(other.get("variants", {}))
        for label, block in other["configs"].items():
            target = report["configs"].setdefault(label, {})
            for key, per_method in block.items():
                for method, value in per_method.items():
                    target.setdefault(key, {}).setdefault(method, value)


def missing(block: dict, method: str, tasks: list[str], args: argparse.Namespace) -> list[str]:
    """What `block` still lacks for `method`: 'errors', 'nll', 'generate'."""
    wanted = ["errors"] if method != "unquantized" else []
    if not args.errors_only:
        wanted += args.metrics
    keys = {"errors": "errors", "nll": "nll", "generate": "generation"}
    lacking = []
    for item in wanted:
        held = block[keys[item]].get(method, {})
        # One error figure for a joint method; per-task GPTQ and the metrics hold one per task.
        complete = bool(held) if item == "errors" and method != "per-task" else set(held) == set(tasks)
        if not complete:
            lacking.append(item)
    return lacking
