"""A step-time cost model: how long the executor takes for one BatchPlan. Torch-free.

The simulator runs the real scheduler and asks this model, instead of an executor, how
long each planned step takes. The features mirror what the CPU executor computes
(`inlaid/engine/runner.py`): the base projections over every token of the step, the LM
head over the sampled rows, attention over padded groups (decode rows together, prefill
chunks together, each padded to the group's longest context), one LoRA segment per
distinct adapter and LoRA work proportional to tokens x rank, and adapter loads.
Coefficients are fitted by non-negative least squares on measured executor steps
(`bench/sched_cost.py`), so every feature can only add time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from inlaid.protocol import BatchPlan


@dataclass(frozen=True)
class StepFeatures:
    tokens: int  # tokens computed in the step (prefill chunks + decode rows)
    sampled: int  # rows that go through the LM head
    decode_cells: int  # decode group: rows x padded key slots
    prefill_cells: int  # prefill group: chunks x padded queries x padded key slots
    adapters: int  # distinct adapters (LoRA segments) in the step
    lora_token_rank: int  # sum over tokens with an adapter of that adapter's rank
    loads: int  # adapters copied into a device slot before the step

    @staticmethod
    def of_plan(plan: BatchPlan, rank_of_slot: Callable[[int], int], block_size: int) -> "StepFeatures":
        chunks = [ChunkShape(len(c.token_ids), c.start_pos, c.adapter_slot if c.adapter_slot >= 0 else None,
                             rank_of_slot(c.adapter_slot) if c.adapter_slot >= 0 else 0, c.sample) for c in plan.chunks]
        return StepFeatures.of_chunks(chunks, len(plan.adapter_loads), block_size)

    @staticmethod
    def of_chunks(chunks: list["ChunkShape"], loads: int, block_size: int) -> "StepFeatures":
        decode = [c for c in chunks if c.tokens == 1]
        prefill = [c for c in chunks if c.tokens > 1]
        return StepFeatures(
            tokens=sum(c.tokens for c in chunks),
            sampled=sum(1 for c in chunks if c.sample),
            decode_cells=_padded_cells(decode, block_size),
            prefill_cells=_padded_cells(prefill, block_size),
            adapters=len({c.adapter for c in chunks if c.adapter is not None}),
            lora_token_rank=sum(c.tokens * c.rank for c in chunks if c.adapter is not None),
            loads=loads,
        )

    def vector(self) -> list[float]:
        return [1.0] + [float(getattr(self, f.name)) for f in fields(self)]


FEATURE_NAMES = ["constant"] + [f.name for f in fields(StepFeatures)]


@dataclass(frozen=True)
class ChunkShape:
    """What the cost of one chunk of a plan depends on."""

    tokens: int
    start_pos: int
    adapter: object | None  # any key naming the adapter (slot or name); None: base model
    rank: int
    sample: bool


def _padded_cells(chunks: list[ChunkShape], block_size: int) -> int:
    if not chunks:
        return 0
    max_queries = max(c.tokens for c in chunks)
    max_context = max(c.start_pos + c.tokens for c in chunks)
    max_keys = -(-max_context // block_size) * block_size
    return len(chunks) * max_queries * max_keys


# No unit of any feature (a step, a token, an attention cell, an adapter, a load) costs an
# hour on any executor: the fitted ones are 1e-9 to 0.08 s. Beyond it a model is a typo or
# garbage, and its results mislead: `constant = 1e300` made the tuning recommend
# prefill_weight 1.4e-303 (an outside probe).
MAX_COEFFICIENT_S = 3600.0


class UnusableCostModelError(ValueError):
    """Coefficients no executor's steps could have: not finite, negative, or absurdly large."""


def _check_coefficients(values: Mapping[str, object]) -> None:
    # NaN made the simulator's clock stand still (the arrival loop never ended) and a
    # negative coefficient ran it backwards (negative JCTs): refused for every user.
    bad = {name: value for name, value in values.items()
           if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0)}
    if bad:
        raise UnusableCostModelError(f"has coefficients that are not finite numbers >= 0 ({bad}): "
                                     "not a usable cost model")
    huge = {name: value for name, value in values.items() if value > MAX_COEFFICIENT_S}  # type: ignore[operator]
    if huge:
        raise UnusableCostModelError(f"has coefficients over {MAX_COEFFICIENT_S:g} s ({huge}): no executor spends an "
                                     "hour on one step, token, cell or adapter; not a usable cost model")


