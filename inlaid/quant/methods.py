"""The quantization methods, selectable by name, and what each needs from calibration.

    mlgptq            Inlaid's multi-task GPTQ: the adapter-forward H_t averaged per TASK, not
                      per token (a task with short samples is not outvoted), each task weighed
                      by what logit noise costs its answers (probed); options (MlgptqOptions)
                      add a search toward the worst task. Chosen from the NLL quality table
                      (docs/quantization.md)
    minimax           the unbounded worst-task search from error-norm weights (mlgptq before
                      the quality table chose a bounded form, then the task mean)
    max               GPTQ on the literal element-wise max of the adapter-forward H_t (baseline)
    gptq-mixed        GPTQ on the token mean over the mixed calibration set, adapters OFF
                      (the paper's "GPTQ-tweaked")
    gptq-mean-lora    GPTQ on the token mean, each task's adapter active for its samples
    gptq-task:<name>  GPTQ on one task's adapter-forward Hessian (a per-task model)
    rtn               round-to-nearest, no calibration
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inlaid.quant.aggregate import (
    AggregateOutcome, TaskHessian, TaskHessians, elementwise_max, quantize_minimax, quantize_static,
)
from inlaid.quant.errors import UnknownMethodError
from inlaid.quant.gptq import gptq_quantize_many, rtn_quantize
from inlaid.quant.spec import QuantSpec

METHOD_NAMES: tuple[str, ...] = ("mlgptq", "minimax", "max", "gptq-mixed", "gptq-mean-lora", "gptq-task:<name>", "rtn")


@dataclass(frozen=True)
class MlgptqOptions:
    """The aggregate mlgptq starts from (`start`, static_weights in aggregate.py) and the
    worst-task search after it: rounds of reweighting (1: none, the start is the result),
    how hard each round pushes and how much task-mean error a round may add (None:
    unbounded); `sensitivity`: what a task's error costs it — "none" (every task's relative
    error alike) or "impurity" (its answers' Gini impurity, probed on `probe_samples`
    calibration samples per task: the second-order NLL cost of noise on the logits;
    task_costs.py). The defaults are the NLL quality table's choice: the impurity-weighted
    task mean, no search. The bounded search from the token mean (rounds=4,
    start="token-mean", mean_slack=0.05, sensitivity="none": mlgptq until then) lowered the
    per-linear worst error but raised the worst task's answer NLL (docs/quantization.md,
    "Answer NLL")."""

    rounds: int = 1
    step: float = 2.0
    start: str = "task-mean"
    mean_slack: float | None = 0.0
    sensitivity: str = "impurity"
    probe_samples: int = 8

    def __post_init__(self) -> None:
        if self.sensitivity not in SENSITIVITIES:
            raise UnknownMethodError(f"unknown sensitivity '{self.sensitivity}'; choose from {', '.join(SENSITIVITIES)}")
        if self.start not in STARTS:
            raise UnknownMethodError(f"unknown mlgptq start '{self.start}'; choose from {', '.join(STARTS)}")
        if self.rounds < 1 or self.probe_samples < 1:
            raise UnknownMethodError("mlgptq needs at least one round and one probe sample per task")


SENSITIVITIES = ("none", "impurity")
STARTS = ("task-mean", "token-mean", "trace-norm", "error-norm")


@dataclass(frozen=True)
class Method:
    kind: str
    task: str | None = None

    @property
    def name(self) -> str:
        return f"gptq-task:{self.task}" if self.kind == "gptq-task" else self.kind

    @property
    def hessian_forward(self) -> str | None:
        """Which forward feeds its Hessians: 'adapter', 'base' (adapters off) or None (RTN)."""
        if self.kind == "rtn":
            return None
        return "base" if self.kind == "gptq-mixed" else "adapter"

    def hessian_tasks(self, task_names: list[str]) -> list[str]:
        return [self.task] if self.kind == "gptq-task" else list(task_names)


def parse_method(text: str, task_names: list[str] | None = None) -> Method:
    text = text.strip()
    if text.startswith("gptq-task:"):
        task = text.split(":", 1)[1]
        if not task:
            raise UnknownMethodError("gptq-task needs a task name: gptq-task:<name>")
        if task_names is not None and task not in task_names:
            raise UnknownMethodError(f"gptq-task:{task}: no task '{task}' among {', '.join(task_names)}")
        return Method("gptq-task", task)
    if text in ("mlgptq", "minimax", "max", "gptq-mixed", "gptq-mean-lora", "rtn"):
        return Method(text)
    raise UnknownMethodError(f"unknown method '{text}'; choose from {', '.join(METHOD_NAMES)}")


def quantize_linear(
    method: Method, weight: torch.Tensor, stats: dict[str, TaskHessian], spec: QuantSpec,
    options: MlgptqOptions = MlgptqOptions(), hessians: TaskHessians | None = None,
    task_costs: dict[str, float] | None = None,
) -> AggregateOutcome:
    """Quantize one linear's weight [out, in] given the Hessians of its input (per task)."""
    return quantize_linears(method, [weight], stats, spec, options, hessians, task_costs)[0]


def quantize_linears(
    method: Method, weights: list[torch.Tensor], stats: dict[str, TaskHessian], spec: QuantSpec,
    options: MlgptqOptions = MlgptqOptions(), hessians: TaskHessians | None = None,
    task_costs: dict[str, float] | None = None,
) -> list[AggregateOutcome]:
    """Quantize the linears that read one input (q/k/v, gate/up, or a single one) given that
    input's Hessians per task; their GPTQ runs are batched. Each linear's result is what
    `quantize_linear` gives it alone. `hessians`: the same stats already stacked;
    `task_costs`: what a unit of relative error costs each task (mlgptq/minimax; None: 1)."""
    if method.kind == "rtn":
        return [AggregateOutcome(rtn_quantize(weight, spec)) for weight in weights]
    if method.kind == "gptq-task":
        hessian = stats[method.task].hessian
        return [AggregateOutcome(q, {method.task: 1.0}) for q in gptq_quantize_many(weights, [hessian] * len(weights), spec)]
    if method.kind in ("gptq-mixed", "gptq-mean-lora"):
        return quantize_static("token-mean", weights, stats, spec, hessians)
    if method.kind == "max":
        combined = elementwise_max(stats)
        return [AggregateOutcome(q) for q in gptq_quantize_many(weights, [combined] * len(weights), spec)]
    if method.kind in ("mlgptq", "minimax"):
        if len(stats) == 1:
            name, stat = next(iter(stats.items()))
            return [AggregateOutcome(q, {name: 1.0})
                    for q in gptq_quantize_many(weights, [stat.hessian] * len(weights), spec)]
        if method.kind == "minimax":
            return quantize_minimax(weights, stats, spec, rounds=options.rounds, step=options.step, hessians=hessians,
                                    task_costs=task_costs)
        return quantize_minimax(weights, stats, spec, rounds=options.rounds, step=options.step, start=options.start,
                                mean_slack=options.mean_slack, hessians=hessians, task_costs=task_costs)
    raise UnknownMethodError(f"unknown method kind '{method.kind}'")


__all__ = ["METHOD_NAMES", "Method", "MlgptqOptions", "parse_method", "quantize_linear", "quantize_linears"]
