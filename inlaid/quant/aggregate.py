"""How the per-task Hessians of one linear become the one Hessian GPTQ quantizes against.

Every task t contributes H_t = (2/n_t) X_t X_tᵀ (its own adapter active, previous layers
already quantized). Each aggregate below is, except `max`, a non-negative combination
Σ λ_t H_t: the Hessian of a reweighting of the tasks' tokens, so it stays PSD and GPTQ's
error compensation stays the exact optimum of a real objective. They differ in λ:

- token-mean:  λ_t ∝ n_t (GPTQ on the concatenated calibration set)
- task-mean:   λ_t = 1/T
- trace-norm:  λ_t ∝ 1/tr(H_t) (each task's inputs scaled to the same energy)
- error-norm:  λ_t ∝ 1/‖W X_t‖² (each task's RELATIVE output error weighs the same;
               GPTQ then minimises the sum of the tasks' relative errors)
- minimax:     error-norm, then a few rounds of multiplicative weights that raise λ for
               the tasks whose relative error is above the mean, keeping the round whose
               WORST task error is lowest (the max in MLGPTQ is over tasks' errors)
- bounded minimax (`mlgptq`): the same rounds started from the adapter-on token mean, a
               round kept only if its task-mean error stays within a slack of the start's:
               the worst task gains where that costs the other tasks little
- max:         the literal element-wise max of the H_t (kept as a baseline: not the
               covariance of any data; measured worse than the plain mean)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inlaid.quant.gptq import QuantizedWeight, gptq_quantize
from inlaid.quant.hessian import quadratic_form_trace, reconstruction_error
from inlaid.quant.spec import QuantSpec


@dataclass
class TaskHessian:
    hessian: torch.Tensor
    tokens: int


@dataclass
class AggregateOutcome:
    quantized: QuantizedWeight
    task_weights: dict[str, float] = field(default_factory=dict)
    task_errors: dict[str, float] = field(default_factory=dict)


def _weighted_sum(stats: dict[str, TaskHessian], weights: dict[str, float]) -> torch.Tensor:
    total = sum(weights.values())
    first = next(iter(stats.values())).hessian
    combined = torch.zeros_like(first, dtype=torch.float32)
    for name, stat in stats.items():
        combined.add_(stat.hessian.float(), alpha=weights[name] / total)
    return combined


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H Wᵀ) = (2/n)‖W X‖²."""
    return quadratic_form_trace(weight, hessian)


def static_weights(kind: str, weight: torch.Tensor, stats: dict[str, TaskHessian]) -> dict[str, float]:
    if kind == "token-mean":
        return {name: float(stat.tokens) for name, stat in stats.items()}
    if kind == "task-mean":
        return {name: 1.0 for name in stats}
    if kind == "trace-norm":
        return {name: 1.0 / max(float(torch.trace(stat.hessian)), 1e-30) for name, stat in stats.items()}
    if kind == "error-norm":
        return {name: 1.0 / max(output_energy(weight, stat.hessian), 1e-30) for name, stat in stats.items()}
    raise ValueError(f"unknown static weighting '{kind}'")


def task_errors(
    weight: torch.Tensor, quantized: torch.Tensor, stats: dict[str, TaskHessian],
    energies: dict[str, float] | None = None,
) -> dict[str, float]:
    """Each task's relative error ‖(W-Q)X_t‖²/‖WX_t‖² (energies: precomputed ‖WX_t‖² terms)."""
    return {
        name: reconstruction_error(weight, quantized, stat.hessian, None if energies is None else energies[name])
        for name, stat in stats.items()
    }


def elementwise_max(stats: dict[str, TaskHessian]) -> torch.Tensor:
    hessians = [stat.hessian.float() for stat in stats.values()]
    combined = hessians[0].clone()
    for hessian in hessians[1:]:
        torch.maximum(combined, hessian, out=combined)
    return combined


def quantize_static(kind: str, weight: torch.Tensor, stats: dict[str, TaskHessian], spec: QuantSpec) -> AggregateOutcome:
    weights = static_weights(kind, weight, stats)
    quantized = gptq_quantize(weight, _weighted_sum(stats, weights), spec)
    total = sum(weights.values())
    return AggregateOutcome(quantized, {name: value / total for name, value in weights.items()})


def quantize_minimax(
    weight: torch.Tensor, stats: dict[str, TaskHessian], spec: QuantSpec, rounds: int = 4, step: float = 2.0,
    start: str = "error-norm", mean_slack: float | None = None,
) -> AggregateOutcome:
    """Multiplicative-weights search for the task weighting whose GPTQ result has the lowest
    worst-task relative error. Starts from `start` (error-norm: all relative errors weigh
    the same); each round multiplies λ_t by (e_t / mean e)^step. With `mean_slack`, a round
    counts only if its task-mean error is at most (1 + mean_slack) x the first round's."""
    energies = {name: max(output_energy(weight, stat.hessian), 1e-30) for name, stat in stats.items()}
    weights = static_weights(start, weight, stats)
    best: AggregateOutcome | None = None
    best_worst = float("inf")
    mean_bound = float("inf")
    for round_index in range(max(rounds, 1)):
        quantized = gptq_quantize(weight, _weighted_sum(stats, weights), spec)
        errors = task_errors(weight, quantized.dequantize(), stats, energies)
        worst = max(errors.values())
        mean_error = sum(errors.values()) / len(errors)
        if round_index == 0 and mean_slack is not None:
            mean_bound = (1.0 + mean_slack) * mean_error
        if worst < best_worst and mean_error <= mean_bound:
            # report λ relative to the normalised Hessians H_t / ‖W X_t‖²
            relative = {name: weights[name] * energies[name] for name in stats}
            total = sum(relative.values())
            best = AggregateOutcome(quantized, {n: v / total for n, v in relative.items()}, errors)
            best_worst = worst
        if round_index + 1 == rounds:
            break
        if mean_error <= 0:
            break
        weights = {name: weights[name] * (errors[name] / mean_error) ** step for name in stats}
    assert best is not None
    return best
