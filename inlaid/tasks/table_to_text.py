"""Table-to-text: E2E NLG restaurant meaning representations → one description (BIG-bench gem/e2e_nlg).

The BIG-bench file holds 1,000 references for 213 distinct meaning representations. Splits
are made over meaning representations (never over references), so eval inputs are unseen;
an eval example accepts all of its references (multi-reference ROUGE-L: the best one).
"""

from __future__ import annotations

import json
from collections import defaultdict

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, SPLIT_SEED, Example, Task, make_example
from inlaid.tasks.sources import extract_member

NAME = "table-to-text"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/gem/e2e_nlg/task.json"
EVAL_INPUTS = 100


def prompt_for(meaning_representation: str) -> str:
    return (
        "Write one sentence that describes a restaurant with these attributes.\n\n"
        f"{meaning_representation}"
    )


def build() -> dict[str, list[Example]]:
    import random

    task = json.loads(extract_member("bigbench", MEMBER).read_text(encoding="utf-8"))
    references: dict[str, list[str]] = defaultdict(list)
    for example in task["examples"]:
        references[example["input"].strip()].append(example["target"].strip())
    inputs = sorted(references)
    random.Random(SPLIT_SEED + 2).shuffle(inputs)
    eval_inputs, rest = inputs[:EVAL_INPUTS], inputs[EVAL_INPUTS:]

    def pairs(chosen: list[str]) -> list[Example]:
        out = []
        for index, mr in enumerate(chosen):
            for ref_index, reference in enumerate(references[mr]):
                out.append(make_example(NAME, f"{NAME}-{inputs.index(mr)}-{ref_index}", prompt_for(mr), reference))
        return out

    eval_split = [
        make_example(NAME, f"{NAME}-{inputs.index(mr)}", prompt_for(mr), references[mr][0], references[mr])
        for mr in eval_inputs
    ]
    # calibration takes whole inputs until it has CALIB_SIZE pairs; training gets the rest
    calib_pairs: list[Example] = []
    cut = 0
    while len(calib_pairs) < CALIB_SIZE:
        calib_pairs.extend(pairs([rest[cut]]))
        cut += 1
    return {"eval": eval_split, "calib": calib_pairs[:CALIB_SIZE], "train": pairs(rest[cut:])}


def _rouge(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.rouge([metrics.first_line(p) for p in predictions], [e["answers"] for e in examples])


TASK = Task(
    name=NAME,
    description="E2E NLG: restaurant attributes → one-sentence description (multi-reference)",
    metric_fn=_rouge,
    primary_metric="rougeL",
    max_new_tokens=64,
    source="bigbench 1.0.0 sdist: bigbench/benchmark_tasks/gem/e2e_nlg/task.json",
)
