"""One layer's linears in an incremental re-quantization: their served packed tensors, and
for each input group whether a linear keeps its served weight or is re-quantized.

`IncrementalQuantizer` (incremental.py) runs the layer loop and keeps the bookkeeping (the
merged Hessian state, the costs, the paces); what becomes of each linear is decided here,
from the aggregate's change (`layer_decisions.aggregate_change`) and the quality gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import torch
from safetensors import SafetensorError, safe_open

from inlaid.kernels.dispatch import QuantLinearWeights
from inlaid.quant.aggregate import TaskHessian, TaskHessians
from inlaid.quant.checkpoint import pack_linear, unpack_linear
from inlaid.quant.errors import CheckpointError
from inlaid.quant.gptq import QuantizedWeight
from inlaid.quant.layer_decisions import (
    KEPT_QUALITY, KEPT_UNCHANGED, REQUANTIZED, LinearDecision, aggregate_change, quality_gate,
)
from inlaid.quant.methods import Method, MlgptqOptions, quantize_linears
from inlaid.quant.model_io import INPUT_GROUPS, LINEAR_NAMES, plain_linear
from inlaid.quant.spec import QuantSpec

_PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".bias")
# task -> linear -> its reference relative error, for one input group (state.References)
GroupReferences: TypeAlias = dict[str, dict[str, float]]


def read_layer_tensors(weights_file: Path, layer: int) -> dict[str, torch.Tensor]:
    """The packed GPTQ tensors of one decoder layer's linears from a safetensors file."""
    prefix = f"model.layers.{layer}."
    wanted = {f"{prefix}{name}{suffix}" for name in LINEAR_NAMES for suffix in _PACKED_SUFFIXES}
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key in wanted}
    except SafetensorError as error:  # a served layer's file (the checkpoint's was checked at the start)
        raise CheckpointError(f"{weights_file} is truncated or not a safetensors file ({error})") from None
    missing = [name for name in LINEAR_NAMES if f"{prefix}{name}.qweight" not in tensors]
    if missing:
        raise CheckpointError(f"{weights_file}: layer {layer} lacks quantized {missing}")
    return tensors


def unpack_layer_linear(tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec,
                        in_features: int, out_features: int) -> QuantizedWeight:
    return unpack_linear(QuantLinearWeights(
        qweight=tensors[prefix + ".qweight"], qzeros=tensors[prefix + ".qzeros"], scales=tensors[prefix + ".scales"],
        g_idx=tensors.get(prefix + ".g_idx"), bits=spec.bits, group_size=spec.effective_group_size(in_features),
        in_features=in_features, out_features=out_features,
    ))


@dataclass(frozen=True)
class LinearPolicy:
    """What the keep-or-requantize decision of every linear of a job reads: the checkpoint's
    method, spec and options, the merged set's task costs (None: the method weighs no costs)
    and the job's `IncrementalSettings` threshold and tolerance."""

    method: Method
    spec: QuantSpec
    options: MlgptqOptions
    task_costs: dict[str, float] | None
    change_threshold: float
    quality_tolerance: float | None


def decide_group_linears(policy: LinearPolicy, layer: torch.nn.Module, prefix: str, group: str,
                         served: dict[str, torch.Tensor], existing: dict[str, TaskHessian],
                         merged: dict[str, TaskHessian], served_from: dict[str, TaskHessian],
                         references: GroupReferences | None = None,
                         ) -> tuple[list[LinearDecision], dict[str, torch.Tensor], GroupReferences]:
    """Decide the linears reading input `group` and write the chosen weights into the layer
    (the next group's inputs are computed with them). Returns the decisions, the chosen
    packed tensors and every merged task's reference errors to store.

    The gate measures an existing task against its reference error on each linear, not the
    served one: against the served one, every job could double a task's error again (an
    outside probe saw a task added live end at 3.3x its NLL from before its own job, two jobs on).
    A task's reference is the first error the gate saw for it: an existing task's served error
    when it has none stored (a full run's tasks: their checkpoint's error), the job's own task's
    error on the weight its job chose. `served_from`: the aggregate the served weights came
    from, which a linear's change is measured against: `existing`, with the job's own task's
    earlier Hessians when it is added again (without them its identical samples read as its
    whole weight moving: 1.2 % on every linear of the 4-bit suite base, every layer
    re-quantized to the same weights, an outside probe)."""
    references = references or {}
    names = INPUT_GROUPS[group]
    linears = [plain_linear(layer, name) for name in names]
    weights = [linear.weight.data.float() for linear in linears]
    changes = [aggregate_change(policy.method, weight, served_from, merged, policy.options, policy.task_costs)
               for weight in weights]
    moved = [i for i, change in enumerate(changes) if change > policy.change_threshold]
    stack = TaskHessians(merged)
    outcomes = dict(zip(moved, quantize_linears(
        policy.method, [weights[i] for i in moved], merged, policy.spec, policy.options,
        stack if len(merged) > 1 else None, policy.task_costs))) if moved else {}
    decisions: list[LinearDecision] = []
    tensors: dict[str, torch.Tensor] = {}
    kept_references: GroupReferences = {task: {} for task in merged}
    for i, (name, linear, weight) in enumerate(zip(names, linears, weights)):
        key = f"{prefix}.{name}"
        served_weight = unpack_layer_linear(served, key, policy.spec, linear.in_features, linear.out_features)
        served_dense = served_weight.dequantize()
        before = stack.errors(weight, served_dense)
        reference = {task: references.get(task, {}).get(name, before[task]) for task in merged}
        chosen_errors = before
        chosen, packed = served_dense, {k: v for k, v in served.items() if k.startswith(key + ".")}
        if i not in outcomes:
            decision = LinearDecision(name, KEPT_UNCHANGED, changes[i], before, reason=(
                f"aggregate moved {100 * changes[i]:.2f}% <= threshold {100 * policy.change_threshold:.2f}%"))
        else:
            outcome = outcomes[i]
            dequantized = outcome.quantized.dequantize()
            after = (outcome.task_errors if set(outcome.task_errors) == set(merged)
                     else stack.errors(weight, dequantized))  # the search measured them already
            accepted, reason = quality_gate(reference, after, list(existing), policy.quality_tolerance)
            if accepted:
                chosen_errors = after
                decision = LinearDecision(name, REQUANTIZED, changes[i], before, after,
                                          task_weights=outcome.task_weights)
                bias = linear.bias.data if linear.bias is not None else None
                chosen, packed = dequantized, pack_linear(key, outcome.quantized, bias)
            else:
                decision = LinearDecision(name, KEPT_QUALITY, changes[i], before, after, reason)
        with torch.no_grad():  # a versioned write: a packed oneDNN copy follows (model_io.onednn_linears)
            linear.weight.copy_(chosen.to(linear.weight.dtype))
        decisions.append(decision)
        tensors.update(packed)
        for task in merged:
            kept_references[task][name] = reference[task] if task in existing else chosen_errors[task]
    return decisions, tensors, kept_references
