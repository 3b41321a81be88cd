"""What a re-quantization did to the tasks already served: how far each linear's aggregate
Hessian moved (δ, against the threshold that decides re-quantization), and each task's mean
relative error on the weights served before and on those served after.

Torch-free: `inlaid quantize-add` prints it from its layer outcomes, and the server's task
status (the coordinator) reports it from the decisions its requantizer sent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict


@dataclass(frozen=True)
class LinearEffect:
    change: float  # δ of the linear's aggregate
    errors_served: Mapping[str, float]  # each task's relative error on the weight served before
    errors_new: Mapping[str, float]  # ... on the re-quantized weight (when computed)
    swapped: bool  # the re-quantized weight serves now


@dataclass(frozen=True)
class TaskEffect:
    task: str
    error_before: float  # mean over the linears whose errors were computed
    error_after: float


@dataclass(frozen=True)
class JobEffect:
    change_median: float
    change_max: float
    tasks: list[TaskEffect] = field(default_factory=list)


class StoredEffect(TypedDict):
    """A JobEffect as the server's state directory keeps it, with the threshold of its job."""

    change_median: float
    change_max: float
    change_threshold: float
    tasks: dict[str, tuple[float, float]]  # task -> (error before, error after)


def job_effect(linears: Iterable[LinearEffect]) -> JobEffect | None:
    """None when no linear was decided."""
    linears = list(linears)
    changes = sorted(linear.change for linear in linears)
    if not changes:
        return None
    tasks = []
    for task in sorted({task for linear in linears for task in linear.errors_served}):
        scored = [linear for linear in linears if task in linear.errors_served]
        before = [linear.errors_served[task] for linear in scored]
        # a linear kept as served keeps its error; a swapped one without the task's new error
        # (not computed) counts as served, as quantize-add counted it
        after = [linear.errors_new.get(task, linear.errors_served[task]) if linear.swapped
                 else linear.errors_served[task] for linear in scored]
        tasks.append(TaskEffect(task, sum(before) / len(before), sum(after) / len(after)))
    return JobEffect(change_median=changes[len(changes) // 2], change_max=changes[-1], tasks=tasks)


def effect_lines(effect: JobEffect | None, threshold: float) -> list[str]:
    """The effect as indented report lines (none for no effect)."""
    if effect is None:
        return []
    lines = [f"  aggregate moved: median {100 * effect.change_median:.2f} %, at most {100 * effect.change_max:.2f} % "
             f"(a linear that moved by at most the threshold, {100 * threshold:.2f} %, is kept)"]
    for task in effect.tasks:
        before, after = task.error_before, task.error_after
        if before > 0:
            lines.append(f"  {task.task}: mean relative error {before:.3e} -> {after:.3e} "
                         f"({100 * (after / before - 1):+.1f} %)")
        else:
            lines.append(f"  {task.task}: mean relative error {after:.3e}")
    return lines
