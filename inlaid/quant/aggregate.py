"""How the per-task Hessians of one linear become the one Hessian GPTQ quantizes against.

Every task t contributes H_t = (2/n_t) X_t X_tᵀ (its own adapter active, previous layers
already quantized). Each aggregate below is, except `max`, a non-negative combination
Σ λ_t H_t: the Hessian of a reweighting of the tasks' tokens, so it stays PSD and GPTQ's
error compensation stays the exact optimum of a real objective. They differ in λ:

- token-mean:  λ_t ∝ n_t (GPTQ on the concatenated calibration set)
- task-mean:   λ_t = 1/T (every task weighs the same however many tokens its samples
               have; `mlgptq`'s default, there scaled by each task's probed cost κ_t)
- trace-norm:  λ_t ∝ 1/tr(H_t) (each task's inputs scaled to the same energy)
- error-norm:  λ_t ∝ 1/‖W X_t‖² (each task's RELATIVE output error weighs the same;
               GPTQ then minimises the sum of the tasks' relative errors)
- minimax:     error-norm, then a few rounds of multiplicative weights that raise λ for
               the tasks whose relative error is above the mean, keeping the round whose
               WORST task error is lowest (the max in MLGPTQ is over tasks' errors)
- bounded minimax: the same rounds started from the adapter-on token mean, a round kept
               only if its task-mean error stays within a slack of the start's (mlgptq
               until the NLL quality table; `mlgptq` is now the cost-weighted task
               mean, these rounds are its options)
- max:         the literal element-wise max of the H_t (kept as a baseline: not the
               covariance of any data; measured worse than the plain mean)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inlaid.quant.gptq import QuantizedWeight, gptq_quantize_many
from inlaid.quant.hessian import gram
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


class TaskHessians:
    """The per-task Hessians of one input, stacked [tasks, in, in] (fp32) so that a weighted
    sum Σ λ_t H_t is one product and so is every task's ⟨M, H_t⟩ = Σ_ij M_ij (H_t)_ij.

    The latter gives a task's error without a forward and without a per-task matmul:
    ‖A X_t‖² ∝ tr(A H_t Aᵀ) = ⟨AᵀA, H_t⟩, so one Gram matrix AᵀA serves every task."""

    def __init__(self, stats: dict[str, TaskHessian]) -> None:
        self.names = list(stats)
        self.tokens = {name: stat.tokens for name, stat in stats.items()}
        self.stacked = torch.stack([stat.hessian.float() for stat in stats.values()])

    def combine(self, weights: dict[str, float]) -> torch.Tensor:
        """Σ_t λ_t H_t with λ normalised to sum 1."""
        total = sum(weights.values())
        lam = torch.tensor([weights[name] / total for name in self.names], dtype=torch.float32)
        size = self.stacked.shape[-1]
        return (lam @ self.stacked.view(len(self.names), -1)).view(size, size)

    def inner(self, matrix: torch.Tensor) -> dict[str, float]:
        """⟨matrix, H_t⟩ for every task: one matrix-vector product over the stack."""
        sums = self.stacked.view(len(self.names), -1) @ matrix.float().reshape(-1)
        return dict(zip(self.names, sums.tolist()))

    def energies(self, weight: torch.Tensor) -> dict[str, float]:
        """tr(W H_t Wᵀ) = (2/n_t)‖W X_t‖² for every task."""
        return self.inner(gram(weight.float()))

    def errors(self, weight: torch.Tensor, quantized: torch.Tensor, energies: dict[str, float] | None = None) -> dict[str, float]:
        """Every task's relative output error ‖(W−Q)X_t‖²/‖WX_t‖²."""
        energies = energies if energies is not None else self.energies(weight)
        raw = self.inner(gram(weight.float() - quantized.float()))
        return {name: raw[name] / energies[name] if energies[name] > 0 else raw[name] for name in self.names}


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H Wᵀ) = (2/n)‖W X‖²."""
    weight = weight.float()
    return float(((weight.T @ weight) * hessian.float()).sum(dtype=torch.float64))


def static_weights(kind: str, weight: torch.Tensor, stats: dict[str, TaskHessian],
                   energies: dict[str, float] | None = None,
                   task_costs: dict[str, float] | None = None) -> dict[str, float]:
    """λ of the weighting `kind`, each task's scaled by its cost κ_t when `task_costs` are
    given (the start of mlgptq / minimax)."""
    if kind == "token-mean":
        lambdas = {name: float(stat.tokens) for name, stat in stats.items()}
    elif kind == "task-mean":
        lambdas = {name: 1.0 for name in stats}
    elif kind == "trace-norm":
        lambdas = {name: 1.0 / max(float(torch.trace(stat.hessian)), 1e-30) for name, stat in stats.items()}
    elif kind == "error-norm":
        energies = energies if energies is not None else TaskHessians(stats).energies(weight)
        lambdas = {name: 1.0 / max(energies[name], 1e-30) for name in stats}
    else:
        raise ValueError(f"unknown static weighting '{kind}'")
    if task_costs is None:
        return lambdas
    return {name: value * task_costs[name] for name, value in lambdas.items()}


def task_errors(
    weight: torch.Tensor, quantized: torch.Tensor, stats: dict[str, TaskHessian] | TaskHessians,
    energies: dict[str, float] | None = None,
) -> dict[str, float]:
    """Each task's relative error ‖(W-Q)X_t‖²/‖WX_t‖² (energies: precomputed ‖WX_t‖² terms)."""
    hessians = stats if isinstance(stats, TaskHessians) else TaskHessians(stats)
    return hessians.errors(weight, quantized, energies)


