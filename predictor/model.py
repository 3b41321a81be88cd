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


MAX_TOKENS = 1e9  # the longest output any state may hold or any prediction give


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

    def forget(self, task: str | None) -> None:
        """A removed task's mean goes; the all-task mean keeps what it taught."""
        key = _task_key(task)
        self.counts.pop(key, None)
        self.means.pop(key, None)

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
        """ValueError for arrays `state()` could not have written (a hand-edited file: negative
        or fractional counts, means past 1e9 tokens, arrays of different lengths)."""
        prior, total_count, total_mean = (float(x) for x in state["mean_prior"])
        tasks, counts, means = state["mean_tasks"], state["mean_counts"], state["mean_values"]
        if not len(tasks) == len(counts) == len(means):
            raise ValueError("per-task mean arrays of different lengths")
        if counts.dtype.kind not in "iu" or (counts < 0).any() or total_count < 0 or total_count != int(total_count):
            raise ValueError("per-task counts that are negative or not whole numbers")
        if not all(0 <= value <= MAX_TOKENS for value in (prior, total_mean, *means.tolist())):
            raise ValueError(f"mean output lengths outside [0, {MAX_TOKENS:g}] tokens")
        self.prior_tokens, self.total_count, self.total_mean = prior, int(total_count), total_mean
        self.counts = {str(t): int(c) for t, c in zip(tasks, counts)}
        self.means = {str(t): float(m) for t, m in zip(tasks, means)}


BASE_TASK_KEY = "<base>"  # the key of requests of no task (the base model); no task may be named so


def _task_key(task: str | None) -> str:
    return BASE_TASK_KEY if task is None else task


_MAX_LOG_LENGTH = math.log1p(MAX_TOKENS)
# A task's residual mean counts as this many zero residuals too: one request moves its
# task's level by a ninth of its error, a task's 100 requests by 93 % of their mean error.
RESIDUAL_PRIOR_COUNT = 8


