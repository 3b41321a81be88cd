"""Build every task's splits from the data packages and write them as JSONL.

All splits go to the cache (`$XDG_CACHE_HOME/inlaid/tasks/splits/<task>/<split>.jsonl`);
with `update_committed`, the small eval and calibration splits are also written to
`inlaid/tasks/data/<task>/` (the copies committed in the repo).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from inlaid.tasks import TASK_NAMES, code, math_word, reading_qa, sentiment, summarize, table_to_text, translation
from inlaid.tasks.base import COMMITTED_SPLITS, PACKAGED_DATA_DIR, Example, TaskError, cache_data_dir, write_jsonl

Builder = Callable[[], dict[str, dict[str, list[Example]]]]


def _single(name: str, build: Callable[[], dict[str, list[Example]]]) -> Builder:
    return lambda: {name: build()}


# One builder may produce several tasks (the translations share one verse split).
BUILDERS: list[tuple[tuple[str, ...], Builder]] = [
    (tuple(t.name for t in translation.TASKS), translation.build_all),
    ((summarize.NAME,), _single(summarize.NAME, summarize.build)),
    ((table_to_text.NAME,), _single(table_to_text.NAME, table_to_text.build)),
    ((math_word.NAME,), _single(math_word.NAME, math_word.build)),
    ((reading_qa.NAME,), _single(reading_qa.NAME, reading_qa.build)),
    ((code.NAME,), _single(code.NAME, code.build)),
    ((sentiment.NAME,), _single(sentiment.NAME, sentiment.build)),
]


def build_tasks(names: list[str] | None = None) -> dict[str, dict[str, list[Example]]]:
    wanted = set(names or TASK_NAMES)
    unknown = wanted - set(TASK_NAMES)
    if unknown:
        raise TaskError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    built: dict[str, dict[str, list[Example]]] = {}
    for produced, builder in BUILDERS:
        if wanted & set(produced):
            for name, splits in builder().items():
                if name in wanted:
                    built[name] = splits
    return built


def prepare(names: list[str] | None = None, update_committed: bool = False,
            out_dir: Path | None = None) -> dict[str, dict[str, int]]:
    """Write the splits; return the example count per task and split."""
    out_dir = out_dir or cache_data_dir()
    counts: dict[str, dict[str, int]] = {}
    for name, splits in build_tasks(names).items():
        counts[name] = {}
        for split, examples in splits.items():
            counts[name][split] = write_jsonl(out_dir / name / f"{split}.jsonl", examples)
            if update_committed and split in COMMITTED_SPLITS:
                write_jsonl(PACKAGED_DATA_DIR / name / f"{split}.jsonl", examples)
        print(f"{name}: " + ", ".join(f"{s}={n}" for s, n in counts[name].items()), file=sys.stderr)
    return counts