@dataclass
class StepCostModel:
    """seconds = coefficients . [1, features...]; `overhead_s` is added per step for what
    the executor's own timer does not see (transport, the coordinator's planning)."""

    coefficients: dict[str, float]
    overhead_s: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.coefficients) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown cost model features {sorted(unknown)}; known: {FEATURE_NAMES}")
        _check_coefficients({**self.coefficients, "overhead_s": self.overhead_s})
        self._terms = [(name, value) for name, value in self.coefficients.items() if name != "constant" and value]
        self._fixed = self.coefficients.get("constant", 0.0) + self.overhead_s

    def step_seconds(self, features: StepFeatures) -> float:
        total = self._fixed
        for name, value in self._terms:
            total += value * getattr(features, name)
        return total

    def scaled(self, factor: float) -> "StepCostModel":
        """Every step `factor` times as long (a machine slower than the one measured)."""
        return StepCostModel({k: v * factor for k, v in self.coefficients.items()}, self.overhead_s * factor,
                             f"{self.description}, scaled x{factor:.2f}")

    def save(self, path: str | Path) -> None:
        record = {"coefficients": self.coefficients, "overhead_s": self.overhead_s, "description": self.description}
        Path(path).write_text(json.dumps(record, indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> "StepCostModel":
        """The model `save` wrote. UnusableCostModelError (a ValueError) names the file for
        coefficients no step could take (every user of a cost model file loads it here:
        the simulator, the benchmarks, `inlaid tune-scheduler`, the server's tuning)."""
        raw = json.loads(Path(path).read_text())
        try:
            model = StepCostModel(coefficients=dict(raw["coefficients"]), overhead_s=raw.get("overhead_s", 0.0),
                                  description=str(raw.get("description", "")))
        except UnusableCostModelError as error:
            raise UnusableCostModelError(f"{str(path)!r} {error}") from None
        # A file lacking a coefficient was read as that feature costing nothing (a model
        # without `tokens` loaded and tuned on); `fit_cost_model` writes every one, 0 included.
        missing = [name for name in FEATURE_NAMES if name not in model.coefficients]
        if missing:
            raise UnusableCostModelError(f"{str(path)!r} lacks the coefficients {missing} (bench/sched_cost.py "
                                         "writes every feature's, 0 included): not a usable cost model")
        return model


def fit_cost_model(samples: Iterable[tuple[StepFeatures, float]], description: str = "") -> StepCostModel:
    """Non-negative least squares on relative error: each step weighs by 1/seconds, so a
    10 ms decode step counts as much as a 2 s prefill (the simulator runs far more of the
    former)."""
    import numpy as np
    from scipy.optimize import nnls

    rows, targets = [], []
    for features, seconds in samples:
        rows.append(features.vector())
        targets.append(seconds)
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    weights = 1.0 / np.maximum(y, 1e-4)
    # Columns on very different scales (1 vs 1e6 attention cells): normalise for the solver.
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    solution, _ = nnls((x / scale) * weights[:, None], y * weights)
    coefficients = {name: float(value / s) for name, value, s in zip(FEATURE_NAMES, solution, scale)}
    return StepCostModel(coefficients=coefficients, description=description)


def fit_errors(model: StepCostModel, samples: Iterable[tuple[StepFeatures, float]]) -> dict[str, float]:
    """Relative errors of the model on measured steps: mean / median / p90 |error| and the
    signed bias of the total (sum of predictions / sum of measurements - 1)."""
    errors, predicted_total, measured_total = [], 0.0, 0.0
    for features, seconds in samples:
        predicted = model.step_seconds(features)
        errors.append(abs(predicted - seconds) / seconds)
        predicted_total += predicted
        measured_total += seconds
    if not errors:
        return {"steps": 0}
    errors.sort()
    return {
        "steps": len(errors),
        "mean_abs_rel_error": sum(errors) / len(errors),
        "median_abs_rel_error": errors[len(errors) // 2],
        "p90_abs_rel_error": errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)],
        "total_bias": predicted_total / measured_total - 1.0 if measured_total else 0.0,
    }


def features_from_dict(raw: Mapping[str, float]) -> StepFeatures:
    return StepFeatures(**{f.name: int(raw[f.name]) for f in fields(StepFeatures)})
