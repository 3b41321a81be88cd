"""`python -m inlaid.predictor`: train the length predictor offline, or evaluate it.

    python -m inlaid.predictor train --data finished.jsonl --out predictor.npz
    python -m inlaid.predictor evaluate --train a.jsonl --test b.jsonl

A JSONL of finished requests has one object per line: {"task": name or null,
"prompt_token_ids": [...], "output_tokens": n}. `train` writes the state the server loads
with `[scheduler] predictor_state`; it keeps a reservoir of at most 4,096 requests, 512 a
task (the most recent), and `evaluate` fits on the same reservoir, so it scores what `train`
would write. `evaluate` prints JSON: {"train": {"requests", "kept"}, "all": pooled scores,
"tasks": {task: scores}, "base": scores of requests with task null (where there are any),
"unseen_tasks": test tasks no --train request has (task_mean gives them the pooled mean,
the model its task-blind part; a note on stderr names them)}; scores are per predictor ("model",
"task_mean"): mae, bucket_accuracy, kendall_tau, spearman, requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from inlaid.cli_args import writable_file_problem
from inlaid.predictor.evaluate import evaluate_report
from inlaid.predictor.model import BASE_TASK_KEY, LengthSample, TaskMeanPredictor
from inlaid.predictor.online import OnlineLengthPredictor


class DataError(ValueError):
    """A finished-requests file is missing or malformed."""


MAX_OUTPUT_TOKENS = 1_000_000  # no request generates more; beyond it a line is a mistake, not a length
MAX_TOKEN_ID = 2**63 - 1  # token ids are hashed as unsigned 64-bit integers


def read_samples(path: str | Path) -> list[LengthSample]:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; name a JSONL file of finished requests")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task, prompt, output = row["task"], row["prompt_token_ids"], row["output_tokens"]
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
        except KeyError as error:  # named, not KeyError's repr "('task')"
            raise DataError(f"{path}:{number}: no {error.args[0]!r} field; each line needs task, prompt_token_ids "
                            "and output_tokens") from None
        except TypeError:
            raise DataError(f"{path}:{number}: expected a JSON object with task, prompt_token_ids and "
                            "output_tokens") from None
        except RecursionError:  # 100,000 nested '[' ended in a traceback, rc 1 (an outside probe)
            raise DataError(f"{path}:{number}: JSON nested too deeply to be a finished request") from None
        problem = _sample_problem(task, prompt, output)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        samples.append(LengthSample(task, prompt, output))
    if not samples:
        raise DataError(f"{path}: no requests")
    return samples


def _sample_problem(task: object, prompt: object, output: object) -> str | None:
    def is_int(value: object) -> bool:  # JSON true is not a count
        return isinstance(value, int) and not isinstance(value, bool)

    if task is not None and not (isinstance(task, str) and task):
        return f"task must be a non-empty name or null, got {task!r}"
    if task == BASE_TASK_KEY:  # its requests were pooled with those of no task (null)
        return f"task {BASE_TASK_KEY!r} is the key of the requests of no task: write null for those, or rename it"
    if not isinstance(prompt, list) or not all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in prompt):
        return "prompt_token_ids must be a list of token ids (integers >= 0)"
    if not is_int(output) or not 0 <= output <= MAX_OUTPUT_TOKENS:  # type: ignore[operator]
        return f"output_tokens must be an integer in [0, {MAX_OUTPUT_TOKENS}], got {output!r}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inlaid.predictor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fit on finished requests, write a predictor state (.npz)")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True)
    evaluate = commands.add_parser("evaluate", help="fit as `train` does (its reservoir of at most 4,096 requests, "
                                   "512 a task), score on --test against the per-task mean (fitted on every row); "
                                   "JSON with 'all' (pooled), 'tasks' and 'base' (task null)")
    evaluate.add_argument("--train", required=True)
    evaluate.add_argument("--test", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            problem = writable_file_problem(Path(args.out), "--out")
            if problem:  # before the fit, not as a traceback naming a temporary file after it
                raise DataError(problem)
            if os.path.exists(args.out) and os.path.exists(args.data) and os.path.samefile(args.out, args.data):
                raise DataError(f"--out {args.out} is the --data file: the state would replace the requests it "
                                "is fitted on; give another path")
            samples = read_samples(args.data)
            predictor = _trained(samples)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            predictor.save(args.out)
            print(f"trained on {len(samples)} requests ({predictor.size} kept); wrote {args.out}")
        else:
            train_samples, test_samples = read_samples(args.train), read_samples(args.test)
            # What `train` would write (its reservoir, not every row): fitted on all rows, the
            # scores described a model no command writes.
            model = _trained(train_samples)
            baseline = TaskMeanPredictor().fit(train_samples)
            report = evaluate_report(
                [s.task for s in test_samples], [s.output_tokens for s in test_samples],
                {"model": [model.predict(s.task, s.prompt_token_ids) for s in test_samples],
                 "task_mean": [baseline.predict(s.task) for s in test_samples]})
            unseen = sorted({s.task for s in test_samples if s.task is not None}
                            - {s.task for s in train_samples if s.task is not None})
            if unseen:  # their scores measure the fallback, not what was learnt of them
                print(f"python -m inlaid.predictor: note: {len(unseen)} --test task(s) have no --train requests "
                      f"and are predicted without a task of their own: {', '.join(unseen[:10])}"
                      f"{' ...' if len(unseen) > 10 else ''}", file=sys.stderr)
            print(json.dumps({"train": {"requests": len(train_samples), "kept": model.size}, **report,
                              "unseen_tasks": unseen}, indent=1))
    except DataError as error:
        print(f"python -m inlaid.predictor: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's 128 + SIGINT, not a traceback
        print("python -m inlaid.predictor: interrupted", file=sys.stderr)
        return 130
    return 0


def _trained(samples: list[LengthSample]) -> OnlineLengthPredictor:
    """The predictor `train` writes: the samples through its reservoir, then one fit."""
    predictor = OnlineLengthPredictor()
    for sample in samples:
        predictor.remember(sample.task, sample.prompt_token_ids, sample.output_tokens)
    predictor.refit(wait=True)
    return predictor
