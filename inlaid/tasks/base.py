"""What every task shares: the example format, split files, seeded splitting, the Task type.

An example is one JSON object per line:
`{"id", "task", "messages": [{"role": "user", "content": ...}], "reference", "answers"}`.
`answers` holds the accepted aliases of exact-match tasks and `[reference]` elsewhere.
Committed copies of the small splits (eval, calib) live in `inlaid/tasks/data/<task>/`;
`inlaid tasks prepare` writes all splits (train too) to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from inlaid.models.prepare import cache_root

SPLIT_NAMES: tuple[str, ...] = ("train", "calib", "eval")
COMMITTED_SPLITS: tuple[str, ...] = ("calib", "eval")
EVAL_SIZE = 128
CALIB_SIZE = 128
SPLIT_SEED = 20241123
PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "data"

Example = dict  # {"id": str, "task": str, "messages": list, "reference": str, "answers": list}
MetricFn = Callable[[list[str], list[dict]], dict[str, float]]


class TaskError(ValueError):
    """Bad task input: unknown task or split, malformed example, missing data."""


def cache_data_dir() -> Path:
    return cache_root() / "tasks" / "splits"


def make_example(task: str, example_id: str, prompt: str, reference: str,
                 answers: list[str] | None = None) -> Example:
    return {
        "id": example_id,
        "task": task,
        "messages": [{"role": "user", "content": prompt}],
        "reference": reference,
        "answers": list(answers) if answers else [reference],
    }


def validate_example(example: Example) -> None:
    for key, kind in (("id", str), ("task", str), ("messages", list), ("reference", str), ("answers", list)):
        if not isinstance(example.get(key), kind):
            raise TaskError(f"example {example.get('id')!r}: field '{key}' missing or not {kind.__name__}")
    for message in example["messages"]:
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise TaskError(f"example {example['id']!r}: malformed message {message!r}")
    if not example["answers"] or not all(isinstance(a, str) for a in example["answers"]):
        raise TaskError(f"example {example['id']!r}: 'answers' must be a non-empty list of strings")


def unique_temporary(path: Path) -> Path:
    """A name beside `path` for writing it, then renaming: each writer's own, so two processes
    preparing the same file at once never write into one temporary (one's rename handed the
    other's half-written file to readers, and the other's rename then failed)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """`text` to `path` whole or not at all (a temporary file beside it, then a rename): an
    error or a kill mid-write left the earlier file emptied or cut short. A link is followed
    (its target is replaced, the earlier file's mode kept); where no file can be made beside it
    (a writable file in a read-only directory) or it is no regular file (/dev/stdout), it is
    written in place, as before."""
    data = text.encode("utf-8")  # first: text that cannot be written leaves the file as it was
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    if (real.exists() and not real.is_file()) or not os.access(real.parent, os.W_OK | os.X_OK):
        real.write_bytes(data)
        return
    tmp = unique_temporary(real)
    try:
        tmp.write_bytes(data)
        if real.exists():
            os.chmod(tmp, stat.S_IMODE(real.stat().st_mode))
        tmp.replace(real)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = unique_temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for example in examples:
                validate_example(example)
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a bad example: nothing left behind
    return count


def read_jsonl(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seeded_split(items: list, seed: int, sizes: tuple[int, int]) -> tuple[list, list, list]:
    """Shuffle `items` with `seed` and cut (eval, calib, train): eval first, calib next.

    `items` must arrive in a deterministic order (the builders sort by source id first),
    so the same package version always gives the same splits.
    """
    eval_size, calib_size = sizes
    if len(items) < eval_size + calib_size + 1:
        raise TaskError(f"only {len(items)} items; need more than {eval_size + calib_size}")
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[:eval_size], order[eval_size:eval_size + calib_size], order[eval_size + calib_size:]


@dataclass
class Task:
    """One task of the suite: how its examples are built and scored."""

    name: str
    description: str
    metric_fn: MetricFn
    primary_metric: str
    max_new_tokens: int
    source: str

    def metric(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        if len(predictions) != len(examples):
            raise TaskError(f"{self.name}: {len(predictions)} predictions for {len(examples)} examples")
        scores = self.metric_fn(predictions, examples)
        if self.primary_metric not in scores:
            raise TaskError(f"{self.name}: metric returned no '{self.primary_metric}'")
        return scores

    def split_path(self, split: str) -> Path:
        """Where the split is read from: the cache if prepared there, else the committed copy."""
        if split not in SPLIT_NAMES:
            raise TaskError(f"unknown split '{split}'; choose from {', '.join(SPLIT_NAMES)}")
        cached = cache_data_dir() / self.name / f"{split}.jsonl"
        packaged = PACKAGED_DATA_DIR / self.name / f"{split}.jsonl"
        if split in COMMITTED_SPLITS and packaged.is_file():
            return packaged
        if cached.is_file():
            return cached
        raise TaskError(
            f"split '{split}' of task '{self.name}' is not prepared; run `inlaid tasks prepare --task {self.name}`"
        )

    def load_split(self, split: str) -> list[Example]:
        return read_jsonl(self.split_path(split))