class LengthPredictor:
    """Ridge regression of log(1 + output tokens) on hashed (task, prompt) features."""

    def __init__(self, bits: int = DEFAULT_BITS, alpha: float = 0.3, prior_tokens: float = DEFAULT_PRIOR_TOKENS,
                 ) -> None:
        self.hasher = FeatureHasher(bits)
        self.alpha = alpha
        # (coefficients float64 [2**bits], intercept); None until fitted. One attribute, so a
        # refit on another thread swaps both at once.
        self.weights: tuple[np.ndarray, float] | None = None
        # The same regression without the task columns, for tasks the fit did not see (a new
        # adapter): the task columns absorb each task's level, so the full model's shared
        # part alone predicts an unseen task badly. None until fitted.
        self.shared_weights: tuple[np.ndarray, float] | None = None
        self.fitted_tasks: frozenset[str] = frozenset()  # task keys among the fit's rows
        # Between refits, each task's level follows its finished requests: (sum, count) of
        # log-length residuals against the fitted model, reset by every fit.
        self.residuals: dict[str, tuple[float, int]] = {}
        self.fallback = TaskMeanPredictor(prior_tokens)  # until the first fit

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def features(self, task: str | None, prompt_token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.hasher.transform(task, prompt_token_ids)

    def fit(self, samples: Iterable[LengthSample]) -> "LengthPredictor":
        rows, targets, tasks = [], [], set()
        for sample in samples:
            rows.append(self.features(sample.task, sample.prompt_token_ids))
            targets.append(sample.output_tokens)
            tasks.add(_task_key(sample.task))
            self.fallback.observe(sample.task, sample.prompt_token_ids, sample.output_tokens)
        if rows:
            self.set_weights(*self.solve_both(rows, targets), tasks=tasks)
        return self

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

    def set_weights(self, weights: tuple[np.ndarray, float], shared: tuple[np.ndarray, float] | None = None,
                    tasks: Iterable[str] = ()) -> None:
        """Replace the model fitted on rows of `tasks` (task keys): readers see the old or the
        new full model, never a mix (the shared one only answers for tasks the fit did not
        see, so a prediction between the two assignments is harmless)."""
        self.shared_weights = shared
        self.fitted_tasks = frozenset(tasks)
        self.residuals = {}
        self.weights = weights

    def _fitted_log_length(self, task: str | None, index: np.ndarray, value: np.ndarray) -> float | None:
        """The fitted models' log(1 + length), no residual; None before the first fit."""
        weights = self.weights
        if weights is None:
            return None
        shared = self.shared_weights
        if shared is not None and _task_key(task) not in self.fitted_tasks:
            weights = shared
            index, value = self.hasher.shared_part(index, value)
        coef, intercept = weights
        return intercept + float(np.dot(coef[index], value))

    def predict(self, task: str | None, prompt_token_ids: Sequence[int]) -> float:
        log_length = self._fitted_log_length(task, *self.features(task, prompt_token_ids))
        if log_length is None:
            return self.fallback.predict(task, prompt_token_ids)
        total, count = self.residuals.get(_task_key(task), (0.0, 0))
        log_length += total / (count + RESIDUAL_PRIOR_COUNT)
        if not math.isfinite(log_length):  # a model gone bad answers as the task means do
            return self.fallback.predict(task, prompt_token_ids)
        # A length is a whole number of tokens, at least one (the end-of-turn token); past
        # _MAX_LOG_LENGTH the exponential would overflow, and no budget is that long anyway.
        return float(max(1, round(math.expm1(min(log_length, _MAX_LOG_LENGTH)))))

    def observe(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        self.fallback.observe(task, prompt_token_ids, output_tokens)
        self.update(task, *self.features(task, prompt_token_ids), output_tokens)

    def forget(self, task: str | None) -> None:
        """A removed task: its mean and level go, and it counts as unseen by the fit (its
        hashed task column stays in the weights until the next refit, which has no row of it)."""
        key = _task_key(task)
        self.fallback.forget(task)
        self.residuals.pop(key, None)
        self.fitted_tasks = self.fitted_tasks - {key}

    def update(self, task: str | None, index: np.ndarray, value: np.ndarray, output_tokens: float) -> None:
        """A finished request moves its task's level (microseconds), no other task's: the
        shrunken mean of the task's log-length residuals since the last fit is added to its
        predictions. (Gradient steps on the shared weights moved every task: AdaGrad's first
        step after a refit is a fixed-size step on every active column, so one correctly
        predicted request shifted all predictions by 1.9x; an outside probe.) Before the
        first fit, the task means answer and learn instead."""
        log_length = self._fitted_log_length(task, index, value)
        if log_length is None:
            return
        key = _task_key(task)
        total, count = self.residuals.get(key, (0.0, 0))
        self.residuals[key] = (total + math.log1p(max(0.0, output_tokens)) - log_length, count + 1)

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
        state["fitted_tasks"] = np.asarray(sorted(self.fitted_tasks), dtype=str)
        residuals = sorted(self.residuals.items())
        state["residual_tasks"] = np.asarray([task for task, _ in residuals], dtype=str)
        state["residual_sums"] = np.asarray([total for _, (total, _) in residuals], dtype=np.float64)
        state["residual_counts"] = np.asarray([count for _, (_, count) in residuals], dtype=np.int64)
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """ValueError for a state this model cannot continue: its hash width (`config[0]`) must
        be this model's, as every saved column index and reservoir row was hashed with it."""
        config = state["config"]
        if config.shape != (4,):
            raise ValueError(f"config holds {config.shape} values, not the 4 (bits, alpha, intercept, fitted) saved")
        bits, alpha, intercept, fitted = (float(x) for x in config)
        # A state of 20 bits was taken whole: the model then hashed new requests into 20-bit
        # columns unlike the reservoir's, and predicted 1 token for everything, refits included.
        if bits != self.hasher.bits:
            raise ValueError(f"its features are hashed into {bits:g} bits; this predictor uses {self.hasher.bits}")
        if fitted not in (0.0, 1.0):
            raise ValueError(f"config's fitted flag is {fitted:g}, not 0 or 1")
        if not alpha > 0:  # finite: the state's floats are checked before
            raise ValueError(f"ridge alpha {alpha} is not > 0 (every refit would fail)")
        self.alpha = alpha
        self.fallback.load_state(state)
        self.weights = None
        for name in ("coef_index", "shared_index"):  # numpy would take -1 as the last column
            index = state.get(name)
            if index is not None and (index.dtype.kind not in "iu" or (len(index) and not (
                    0 <= int(index.min()) and int(index.max()) < self.hasher.size))):
                raise ValueError(f"{name} holds feature indices outside the model's {self.hasher.size}")
        if fitted:
            coef = np.zeros(self.hasher.size, dtype=np.float64)
            coef[state["coef_index"]] = state["coef_value"]
            self.weights = (coef, intercept)
        self.shared_weights = None
        if "shared_index" in state:  # states saved before the shared model have none
            shared = np.zeros(self.hasher.size, dtype=np.float64)
            shared[state["shared_index"]] = state["shared_value"][:-1]
            self.shared_weights = (shared, float(state["shared_value"][-1]))
        # States saved before these arrays: the tasks observed then were the fitted ones
        # (the shared model answered for the others), and there were no residuals.
        self.fitted_tasks = frozenset(str(t) for t in state.get("fitted_tasks", state["mean_tasks"]))
        tasks, sums, counts = (state.get(key, np.zeros(0)) for key in ("residual_tasks", "residual_sums",
                                                                         "residual_counts"))
        if not len(tasks) == len(sums) == len(counts) or (np.asarray(counts) < 0).any():
            raise ValueError("residual arrays of different lengths, or negative counts")
        self.residuals = {str(t): (float(total), int(count)) for t, total, count in zip(tasks, sums, counts)}
