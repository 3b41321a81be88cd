"""Per linear, when a task is added incrementally: re-quantize it or keep the served weight?

Two tests, in this order:

1. **Aggregate change.** The method's aggregate Hessian is formed over the existing tasks
   and over the existing tasks plus the new one; δ = ‖H_new − H_old‖_F / ‖H_old‖_F. GPTQ
   depends on H only through its shape (dampening is relative too), so δ measures how much
   the problem changed. A linear whose δ is at most the threshold keeps its served weight
   and is not re-quantized. For mlgptq/minimax H is the search's starting aggregate (the
   reweighting rounds start from it); for `gptq-task:<name>` it is that task's Hessian, so
   adding another task never changes it.
2. **Quality gate.** A re-quantized weight Q' replaces the served Q only if no existing task
   gets worse than the tolerance: for every task t already in the state,
   e_t(Q') <= (1 + tolerance) · e_t(Q), with e_t the relative reconstruction error
   tr((W−Q) H_t (W−Q)ᵀ) / tr(W H_t Wᵀ) from the stored H_t. Otherwise Q stays, and the
   decision records which task would have lost how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inlaid.quant.aggregate import TaskHessian, TaskHessians, elementwise_max, static_weights
from inlaid.quant.methods import Method, MlgptqOptions

REQUANTIZED = "requantized"
KEPT_UNCHANGED = "kept-unchanged"  # the aggregate moved by no more than the threshold
KEPT_QUALITY = "kept-quality"  # the re-quantized weight failed the quality gate


@dataclass
class LinearDecision:
    """What happened to one linear of one layer, and the numbers that decided it."""

    linear: str
    action: str
    change: float  # δ of the aggregate of its input group
    errors_served: dict[str, float] = field(default_factory=dict)  # every task's e_t on the served weight
    errors_new: dict[str, float] = field(default_factory=dict)  # ... on the re-quantized one (when computed)
    reason: str = ""
    task_weights: dict[str, float] = field(default_factory=dict)  # the aggregate's λ of a re-quantized linear

    @property
    def swapped(self) -> bool:
        return self.action == REQUANTIZED


def aggregate_for_change(method: Method, weight: torch.Tensor, stats: dict[str, TaskHessian],
                         options: MlgptqOptions, task_costs: dict[str, float] | None = None) -> torch.Tensor | None:
    """The Hessian whose change decides re-quantization (None: the method uses none);
    `task_costs` weigh the tasks as they weigh mlgptq's start (None: alike)."""
    if not stats or method.kind == "rtn":
        return None
    if method.kind == "gptq-task":
        stat = stats.get(method.task or "")
        return None if stat is None else stat.hessian.float()
    if method.kind == "max":
        return elementwise_max(stats)
    kind = {"mlgptq": options.start, "minimax": "error-norm"}.get(method.kind, "token-mean")
    costs = task_costs if method.kind in ("mlgptq", "minimax") else None
    return TaskHessians(stats).combine(static_weights(kind, weight, stats, task_costs=costs))


def aggregate_change(method: Method, weight: torch.Tensor, existing: dict[str, TaskHessian],
                     merged: dict[str, TaskHessian], options: MlgptqOptions,
                     task_costs: dict[str, float] | None = None) -> float:
    """δ between the aggregate over the existing tasks and over the merged set (inf when
    there was no aggregate before: nothing to compare with, so always re-quantize)."""
    old = aggregate_for_change(method, weight, existing, options, task_costs)
    new = aggregate_for_change(method, weight, merged, options, task_costs)
    if new is None:
        return 0.0
    if old is None:
        return float("inf")
    reference = float(torch.linalg.matrix_norm(old))
    if reference == 0.0:
        return float("inf")
    return float(torch.linalg.matrix_norm(new - old)) / reference


def quality_gate(reference: dict[str, float], requantized: dict[str, float], existing: list[str],
                 tolerance: float | None) -> tuple[bool, str]:
    """(accept, reason) given every task's reference error (incremental_linears.py: the error it
    had when the gate first saw it, not the served one, so that a task's losses do not compound
    over jobs) and its error on the re-quantized weight; only the tasks in `existing` can veto.
    tolerance None: accept always."""
    if tolerance is None:
        return True, ""
    worse = {name: requantized[name] / reference[name] - 1.0 if reference[name] > 0 else float("inf")
             for name in existing if requantized[name] > (1.0 + tolerance) * reference[name]}
    if not worse:
        return True, ""
    name = max(worse, key=lambda key: worse[key])
    return False, (f"task {name!r} would lose {100 * worse[name]:.1f}% against its reference error "
                   f"{reference[name]:.3g} (tolerance {100 * tolerance:.1f}%)")
