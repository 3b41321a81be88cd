"""`inlaid eval`: score a model (and adapters) on tasks with greedy decoding.

One task with one adapter:
    inlaid eval --task sentiment --adapter adapters/sentiment
The suite (every task with its adapter from `adapters/<task>`, and the base beside it when
`--with-base`), all requests in one mixed-task generation call:
    inlaid eval --suite --with-base --out results.json --markdown table.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from inlaid.cli_args import positive_int
from inlaid.interrupts import EXIT_TERMINATED
from inlaid.tasks.base import Task, write_text_atomic
from inlaid.tasks.checks import adapter_problem, base_model_warnings, task_mismatch_warnings
from inlaid.tasks.eval_plan import BASE, EvalRun, argument_problem, planned_runs
from inlaid.tasks.generation import (GenerationError, GenerationInterrupted, GenerationRequest, GenerationResult,
                                     chat_prompt)

__all__ = ["BASE", "EvalRun", "evaluate_runs", "markdown_table", "merge_results"]


class AdapterInputError(ValueError):
    """An adapter the engine could not serve on this base model (named in the message)."""


def length_stats(counts: list[int]) -> dict[str, float]:
    import numpy as np

    values = np.asarray(counts, dtype=np.float64)
    if values.size == 0:
        return {}
    return {
        "count": int(values.size), "mean": float(values.mean()), "min": int(values.min()),
        "p25": float(np.percentile(values, 25)), "p50": float(np.percentile(values, 50)),
        "p75": float(np.percentile(values, 75)), "p90": float(np.percentile(values, 90)),
        "max": int(values.max()),
    }


def evaluate_runs(model_dir: Path, runs: list[EvalRun], split: str = "eval", limit: int | None = None,
                  backend: str = "auto", batch_size: int = 16, dtype: str = "auto",
                  weight_dtype: str = "auto") -> dict:
    """Generate for every run in one call, then score each run with its task's metric.

    Every adapter is first checked as a server checks one (AdapterInputError, before the
    model loads): an adapter the engine cannot serve made each of its requests fail inside
    the engine, and the empty outputs were scored (accuracy 0, exit 0, "" in --out).

    Ctrl-C during generation returns what finished: `partial` holds how many of how many
    requests, and each run is scored on its finished examples."""
    named = {run.adapter_name: run.adapter_dir for run in runs
             if run.adapter_name is not None and run.adapter_dir is not None}
    problem = adapter_problem(model_dir, named)
    if problem:
        raise AdapterInputError(problem)
    for warning in base_model_warnings(model_dir, named):  # after the check: it says "served"
        print(f"inlaid eval: warning: {warning}", file=sys.stderr)
    for warning in task_mismatch_warnings([(run.task, run.adapter_dir) for run in runs if run.adapter_dir is not None]):
        print(f"inlaid eval: warning: {warning}", file=sys.stderr)
    from transformers import AutoTokenizer

    from inlaid.tasks import get_task
    from inlaid.tasks.generation import engine_available, generate_with_engine, generate_with_peft

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    adapters: dict[str, Path] = {}
    requests: list[GenerationRequest] = []
    spans: list[tuple[EvalRun, Task, list[dict], int, int]] = []
    for run in runs:
        task = get_task(run.task)
        examples = task.load_split(split)[:limit]
        if run.adapter_name is not None:
            if run.adapter_dir is None or not (run.adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"adapter '{run.adapter_name}': no adapter_config.json in {run.adapter_dir}")
            adapters[run.adapter_name] = run.adapter_dir
        start = len(requests)
        requests.extend(
            GenerationRequest(chat_prompt(tokenizer, e["messages"]), run.adapter_name, task.max_new_tokens)
            for e in examples
        )
        spans.append((run, task, examples, start, len(requests)))

    if backend == "auto":
        backend = "engine" if engine_available() else "peft"
    started = time.time()
    partial: dict | None = None
    try:
        if backend == "engine":
            outputs: list[GenerationResult | None] = list(
                generate_with_engine(model_dir, adapters, requests, dtype=dtype, weight_dtype=weight_dtype))
        elif backend == "peft":
            outputs = list(generate_with_peft(model_dir, adapters, requests, batch_size=batch_size))
        else:
            raise ValueError(f"unknown backend '{backend}' (engine, peft or auto)")
    except GenerationInterrupted as interrupted:
        outputs = interrupted.results
        partial = {"finished": sum(o is not None for o in outputs), "requests": len(outputs),
                   "stopped_by": "SIGTERM" if interrupted.terminated else "SIGINT"}
    seconds = time.time() - started

    # the engine's "auto" resolved; peft runs float32 (and may be chosen because the engine cannot import)
    described = _engine_dtypes(dtype, weight_dtype) if backend == "engine" else "float32"
    results: dict = {"backend": backend, "dtype": described, "model": str(model_dir),
                     "split": split, "seconds": round(seconds, 1),
                     "generated_tokens": sum(o.num_tokens for o in outputs if o is not None), "tasks": {}}
    if partial is not None:
        results["partial"] = partial
    for run, task, all_examples, start, end in spans:  # the task as read above (a file's, once)
        # Interrupted: each run is scored on its finished examples alone (none: no row).
        kept = [(e, o) for e, o in zip(all_examples, outputs[start:end]) if o is not None]
        if not kept:
            continue
        examples = [e for e, _ in kept]
        produced: list[GenerationResult] = [o for _, o in kept]
        scores = task.metric([o.text for o in produced], examples)
        results["tasks"].setdefault(task.name, {})[run.adapter_name or BASE] = {  # NAME of NAME=PATH
            "adapter_dir": str(run.adapter_dir) if run.adapter_dir else None,
            "backend": results["backend"],
            "dtype": results["dtype"],
            "primary_metric": task.primary_metric,
            "scores": scores,
            "examples": len(examples),
            **({"of_examples": len(all_examples)} if len(examples) < len(all_examples) else {}),
            "output_tokens": length_stats([o.num_tokens for o in produced]),
            "stopped_by_budget": sum(o.finish_reason == "length" for o in produced),
            "predictions": [{"id": e["id"], "text": o.text, "tokens": o.num_tokens} for e, o in zip(examples, produced)],
        }
    return results


def _engine_dtypes(dtype: str, weight_dtype: str) -> str:
    """What the engine ran in, "auto" resolved as its runner resolves it (the reports and
    adapters/MANIFEST.json said "auto", not float32)."""
    import torch

    from inlaid.engine import EngineConfig
    from inlaid.engine.runner import resolve_dtype

    device = torch.device(EngineConfig.device)  # generate_with_engine's engine runs on the default device
    activations = resolve_dtype(dtype, device)
    weights = activations if weight_dtype == "auto" else resolve_dtype(weight_dtype, device)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return name[activations] if weights == activations else f"{name[activations]} activations, {name[weights]} weights"


def merge_results(parts: list[dict]) -> dict:
    """One results dict from several runs (later runs win for the same task and config)."""
    merged: dict = {"model": parts[0]["model"], "split": parts[0]["split"], "tasks": {}}
    for part in parts:
        for task_name, configs in part["tasks"].items():
            merged["tasks"].setdefault(task_name, {}).update(configs)
    return merged


def markdown_table(results: dict) -> str:
    """Base vs adapter per task, on the task's primary metric."""
    from inlaid.tasks import TASK_NAMES

    lines = [
        "| task | metric | n | base | adapter | gain | output tokens base: p50 / p90 / max | with adapter: p50 / p90 / max | engine dtype |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # the suite's in suite order, then tasks of one's own (NAME=PATH) in the results' order: they had no row
    ordered = [name for name in TASK_NAMES if name in results["tasks"]]
    ordered += [name for name in results["tasks"] if name not in TASK_NAMES]
    for task_name in ordered:
        configs = results["tasks"][task_name]
        base = configs.get(BASE)
        tuned_names = [k for k in configs if k != BASE]
        # One row per adapter (a task evaluated with two adapters kept only the first's row);
        # the adapter's name shows beside the task where the task has more than one.
        for adapter_key in tuned_names or [None]:
            tuned = configs.get(adapter_key) if adapter_key else None
            label = f"{task_name} ({adapter_key})" if len(tuned_names) > 1 else task_name
            lines.append(_table_row(label, base, tuned))
    return "\n".join(lines) + "\n"


def _table_row(label: str, base: dict | None, tuned: dict | None) -> str:
    reference = tuned or base
    assert reference is not None
    metric = reference["primary_metric"]
    base_score = f"{base['scores'][metric]:.1f}" if base else "–"
    tuned_score = f"{tuned['scores'][metric]:.1f}" if tuned else "–"
    gain = f"{tuned['scores'][metric] - base['scores'][metric]:+.1f}" if base and tuned else "–"

    def spread(entry: dict | None) -> str:
        if not entry:
            return "–"
        lengths = entry["output_tokens"]
        return f"{lengths['p50']:.0f} / {lengths['p90']:.0f} / {lengths['max']}"

    return (f"| {label} | {metric} | {reference['examples']} | {base_score} | {tuned_score} | {gain} | "
            f"{spread(base)} | {spread(tuned)} | {reference.get('dtype', '?')} |")


# Metrics that are shares of the examples (metrics.py); the others (f1, rouge*, bleu, chrf)
# are scores on their own 0-100 scale, which a % sign misread as a share ("bleu=10.90%").
SHARE_METRICS = frozenset({"exact_match", "contains_answer", "accuracy", "unparsed"})


def _shown_score(metric: str, value: float) -> str:
    return f"{metric}={value:.2f}%" if metric in SHARE_METRICS else f"{metric}={value:.2f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model directory, or a checkpoint of `inlaid quantize` "
                                                        "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--task", action="append",
                        help="task to evaluate (repeatable; with --suite default all): a task of the suite, or one "
                             "of your own as NAME=PATH.jsonl (docs/tasks.md)")
    parser.add_argument("--adapter", action="append", default=None,
                        help="adapter directory, one per --task in the same order (omit all: base model)")
    parser.add_argument("--suite", action="store_true", help="each task with its adapter from --adapters-dir")
    parser.add_argument("--adapters-dir", default="adapters")
    parser.add_argument("--with-base", action="store_true", help="also evaluate the base model on each task")
    parser.add_argument("--split", default="eval", choices=["eval", "calib", "train"])
    parser.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task")
    parser.add_argument("--backend", default="auto", choices=["auto", "engine", "peft"])
    parser.add_argument("--batch-size", type=positive_int, default=16, help="peft backend batch size")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="engine activations/weights (auto: float32 on the CPU)")
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="engine dense weights and lm_head (auto: as --dtype; bfloat16: faster on the CPU)")
    parser.add_argument("--out", default=None, help="write the full results (predictions too) as JSON")
    parser.add_argument("--markdown", default=None, help="write the base-vs-adapter table as Markdown")