def elementwise_max(stats: dict[str, TaskHessian]) -> torch.Tensor:
    hessians = [stat.hessian.float() for stat in stats.values()]
    combined = hessians[0].clone()
    for hessian in hessians[1:]:
        torch.maximum(combined, hessian, out=combined)
    return combined


def quantize_static(kind: str, weights: list[torch.Tensor], stats: dict[str, TaskHessian], spec: QuantSpec,
                    hessians: TaskHessians | None = None) -> list[AggregateOutcome]:
    """GPTQ of every linear reading this input against one fixed combination of the H_t
    (token-mean: the concatenated calibration set). Token-mean needs no weight; the
    weight-dependent error-norm gives each linear its own combination."""
    hessians = hessians or TaskHessians(stats)
    lambdas = [static_weights(kind, weight, stats) for weight in weights]
    combined = _combine_distinct(hessians, lambdas)
    quantized = gptq_quantize_many(weights, combined, spec)
    return [AggregateOutcome(q, {name: value / sum(lam.values()) for name, value in lam.items()})
            for q, lam in zip(quantized, lambdas)]


def _combine_distinct(hessians: TaskHessians, lambdas: list[dict[str, float]]) -> list[torch.Tensor]:
    """Σ λ_t H_t per linear, built (and later factorized) once per distinct λ."""
    built: dict[tuple, torch.Tensor] = {}
    for lam in lambdas:
        key = tuple(lam[name] for name in hessians.names)
        if key not in built:
            built[key] = hessians.combine(lam)
    return [built[tuple(lam[name] for name in hessians.names)] for lam in lambdas]


def quantize_minimax(
    weights: list[torch.Tensor], stats: dict[str, TaskHessian], spec: QuantSpec, rounds: int = 4, step: float = 2.0,
    start: str = "error-norm", mean_slack: float | None = None, hessians: TaskHessians | None = None,
    task_costs: dict[str, float] | None = None,
) -> list[AggregateOutcome]:
    """Multiplicative-weights search, per linear, for the task weighting whose GPTQ result
    has the lowest worst-task cost c_t = κ_t·e_t (κ_t = `task_costs`, 1 by default: the
    relative error itself). Starts from `start` (error-norm: all relative errors weigh the
    same) scaled by κ; each round multiplies λ_t by (c_t / mean c)^step. With `mean_slack`,
    a round counts only if its task-mean cost is at most (1 + mean_slack) x the first
    round's. The linears reading one input (`weights`) search independently, their GPTQ runs
    batched round by round; `hessians`: the stats already stacked."""
    hessians = hessians or TaskHessians(stats)
    costs = task_costs or {name: 1.0 for name in stats}
    energies = [{name: max(value, 1e-30) for name, value in hessians.energies(weight).items()} for weight in weights]
    lambdas = [static_weights(start, weight, stats, energy, costs) for weight, energy in zip(weights, energies)]
    best: list[AggregateOutcome | None] = [None] * len(weights)
    best_worst = [float("inf")] * len(weights)
    mean_bound = [float("inf")] * len(weights)
    for round_index in range(max(rounds, 1)):
        quantized = gptq_quantize_many(weights, _combine_distinct(hessians, lambdas), spec)
        for index, (weight, candidate) in enumerate(zip(weights, quantized)):
            errors = hessians.errors(weight, candidate.dequantize(), energies[index])
            weighted = {name: costs[name] * error for name, error in errors.items()}
            worst = max(weighted.values())
            mean_error = sum(weighted.values()) / len(weighted)
            if round_index == 0 and mean_slack is not None:
                mean_bound[index] = (1.0 + mean_slack) * mean_error
            if worst < best_worst[index] and mean_error <= mean_bound[index]:
                # report λ relative to the normalised Hessians H_t / ‖W X_t‖²
                relative = {name: lambdas[index][name] * energies[index][name] for name in stats}
                total = sum(relative.values())
                best[index] = AggregateOutcome(candidate, {n: v / total for n, v in relative.items()}, errors)
                best_worst[index] = worst
            if mean_error > 0:
                lambdas[index] = {name: lambdas[index][name] * (weighted[name] / mean_error) ** step for name in stats}
    assert all(outcome is not None for outcome in best)
    return best  # type: ignore[return-value]
