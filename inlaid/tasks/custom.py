"""A task of the user's own: its examples in a JSONL file, named `NAME=PATH` wherever a task
is (`inlaid train-adapter --task`, `inlaid eval --task`).

Each line is one example in the calibration format (`inlaid quantize`, a server's add_task):
`{"messages": [{"role", "content"}, ...], "reference": "..."}`, optionally with `"id"` and
`"answers"` (the accepted answers; default `[reference]`). So one file trains the adapter,
scores it and calibrates the base for it. Every split is the file: keep training and
evaluation examples in two files. The score is the generic one: ROUGE-L F1 of the first line
over lower-cased Unicode words (primary; any script), exact match and token F1 against `answers`.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from pathlib import Path

from inlaid.tasks import metrics
from inlaid.tasks.base import SPLIT_NAMES, Example, Task, TaskError

MIN_NEW_TOKENS = 64
MAX_NEW_TOKENS = 1024
# Greedy outputs of a task of one's own get room for the longest reference: byte-level BPE
# tokens hold about 2-4 characters of ordinary text, so characters / 2 errs long.
CHARACTERS_PER_TOKEN_AT_LEAST = 2


def _generic_metric(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    answers = [example["answers"] for example in examples]
    first_lines = [metrics.first_line(prediction) for prediction in predictions]
    scores = {**metrics.rouge(first_lines, answers, unicode_words=True), **metrics.exact_match(first_lines, answers),
              **metrics.token_f1(first_lines, answers)}
    words = metrics.UnicodeWords()
    if not any(len(words.tokenize(answer)) >= 2 for options in answers for answer in options):
        # no reference holds a pair of words: ROUGE-2 is undefined, not 0 (printed as 0.00 beside
        # 100 % exact match, it read as a failure: an outside probe)
        del scores["rouge2"]
    return scores


@dataclass
class FileTask(Task):
    """A Task whose every split is one user's JSONL file."""

    path: Path = field(default_factory=Path)

    def split_path(self, split: str) -> Path:
        if split not in SPLIT_NAMES:
            raise TaskError(f"unknown split '{split}'; choose from {', '.join(SPLIT_NAMES)}")
        return self.path

    def load_split(self, split: str) -> list[Example]:
        self.split_path(split)
        return read_task_file(self.path, self.name)


def split_task_spec(text: str) -> tuple[str, str] | None:
    """(name, path) of `NAME=PATH`, or None for a plain task name."""
    if "=" not in text:
        return None
    name, _, path = text.partition("=")
    return name, path


def file_task(name: str, path: str, suite_names: tuple[str, ...]) -> FileTask:
    """The task `name` of the examples in `path`, every line checked (TaskError naming the
    file and line)."""
    if not name or not path:
        raise TaskError(f"task '{name}={path}': expected NAME=PATH.jsonl (a name of your own and its examples)")
    if name in suite_names:
        raise TaskError(f"task '{name}={path}': '{name}' is a task of the suite; give yours another name")
    if "/" in name or name in (".", "..") or name.strip() != name:
        raise TaskError(f"task name {name!r}: no '/', no leading or trailing blanks (it names the adapter's folder)")
    expanded = Path(path).expanduser()  # `mine=~/f.jsonl`: no shell expands ~ after =
    examples = read_task_file(expanded, name)
    longest = max(len(answer) for example in examples for answer in [example["reference"], *example["answers"]])
    budget = min(MAX_NEW_TOKENS, max(MIN_NEW_TOKENS, math.ceil(longest / CHARACTERS_PER_TOKEN_AT_LEAST)))
    return FileTask(name=name, description=f"examples of {expanded}", metric_fn=_generic_metric,
                    primary_metric="rougeL", max_new_tokens=budget, source=str(expanded), path=expanded)


def read_task_file(path: Path, name: str) -> list[Example]:
    """Every example of the file, in the suite's example form."""
    from inlaid.quant.calibration import parse_sample

    try:
        text = path.read_bytes()
    except IsADirectoryError:
        raise TaskError(f"task file {path} is a directory; name a JSONL file") from None
    except OSError as error:
        raise TaskError(f"task file {path} cannot be read: {error.strerror or error}") from None
    examples: list[Example] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(text.removeprefix(codecs.BOM_UTF8).splitlines(), start=1):  # an editor's BOM
        if not line.strip():
            continue
        try:
            example = _example(parse_sample(line), name, number)
            if (first := first_line_of.setdefault(example["id"], number)) != number:  # --out's predictions by id
                raise ValueError(f"id {example['id']!r} again (first at line {first})")
            examples.append(example)
        except ValueError as error:
            raise TaskError(f"task file {path}:{number}: {error}") from None
    if not examples:
        raise TaskError(f"task file {path} holds no examples")
    return examples


def _example(sample: dict, name: str, number: int) -> Example:
    reference = sample["reference"]
    if not reference.strip():
        raise ValueError("'reference' is blank: nothing to train on or to score against")
    if sample["messages"][-1]["role"] != "user":
        raise ValueError("the last message must be the user's: the model answers it with the reference")
    answers = sample.get("answers", [reference])
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("'answers', when given, must be a non-empty list of non-blank strings")
    example_id = sample.get("id", f"{name}-{number}")
    if not isinstance(example_id, str):
        raise ValueError("'id', when given, must be a string")
    from inlaid.quant.calibration import check_encodable

    # (messages and reference: parse_sample) an --out holding one failed to encode, emptied
    check_encodable({"id": example_id, **{f"answers[{i}]": answer for i, answer in enumerate(answers)}})
    return {"id": example_id, "task": name, "messages": sample["messages"], "reference": reference,
            "answers": answers}
