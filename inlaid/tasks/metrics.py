"""Task metrics. Each returns a dict of floats in [0, 100] (percent), one key per measure.

Scores are percentages so that one table can show every task side by side.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_MARK = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)
_CODE_FENCE = re.compile(r"```(?:python|py)?\s*\n?(.*?)(?:```|$)", re.DOTALL)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], answer_lists: list[list[str]]) -> dict[str, float]:
    """Share of predictions equal (normalised) to any accepted alias; also alias containment."""
    hits = contained = 0
    for prediction, answers in zip(predictions, answer_lists, strict=True):
        normalized = normalize_answer(first_line(prediction))
        aliases = [normalize_answer(a) for a in answers]
        hits += any(normalized == alias for alias in aliases)
        contained += any(alias and f" {alias} " in f" {normalized} " for alias in aliases)
    count = max(len(predictions), 1)
    return {"exact_match": 100.0 * hits / count, "contains_answer": 100.0 * contained / count}


def token_f1(predictions: list[str], answer_lists: list[list[str]]) -> dict[str, float]:
    """SQuAD token F1 of the first output line, best over the accepted answers."""
    total = 0.0
    for prediction, answers in zip(predictions, answer_lists, strict=True):
        predicted = normalize_answer(first_line(prediction)).split()
        best = 0.0
        for answer in answers:
            expected = normalize_answer(answer).split()
            if not predicted or not expected:  # SQuAD's rule: 1 when both are empty (exact match agrees)
                best = max(best, float(predicted == expected))
                continue
            common = sum(min(predicted.count(t), expected.count(t)) for t in set(predicted))
            if common:
                precision, recall = common / len(predicted), common / len(expected)
                best = max(best, 2 * precision * recall / (precision + recall))
        total += best
    return {"f1": 100.0 * total / max(len(predictions), 1)}


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""


def parse_number(text: str) -> float | None:
    """The final answer number: after the last 'Answer:' / 'answer is' if present, else the last number."""
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        after = text[marks[-1].end():]
        match = _NUMBER.search(after)
        if match:
            return _to_float(match.group())
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def numeric_accuracy(predictions: list[str], references: list[str]) -> dict[str, float]:
    hits = 0
    for prediction, reference in zip(predictions, references, strict=True):
        predicted, expected = parse_number(prediction), parse_number(reference)
        if expected is None:
            raise ValueError(f"reference {reference!r} holds no number")
        hits += predicted is not None and abs(predicted - expected) <= 1e-6 * max(1.0, abs(expected))
    return {"accuracy": 100.0 * hits / max(len(predictions), 1)}


def parse_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label named first in the text (whole word, case-insensitive), or None."""
    lowered = text.lower()
    best: tuple[int, str] | None = None
    for label in labels:
        match = re.search(rf"\b{re.escape(label)}\b", lowered)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), label)
    return best[1] if best else None


def label_accuracy(predictions: list[str], references: list[str], labels: tuple[str, ...]) -> dict[str, float]:
    hits = unparsed = 0
    for prediction, reference in zip(predictions, references, strict=True):
        label = parse_label(prediction, labels)
        unparsed += label is None
        hits += label == reference
    count = max(len(predictions), 1)
    return {"accuracy": 100.0 * hits / count, "unparsed": 100.0 * unparsed / count}


class UnicodeWords:
    """A rouge-score tokenizer of lower-cased Unicode words, no stemming: the default keeps
    only [a-z0-9], so text in another script scored 0 against itself."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


@lru_cache(maxsize=2)
def _rouge_scorer(unicode_words: bool = False):
    from rouge_score import rouge_scorer

    if unicode_words:
        return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeWords())
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(predictions: list[str], reference_lists: list[list[str]], unicode_words: bool = False) -> dict[str, float]:
    """Mean ROUGE F1; with several references an example scores its best one (per measure).
    `unicode_words`: over lower-cased Unicode words (UnicodeWords), else rouge-score's default
    (ASCII letters and digits, Porter stemmer: the suite's)."""
    scorer = _rouge_scorer(unicode_words)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, references in zip(predictions, reference_lists, strict=True):
        per_reference = [scorer.score(reference, prediction) for reference in references]
        for key in totals:
            totals[key] += max(score[key].fmeasure for score in per_reference)
    count = max(len(predictions), 1)
    return {key: 100.0 * value / count for key, value in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus sacreBLEU (13a tokenisation) and chrF, one reference per example."""
    import sacrebleu

    if not predictions:  # sacreBLEU fails on an empty corpus (IndexError); the other metrics say 0
        return {"bleu": 0.0, "chrf": 0.0}
    first_lines = [first_line(p) for p in predictions]
    return {
        "bleu": sacrebleu.corpus_bleu(first_lines, [references]).score,
        "chrf": sacrebleu.corpus_chrf(first_lines, [references]).score,
    }


def strip_code_fence(text: str) -> str:
    match = _CODE_FENCE.search(text)
    return match.group(1).strip() if match else text.strip()
