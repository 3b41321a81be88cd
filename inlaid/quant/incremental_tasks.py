"""Which stored tasks an incremental re-quantization aggregates.

The merged Hessian state is rewritten layer by layer: a job writes each finished layer (and
`task_costs.json` when it starts) without the tasks it was told to drop. A task that comes
back afterwards (a config task listed again at a restart after a live removal; a removed task
added again while another job ran) then has Hessians in some layers only, and no probed cost.
Aggregating it in the layers that still hold it would weigh a different task set per layer,
and the cost-weighted aggregate has no weight for it (the `KeyError: 'trans-fr'` every later
job failed with). The rule: a stored task joins the aggregate only where the state holds it
whole — in every input group of every stored layer, and in the costs when the method weighs
tasks by them. Any other is left out of the whole job (consistently, every layer), and the
layers this job writes no longer hold it: it rejoins only through a re-quantization with its
own calibration (an addition of it with its calibration file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inlaid.quant.errors import CheckpointError
from inlaid.quant.state_files import stored_layer_tasks
from inlaid.quant.task_costs import COSTS_FILE

REJOIN_HINT = "it rejoins the aggregate only when it is added again with its calibration file"


@dataclass(frozen=True)
class StoredTaskSet:
    """kept: the stored tasks the job aggregates; left_out: task -> why it is not."""

    kept: frozenset[str]
    left_out: dict[str, str] = field(default_factory=dict)


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (a message names the layers without listing thirty)."""
    spans: list[str] = []
    start = previous = layers[0]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == previous + 1:
            previous = layer
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if layer is not None:
            start = previous = layer
    return ", ".join(spans)


def consistent_stored_tasks(state_dirs: list[Path], num_layers: int, dropped: set[str],
                            costs: dict[str, float] | None) -> StoredTaskSet:
    """The stored tasks (not `dropped`) a job may aggregate in every layer. `costs`: the stored
    raw probes when the method weighs tasks by them (None: it does not). CheckpointError when
    a layer has no state, or its file does not read: found at the job's start, not when the
    layer loop reaches it (a quantize-add with layer 10's file gone failed after 10 layers)."""
    groups_of: dict[int, dict[str, set[str]]] = {}
    for layer in range(num_layers):
        groups = stored_layer_tasks(state_dirs, layer)
        if groups is not None:
            groups_of[layer] = groups
    if missing_layers := [layer for layer in range(num_layers) if layer not in groups_of]:
        raise CheckpointError(f"no Hessian state for layer(s) {_layer_ranges(missing_layers)} in "
                              f"{[str(directory) for directory in state_dirs]}: the stored state is incomplete; "
                              "re-quantize the checkpoint fully (`inlaid quantize-add --exact` recomputes every "
                              "Hessian instead of reading them)")
    stored = {task for groups in groups_of.values() for tasks in groups.values() for task in tasks} - dropped
    left_out: dict[str, str] = {}
    for task in sorted(stored):
        missing = [layer for layer, groups in groups_of.items() if any(task not in tasks for tasks in groups.values())]
        if missing:
            left_out[task] = (f"the merged Hessian state lacks it in layer(s) {_layer_ranges(missing)} (a job ran "
                              f"while it was removed); {REJOIN_HINT}")
        elif costs is not None and task not in costs:
            left_out[task] = (f"it has Hessians but no probed cost in {COSTS_FILE} (a job ran while it was "
                              f"removed); {REJOIN_HINT}")
    return StoredTaskSet(kept=frozenset(stored - set(left_out)), left_out=left_out)


__all__ = ["REJOIN_HINT", "StoredTaskSet", "consistent_stored_tasks", "stored_layer_tasks"]
