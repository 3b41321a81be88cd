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


def _scope_scores(mask: np.ndarray, actual: np.ndarray, predictions: Mapping[str, Sequence[float]]
                  ) -> dict[str, dict[str, float]]:
    return {name: {**_scores(np.asarray(values, dtype=np.float64)[mask], actual[mask]), "requests": int(mask.sum())}
            for name, values in predictions.items()}


def evaluate_report(
    tasks: Sequence[str | None], actual: Sequence[float], predictions: Mapping[str, Sequence[float]]
) -> dict[str, dict]:
    """{"all": {predictor: scores} (every request pooled), "tasks": {task name: {predictor:
    scores}}, "base": {predictor: scores} (requests of no task; only where there are any)}.
    Each in its own field: no task name can take the pooled figures' or the base's place."""
    actual_array = np.asarray(actual, dtype=np.float64)
    is_base = np.asarray([t is None for t in tasks], dtype=bool)
    names = np.asarray(["" if t is None else t for t in tasks], dtype=object)
    report: dict[str, dict] = {"all": _scope_scores(np.ones(len(actual_array), dtype=bool), actual_array, predictions),
                               "tasks": {}}
    for name in sorted({t for t in tasks if t is not None}):
        report["tasks"][name] = _scope_scores(~is_base & (names == name), actual_array, predictions)
    if is_base.any():
        report["base"] = _scope_scores(is_base, actual_array, predictions)
    return report


def evaluate_predictions(
    tasks: Sequence[str | None], actual: Sequence[float], predictions: Mapping[str, Sequence[float]]
) -> dict[str, dict[str, dict[str, float]]]:
    """{scope: {predictor: scores}}; scope is each task name (requests of no task: "<base>")
    and "all" (every request pooled). ValueError where a task name takes one of those two
    keys (a task named "all" was silently overwritten by the pooled figures): `evaluate_report`
    keeps them apart."""
    report = evaluate_report(tasks, actual, predictions)
    taken = {"all", "<base>"} if "base" in report else {"all"}
    clash = sorted(taken & set(report["tasks"]))
    if clash:
        raise ValueError(f"task names {clash} collide with the report's own keys; use evaluate_report")
    flat = dict(report["tasks"])
    if "base" in report:
        flat["<base>"] = report["base"]
    return {**dict(sorted(flat.items())), "all": report["all"]}
