"""Bootstrap confidence intervals for per-task scores, and paired tests between two models.

A task's score is a statistic of its examples (a mean, a token-weighted mean NLL, or a
corpus statistic such as BLEU). Resampling the examples with replacement B times gives the
score's sampling distribution; the 2.5th-97.5th percentiles are its 95 % interval. Two
models scored on the same examples are compared PAIRED: each resample draws one set of
example indices and scores both, so the interval is of the difference itself (the examples'
own difficulty cancels). A difference is significant at 5 % when its interval excludes 0.

Statistics are functions of per-example rows: `statistic(rows[indices]) -> float`, where
rows is a numpy array [examples, k] (for BLEU: the per-sentence n-gram match counts and
lengths, summed over the resample before the corpus formula).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Statistic = Callable[[np.ndarray], float]
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    """A point estimate (on all examples) and its 95 % bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """For a difference: the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def resample_indices(count: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, count] example indices drawn with replacement (fixed seed: reproducible,
    and the same draws for every model compared on these examples)."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def interval(rows: np.ndarray, statistic: Statistic, indices: np.ndarray) -> Interval:
    values = np.array([statistic(rows[draw]) for draw in indices])
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(statistic(rows), float(low), float(high))


def paired_difference(rows_a: np.ndarray, rows_b: np.ndarray, statistic: Statistic, indices: np.ndarray) -> Interval:
    """statistic(a) - statistic(b) with its paired 95 % interval (rows aligned by example)."""
    if len(rows_a) != len(rows_b):
        raise ValueError(f"paired rows must describe the same examples ({len(rows_a)} vs {len(rows_b)})")
    values = np.array([statistic(rows_a[draw]) - statistic(rows_b[draw]) for draw in indices])
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(statistic(rows_a) - statistic(rows_b), float(low), float(high))


def mean_statistic(rows: np.ndarray) -> float:
    """Mean of column 0 (accuracy, exact match, ROUGE-L per example)."""
    return float(rows[:, 0].mean())


def ratio_statistic(rows: np.ndarray) -> float:
    """Σ column 0 / Σ column 1 (NLL per token: summed NLL over summed tokens)."""
    return float(rows[:, 0].sum() / rows[:, 1].sum())


def bleu_rows(predictions: list[str], references: list[str]) -> np.ndarray:
    """Per-sentence sacreBLEU sufficient statistics (hyp len, ref len, matches and totals of
    1- to 4-grams), the rows `bleu_statistic` sums."""
    from sacrebleu.metrics import BLEU

    return np.array(BLEU()._extract_corpus_statistics(predictions, [references]), dtype=np.int64)


def bleu_statistic(rows: np.ndarray) -> float:
    """Corpus BLEU of the summed sentence statistics: exactly sacreBLEU's corpus_bleu score."""
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats(rows.sum(axis=0).tolist()).score)
