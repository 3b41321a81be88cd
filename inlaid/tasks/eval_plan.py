"""What `inlaid eval` will run, found before the model loads: its (task, adapter) runs, each
adapter under a name of its own, and the argument problems that make it a usage error.
Torch-free."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from inlaid.cli_args import model_dir_problem, writable_file_problem
from inlaid.tasks.custom import split_task_spec

BASE = "base"


@dataclass
class EvalRun:
    task: str
    adapter_name: str | None     # None: the base model alone
    adapter_dir: Path | None


def planned_runs(args: argparse.Namespace, tasks: list[str]) -> list[EvalRun]:
    """The runs, once each: a (task, adapter) pair given twice is evaluated once, and every
    adapter directory gets a name no other directory has (see `_adapter_names`)."""
    pairs: list[tuple[str, Path | None]] = []
    if args.suite:
        for name in tasks:
            # a task of one's own (NAME=PATH): its adapter is the folder of its NAME
            adapter_dir = Path(args.adapters_dir) / (split_task_spec(name) or (name, ""))[0]
            has_adapter = (adapter_dir / "adapter_config.json").is_file()
            if has_adapter:
                pairs.append((name, adapter_dir))
            else:
                print(f"no adapter for {name} in {args.adapters_dir}; base only", file=sys.stderr)
            if args.with_base or not has_adapter:
                pairs.append((name, None))
    else:
        adapters = args.adapter or [None] * len(tasks)
        for name, adapter in zip(tasks, adapters):
            if adapter:
                pairs.append((name, Path(adapter)))
            if args.with_base or not adapter:
                pairs.append((name, None))
    names = _adapter_names([path for _, path in pairs if path is not None])
    runs: list[EvalRun] = []
    seen: set[tuple[str, str | None]] = set()
    for task, path in pairs:
        name = names[_identity(path)] if path is not None else None
        if (task, name) in seen:  # the same pair twice: one row, generated once
            continue
        seen.add((task, name))
        runs.append(EvalRun(task, name, path))
    return runs


def _identity(path: Path) -> str:
    return os.path.realpath(path)


def _adapter_names(paths: list[Path]) -> dict[str, str]:
    """{directory: name}: its folder's name, or `<name>-2`, `-3`, ... where that name is
    another directory's already (or is 'base', the base model's row). The engine serves
    adapters by name: two directories under one name (`/a/math`, `/b/math`) served every
    request with one of them, and their results shared a row."""
    names: dict[str, str] = {}
    taken = {BASE}
    for path in paths:
        key = _identity(path)
        if key in names:
            continue
        stem = Path(path).name or Path(key).name or "adapter"  # as given (a symlink keeps its name)
        name, suffix = stem, 2
        while name in taken:
            name, suffix = f"{stem}-{suffix}", suffix + 1
        if name != stem:
            print(f"inlaid eval: adapter {path} is named {name!r} in the results (another adapter is {stem!r})",
                  file=sys.stderr)
        names[key] = name
        taken.add(name)
    return names


def _gptq_checkpoint(model: Path) -> bool:
    """`is_gptq_checkpoint`, False where config.json cannot be read (the model load says why)."""
    from inlaid.quant.checkpoint_files import is_gptq_checkpoint

    try:
        return is_gptq_checkpoint(model)
    except (OSError, ValueError, TypeError):
        return False


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, found before the model loads (each of these used to
    surface only after the whole evaluation, or never)."""
    problem = model_dir_problem(Path(args.model) if args.model else None)
    if problem:
        return problem
    if args.backend == "peft" and args.model and _gptq_checkpoint(Path(args.model).expanduser()):  # was optimum's
        return (f"--backend peft loads --model with transformers, which reads a GPTQ checkpoint ({args.model}) only "
                "through optimum, not installed here: score it with the engine (--backend engine, the default)")
    if args.suite:
        if args.adapter:
            return "--adapter goes with --task; --suite takes each task's adapter from --adapters-dir"
        # A missing folder evaluated the base model on every task, each with a stderr note.
        if not Path(args.adapters_dir).is_dir():
            return f"--adapters-dir {args.adapters_dir}: directory not found"
    elif args.adapter and len(args.adapter) != len(args.task):
        # Paired by position: `--task a --task b --adapter x` evaluated b with a's adapter.
        return (f"{len(args.task)} --task but {len(args.adapter)} --adapter: give one --adapter per --task, "
                "in the same order (or none, for the base model)")
    if args.out and args.markdown and (os.path.realpath(os.path.expanduser(args.out))
                                       == os.path.realpath(os.path.expanduser(args.markdown))):
        # The table was written over the JSON results, which were lost.
        return f"--out and --markdown are the same file ({args.out}); give two paths"
    for option, path in (("--out", args.out), ("--markdown", args.markdown)):
        problem = writable_file_problem(Path(path), option) if path else None
        if problem:
            return problem
    return None