def run(args: argparse.Namespace) -> int:
    from inlaid.models.prepare import default_model_dir
    from inlaid.tasks import TASK_NAMES, get_task
    from inlaid.tasks.custom import FileTask

    model_dir = Path(args.model) if args.model else default_model_dir()
    tasks = args.task or (list(TASK_NAMES) if args.suite else None)
    if not tasks:  # a usage error, as argparse's own (it exited 1)
        print("inlaid eval: give --task NAME (repeatable) or --suite", file=sys.stderr)
        return 2
    given: dict[str, tuple[str, str]] = {}  # name -> (spec, its file or the suite's name)
    for spec in tasks:
        task = get_task(spec)
        source = os.path.realpath(task.path) if isinstance(task, FileTask) else spec  # NAME=PATH: its file
        first = given.setdefault(task.name, (spec, source))
        if first[1] != source:  # one row per name: the second file's scores replaced the first's
            print(f"inlaid eval: two tasks named {task.name!r} ({first[0]}, {spec}); give each its own name",
                  file=sys.stderr)
            return 2
    problem = argument_problem(args)
    if problem:
        print(f"inlaid eval: {problem}", file=sys.stderr)
        return 2
    runs = planned_runs(args, tasks)
    try:
        results = evaluate_runs(model_dir, runs, split=args.split, limit=args.limit, backend=args.backend,
                                batch_size=args.batch_size, dtype=args.dtype, weight_dtype=args.weight_dtype)
    except AdapterInputError as error:  # found before the model loaded
        print(f"inlaid eval: {error}", file=sys.stderr)
        return 2
    except GenerationError as error:
        print(f"inlaid eval: {error}", file=sys.stderr)
        return 1
    for task_name, configs in results["tasks"].items():
        for config_name, entry in configs.items():
            scores = ", ".join(_shown_score(k, v) for k, v in entry["scores"].items())
            print(f"{task_name:14s} {config_name:14s} n={entry['examples']:<4d} {scores}")
    # (interrupted: the tokens of the finished predictions, not of the ones cut off: "tokens=0"
    # after a progress bar at 32 tokens read as a miscount)
    counted = " (of the finished predictions)" if results.get("partial") is not None else ""
    print(f"backend={results['backend']} seconds={results['seconds']} tokens={results['generated_tokens']}{counted}")
    written = []
    # `~` as the checks read it (--out=~/r.json: no shell expands it); each file whole or not at all
    if args.out:
        write_text_atomic(Path(args.out).expanduser(), json.dumps(results, indent=1, ensure_ascii=False))
        written.append(args.out)
    if args.markdown and results["tasks"]:
        write_text_atomic(Path(args.markdown).expanduser(), markdown_table(results))
        written.append(args.markdown)
    partial = results.get("partial")
    if partial is None:
        return 0
    # Ctrl-C: what finished is kept (it was all thrown away), and the line says so.
    kept = f"wrote them (partial) to {' and '.join(written)}" if written else "none written (no --out or --markdown)"
    terminated = partial.get("stopped_by") == "SIGTERM"
    print(f"inlaid eval: {'terminated (SIGTERM)' if terminated else 'interrupted'}: {partial['finished']} of "
          f"{partial['requests']} predictions finished; {kept}", file=sys.stderr)
    return EXIT_TERMINATED if terminated else 130
