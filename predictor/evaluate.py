"""How good a length prediction is, per task and over all requests.

For each predictor: mean absolute error (tokens), bucket accuracy (the prediction falls in
the same power-of-two bucket as the truth: 1, 2-3, 4-7, ..., 128+), and the rank
agreement a shortest-first scheduler needs, Kendall's tau and Spearman's rho. The per-task
mean predicts one value per task, so its within-task rank correlation is undefined
(reported as 0): only the pooled figures can rank it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def length_bucket(tokens: float) -> int:
    return min(7, int(math.floor(math.log2(max(1.0, tokens)))))


def _rank_correlations(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr

    if len(actual) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return 0.0, 0.0
    return float(kendalltau(predicted, actual).statistic), float(spearmanr(predicted, actual).statistic)


def _scores(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    tau, rho = _rank_correlations(predicted, actual)
    buckets_predicted = np.asarray([length_bucket(p) for p in predicted])
    buckets_actual = np.asarray([length_bucket(a) for a in actual])
    return {
        "mae": float(np.mean(np.abs(predicted - actual))),
        "bucket_accuracy": float(np.mean(buckets_predicted == buckets_actual)),
        "kendall_tau": tau,
        "spearman": rho,
    }


def evaluate_predictions(
    tasks: Sequence[str | None], actual: Sequence[float], predictions: Mapping[str, Sequence[float]]
) -> dict[str, dict[str, dict[str, float]]]:
    """{scope: {predictor: scores}}; scope is each task name and "all" (every request pooled)."""
    actual_array = np.asarray(actual, dtype=np.float64)
    task_array = np.asarray(["<base>" if t is None else t for t in tasks])
    report: dict[str, dict[str, dict[str, float]]] = {}
    scopes = sorted(set(task_array.tolist())) + ["all"]
    for scope in scopes:
        mask = np.ones(len(task_array), dtype=bool) if scope == "all" else task_array == scope
        report[scope] = {
            name: {**_scores(np.asarray(values, dtype=np.float64)[mask], actual_array[mask]), "requests": int(mask.sum())}
            for name, values in predictions.items()
        }
    return report
