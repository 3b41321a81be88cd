"""Output-length predictors: the per-task mean (the baseline) and a hashed-feature ridge model.

Both answer `predict(task, prompt_token_ids)` in tokens and learn from
`observe(task, prompt_token_ids, output_tokens)`. The ridge model regresses
log(1 + output tokens) on `FeatureHasher` features: a log target keeps a 1-token label and
an 80-token translation on one scale and predicts a typical (median-like) length.
Predictions are a sparse dot product in numpy (tens of microseconds), not an sklearn call.
"""

from __future__ import annotations

import math

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from inlaid.predictor.features import DEFAULT_BITS, FeatureHasher

DEFAULT_PRIOR_TOKENS = 32.0  # before anything was observed


@dataclass
class LengthSample:
    task: str | None
    prompt_token_ids: Sequence[int]
    output_tokens: int


class TaskMeanPredictor:
    """The mean output length of each task's finished requests (all tasks' mean for a new one)."""

    def __init__(self, prior_tokens: float = DEFAULT_PRIOR_TOKENS) -> None:
        self.prior_tokens = prior_tokens
        self.counts: dict[str, int] = {}
        self.means: dict[str, float] = {}
        self.total_count = 0
        self.total_mean = 0.0

    def observe(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        key = _task_key(task)
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        self.means[key] = self.means.get(key, 0.0) + (output_tokens - self.means.get(key, 0.0)) / count
        self.total_count += 1
        self.total_mean += (output_tokens - self.total_mean) / self.total_count

    def fit(self, samples: Iterable[LengthSample]) -> "TaskMeanPredictor":
        for sample in samples:
            self.observe(sample.task, sample.prompt_token_ids, sample.output_tokens)
        return self

    def predict(self, task: str | None, prompt_token_ids: Sequence[int] = ()) -> float:
        key = _task_key(task)
        if key in self.means:
            return self.means[key]
        return self.total_mean if self.total_count else self.prior_tokens

    def state(self) -> dict[str, np.ndarray]:
        tasks = sorted(self.counts)
        return {
            "mean_tasks": np.asarray(tasks, dtype=str),
            "mean_counts": np.asarray([self.counts[t] for t in tasks], dtype=np.int64),
            "mean_values": np.asarray([self.means[t] for t in tasks], dtype=np.float64),
            "mean_prior": np.asarray([self.prior_tokens, self.total_count, self.total_mean], dtype=np.float64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.prior_tokens, total_count, self.total_mean = (float(x) for x in state["mean_prior"])
        self.total_count = int(total_count)
        self.counts = {str(t): int(c) for t, c in zip(state["mean_tasks"], state["mean_counts"])}
        self.means = {str(t): float(m) for t, m in zip(state["mean_tasks"], state["mean_values"])}


def _task_key(task: str | None) -> str:
    return "<base>" if task is None else task


_MAX_LOG_LENGTH = math.log1p(1e9)  # tokens


class LengthPredictor:
    """Ridge regression of log(1 + output tokens) on hashed (task, prompt) features."""

    def __init__(self, bits: int = DEFAULT_BITS, alpha: float = 0.3, prior_tokens: float = DEFAULT_PRIOR_TOKENS,
                 learning_rate: float = 0.05) -> None:
        self.hasher = FeatureHasher(bits)
        self.alpha = alpha
        self.learning_rate = learning_rate  # online (AdaGrad) steps between refits
        # (coefficients float64 [2**bits], intercept); None until fitted. One attribute, so a
        # refit on another thread swaps both at once.
        self.weights: tuple[np.ndarray, float] | None = None
        # The same regression without the task columns, for tasks never observed (a new
        # adapter): the task columns absorb each task's level, so the full model's shared
        # part alone predicts an unseen task badly. None until fitted; refits only.
        self.shared_weights: tuple[np.ndarray, float] | None = None
        self._squared_gradients: np.ndarray | None = None  # AdaGrad's per-column sums
        self.fallback = TaskMeanPredictor(prior_tokens)  # until the first fit

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def features(self, task: str | None, prompt_token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.hasher.transform(task, prompt_token_ids)

    def fit(self, samples: Iterable[LengthSample]) -> "LengthPredictor":
        rows, targets = [], []
        for sample in samples:
            rows.append(self.features(sample.task, sample.prompt_token_ids))
            targets.append(sample.output_tokens)
            self.fallback.observe(sample.task, sample.prompt_token_ids, sample.output_tokens)
        self.fit_features(rows, targets)
        return self

    def fit_features(self, rows: Sequence[tuple[np.ndarray, np.ndarray]], targets: Sequence[float]) -> None:
        """Fit on already-hashed rows."""
        if rows:
            self.set_weights(*self.solve_both(rows, targets))

    def solve_both(self, rows: Sequence[tuple[np.ndarray, np.ndarray]], targets: Sequence[float]
                   ) -> tuple[tuple[np.ndarray, float], tuple[np.ndarray, float]]:
        """The full and the shared (task columns left out) ridge solutions (any thread)."""
        shared_rows = [self.hasher.shared_part(index, value) for index, value in rows]
        return self.solve(rows, targets), self.solve(shared_rows, targets)

    def solve(self, rows: Sequence[tuple[np.ndarray, np.ndarray]], targets: Sequence[float]) -> tuple[np.ndarray, float]:
        """The ridge solution on hashed rows, without touching this model (any thread)."""
        from sklearn.linear_model import Ridge

        matrix = self.hasher.matrix(rows)
        target = np.log1p(np.maximum(np.asarray(targets, dtype=np.float64), 0.0))
        model = Ridge(alpha=self.alpha, fit_intercept=True, solver="lsqr", tol=1e-4)
        model.fit(matrix, target)
        return np.asarray(model.coef_, dtype=np.float64), float(model.intercept_)

    def set_weights(self, weights: tuple[np.ndarray, float], shared: tuple[np.ndarray, float] | None = None) -> None:
        """Replace the model: readers see the old or the new full model, never a mix (the
        shared one only answers for unseen tasks, so a step between the two is harmless)."""
        self.shared_weights = shared
        self.weights = weights
        self._squared_gradients = None

    def predict(self, task: str | None, prompt_token_ids: Sequence[int]) -> float:
        weights = self.weights
        if weights is None:
            return self.fallback.predict(task, prompt_token_ids)
        index, value = self.features(task, prompt_token_ids)
        shared = self.shared_weights
        if shared is not None and _task_key(task) not in self.fallback.counts:
            weights = shared
            index, value = self.hasher.shared_part(index, value)
        coef, intercept = weights
        log_length = intercept + float(np.dot(coef[index], value))
        if not math.isfinite(log_length):  # a model gone bad answers as the task means do
            return self.fallback.predict(task, prompt_token_ids)
        # A length is a whole number of tokens, at least one (the end-of-turn token); past
        # _MAX_LOG_LENGTH the exponential would overflow, and no budget is that long anyway.
        return float(max(1, round(math.expm1(min(log_length, _MAX_LOG_LENGTH)))))

    def observe(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        self.fallback.observe(task, prompt_token_ids, output_tokens)
        self.update(*self.features(task, prompt_token_ids), output_tokens)

    def update(self, index: np.ndarray, value: np.ndarray, output_tokens: float) -> None:
        """One online step (AdaGrad on the squared error of the log length): a few
        microseconds, so every finished request teaches the model at once; refits on the
        reservoir (`OnlineLengthPredictor`) then replace these small steps."""
        if self.weights is None:  # start from the task means
            self.weights = (np.zeros(self.hasher.size), float(np.log1p(self.fallback.predict(None))))
        if self._squared_gradients is None:
            self._squared_gradients = np.zeros(self.hasher.size + 1)
        coef, intercept = self.weights
        error = intercept + float(np.dot(coef[index], value)) - float(np.log1p(max(0.0, output_tokens)))
        gradient = error * value.astype(np.float64)
        squares = self._squared_gradients
        np.add.at(squares, index, gradient * gradient)
        np.subtract.at(coef, index, self.learning_rate * gradient / np.sqrt(squares[index] + 1e-8))
        squares[-1] += error * error
        self.weights = (coef, intercept - self.learning_rate * error / np.sqrt(squares[-1] + 1e-8))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, np.ndarray]:
        state = dict(self.fallback.state())
        weights = self.weights
        intercept = weights[1] if weights is not None else 0.0
        state["config"] = np.asarray([self.hasher.bits, self.alpha, intercept, weights is not None], dtype=np.float64)
        if weights is not None:
            nonzero = np.flatnonzero(weights[0])
            state["coef_index"] = nonzero.astype(np.int64)
            state["coef_value"] = weights[0][nonzero]
        shared = self.shared_weights
        if shared is not None:
            nonzero = np.flatnonzero(shared[0])
            state["shared_index"] = nonzero.astype(np.int64)
            state["shared_value"] = np.concatenate([shared[0][nonzero], [shared[1]]])
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        bits, self.alpha, intercept, fitted = (float(x) for x in state["config"])
        self.hasher = FeatureHasher(int(bits))
        self.fallback.load_state(state)
        self.weights = None
        if fitted:
            coef = np.zeros(self.hasher.size, dtype=np.float64)
            coef[state["coef_index"]] = state["coef_value"]
            self.weights = (coef, intercept)
        self.shared_weights = None
        if "shared_index" in state:  # states saved before the shared model have none
            shared = np.zeros(self.hasher.size, dtype=np.float64)
            shared[state["shared_index"]] = state["shared_value"][:-1]
            self.shared_weights = (shared, float(state["shared_value"][-1]))
