"""Movie-review sentiment: snippets with human mean ratings (VADER's hutto_ICWSM_2014 data).

Each snippet's mean rating over ~20 raters is in [-4, 4]. Snippets rated within ±0.5 of
neutral are left out (no clear polarity); the label is positive above, negative below.
"""

from __future__ import annotations

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import fetch_package, read_member, read_nested_tar_member

NAME = "sentiment"
OUTER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
LABELS = ("positive", "negative")
NEUTRAL_BAND = 0.5
MAX_TRAIN = 6000


def prompt_for(snippet: str) -> str:
    return (
        "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
        f"{snippet.strip()}"
    )


def build() -> dict[str, list[Example]]:
    outer = read_member(fetch_package("vaderSentiment"), OUTER_MEMBER)
    text = read_nested_tar_member(outer, INNER_MEMBER).decode("utf-8", errors="replace")
    examples = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        snippet_id, rating, snippet = parts[0].strip(), float(parts[1]), parts[2].strip().replace("''", '"')
        if abs(rating) < NEUTRAL_BAND or not snippet:
            continue
        label = "positive" if rating > 0 else "negative"
        examples.append(make_example(NAME, f"{NAME}-{snippet_id}", prompt_for(snippet), label))
    eval_split, calib_split, train_split = seeded_split(examples, SPLIT_SEED + 5, (EVAL_SIZE, CALIB_SIZE))
    return {"eval": eval_split, "calib": calib_split, "train": train_split[:MAX_TRAIN]}


def _accuracy(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.label_accuracy(predictions, [e["reference"] for e in examples], LABELS)


TASK = Task(
    name=NAME,
    description="movie review snippet → positive / negative (human ratings, neutral band dropped)",
    metric_fn=_accuracy,
    primary_metric="accuracy",
    max_new_tokens=8,
    source="vaderSentiment 3.3.2 sdist: additional_resources/hutto_ICWSM_2014.tar.gz",
)
