"""Incremental MLGPTQ: add one task to a quantized base, layer by layer.

The checkpoint being extended stores, per layer, every task's Hessians H_t (its
`hessian_state/`). Adding task T+1 runs only ITS calibration samples through the model, with
its adapter active and everything before the current linear already on the new quantization
(earlier layers, and earlier input groups of this layer: `layerwise`, true-sequential, the
same pass the full driver makes); at each input group its H joins the stored ones, and each
linear is re-quantized from the
full-precision weight W with the method of the checkpoint (mlgptq by default) when the
aggregate moved beyond a threshold and the result passes the quality gate
(`incremental_linears.py`, `layer_decisions.py`); otherwise the served weight stays.

Equivalence with a full MLGPTQ over T+1 tasks from the same inputs:
- `exact=True` recomputes every existing task's Hessians on the new base too (the stored
  ones came from the OLD quantization of what precedes each linear). With threshold 0 and
  no gate the result is bit-for-bit the full run's: the same streams, batches, Hessians,
  task order and per-group calls.
- the default (`exact=False`) uses the stored H_t of the existing tasks. The first input
  group of layer 0 is then bit-exact too (its inputs do not depend on any quantization);
  after it, the stored H_t differ from the full run's by the effect of the re-quantization
  of the linears before on the existing tasks' activations, measured and bounded in
  tests/test_dynamic_incremental.py and docs/dynamic-tasks.md. Only the new task's forward
  runs: that is the saving.

`IncrementalQuantizer.layers()` yields one `LayerOutcome` per layer and writes the merged
Hessian state of each layer to `state_out` before yielding it; what becomes of the packed
tensors (a new checkpoint, or a live handover to a server) is the caller's business.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from inlaid.engine.adapter_config import adapter_signature
from inlaid.quant.aggregate import TaskHessian
from inlaid.quant.calibration import (
    CalibrationTask, TokenBatch, make_batches, read_calibration_examples, tokenize_examples,
)
from inlaid.quant.checkpoint import METADATA_FILE, WEIGHTS_FILE, check_gptq_checkpoint, read_inlaid_metadata
from inlaid.quant.driver import DriverConfig
from inlaid.quant.errors import CheckpointError, QuantizationError
from inlaid.quant.incremental_linears import (
    LinearPolicy, decide_group_linears, read_layer_tensors, unpack_layer_linear,
)
from inlaid.quant.incremental_tasks import consistent_stored_tasks
from inlaid.quant.layer_decisions import LinearDecision
from inlaid.quant.layerwise import GroupHessians, PhaseTimer, Stream, propagate, quantize_layer_sequential
from inlaid.quant.methods import Method, MlgptqOptions, parse_method
from inlaid.quant.model_io import (
    LINEAR_NAMES, active_adapter, capture_first_layer_inputs, decoder_layers,
    load_base_model, onednn_linears, plain_linear,
)
from inlaid.quant.run_support import absolute, attach_adapters_quietly, recorded_path
from inlaid.quant.spec import QuantSpec
from inlaid.quant.state import (LayerState, References, layer_state_path, load_layer_state, load_reference_errors,
                                save_layer_state)
from inlaid.quant.task_costs import COSTS_FILE, load_raw_costs, normalized, probe_count, probe_impurity, save_raw_costs
from inlaid.quant.unfinished import unfinished_problem

_DRIVER_DEFAULTS = {f.name: f.default for f in fields(DriverConfig)}
log = logging.getLogger("inlaid.incremental")


class IncrementalError(QuantizationError):
    """The checkpoint cannot be extended incrementally (no Hessian state, RTN base, ...)."""


@dataclass(frozen=True)
class IncrementalSettings:
    """change_threshold: δ at or below which a linear keeps its served weight (0: re-quantize
    whenever the aggregate moved at all; 1 % by default: GPTQ re-run on an aggregate that moved
    less re-rolls the rounding of every task's weights, changing their answers for no gain, an
    outside probe adding a tenth task saw δ of 0.07 % median, 0.3 % at most). quality_tolerance:
    how much relative error an existing task may gain on a linear (1.0: at most double); None
    disables the gate. exact: recompute the existing tasks' Hessians too (a full calibration
    forward; with threshold 0 and no gate, bit-exact with a full run). The calibration sizes
    default to the checkpoint's own."""

    change_threshold: float = 0.01
    quality_tolerance: float | None = 1.0
    exact: bool = False
    max_samples: int | None = None
    max_tokens: int | None = None
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.change_threshold >= 0.0:
            raise IncrementalError(f"change_threshold must be >= 0, got {self.change_threshold}")
        if self.quality_tolerance is not None and not self.quality_tolerance >= 0.0:
            raise IncrementalError(f"quality_tolerance must be >= 0 (or None), got {self.quality_tolerance}")


@dataclass
class LayerOutcome:
    layer: int
    decisions: list[LinearDecision]
    tensors: dict[str, torch.Tensor] | None  # the whole layer's GPTQ tensors when any linear changed
    forward_seconds: float  # the calibration forward and Hessians of this layer
    quantize_seconds: float  # aggregation, GPTQ and the decisions

    @property
    def changed(self) -> bool:
        return self.tensors is not None


def read_checkpoint_metadata(checkpoint_dir: Path) -> dict:
    """The checkpoint's Inlaid metadata (its tensors are checked by IncrementalQuantizer)."""
    unfinished = unfinished_problem(checkpoint_dir)
    if unfinished:
        raise IncrementalError(unfinished)
    if not Path(checkpoint_dir).exists():  # "has no inlaid_quant.json" read as if the directory were there
        raise IncrementalError(f"{checkpoint_dir} does not exist")
    if not Path(checkpoint_dir).is_dir():
        raise IncrementalError(f"{checkpoint_dir} is a file, not a checkpoint directory")
    try:
        metadata = read_inlaid_metadata(checkpoint_dir)
    except CheckpointError as error:
        raise IncrementalError(str(error)) from None
    if metadata is None:
        raise IncrementalError(f"{checkpoint_dir} has no {METADATA_FILE}: not a checkpoint written by `inlaid quantize`")
    problem = _metadata_problem(metadata)
    if problem:  # else a KeyError or TypeError traceback, deep in the quantizer
        raise IncrementalError(f"{Path(checkpoint_dir) / METADATA_FILE}: {problem}: the checkpoint is damaged or was "
                               "edited; rebuild it with `inlaid quantize`")
    return metadata


def _metadata_problem(metadata: dict) -> str | None:
    """What of the metadata a task addition reads is missing or malformed, or None."""
    tasks, calibration = metadata.get("tasks", []), metadata.get("calibration", {})
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
        return "'tasks' must be a list of objects, each with a 'name'"
    if not isinstance(calibration, dict) or not isinstance(calibration.get("mlgptq", {}), dict):
        return "'calibration' (and its 'mlgptq') must be objects"
    if not isinstance(metadata.get("method"), str):
        return "'method' is missing or not a method's name"
    if not isinstance(metadata.get("spec"), dict):
        return "'spec' is missing or not an object"
    for field, build in (("method", lambda: parse_method(metadata["method"])),
                         ("spec", lambda: QuantSpec(**metadata["spec"])),
                         ("calibration.mlgptq", lambda: MlgptqOptions(**calibration.get("mlgptq", {})))):
        try:
            build()
        except (TypeError, ValueError, QuantizationError) as error:
            return f"'{field}' is not valid ({error})"
    return None


def calibration_entry(task: CalibrationTask, sequences: list[torch.Tensor]) -> dict:
    """The checkpoint metadata's record of one task (as the full driver writes it)."""
    return {
        "name": task.name, "samples": len(sequences), "tokens": int(sum(len(s) for s in sequences)),
        # absolute, as the full driver records them: --exact reads them again from any directory
        "calib": absolute(task.calib_path),
        "calib_sha256": hashlib.sha256(Path(task.calib_path).read_bytes()).hexdigest(),
        "adapter": absolute(task.adapter_dir),
        "adapter_signature": adapter_signature(task.adapter_dir) if task.adapter_dir is not None else None,
    }


class IncrementalQuantizer:
    """Extends the quantization of `checkpoint_dir` by one task.

    served_layers: layer -> a safetensors file holding that layer's currently served GPTQ
    tensors (a server's earlier re-quantizations); other layers are the checkpoint's.
    state_dirs: where to look for each layer's Hessian state, first match wins (default: the
    checkpoint's). state_out: where the merged state of each finished layer is written.
    drop_tasks: tasks whose Hessians leave the state (removed from the server). pace: called
    after every input group (a background requantizer sleeps there to bound its CPU share).
    left_out: stored tasks the state no longer holds whole, left out of the whole job too
    (task -> why; `incremental_tasks.py`)."""

    def __init__(
        self, model_dir: Path, checkpoint_dir: Path, task: CalibrationTask, settings: IncrementalSettings,
        state_out: Path, *, served_layers: dict[int, Path] | None = None, state_dirs: list[Path] | None = None,
        drop_tasks: Iterable[str] = (), existing_tasks: list[CalibrationTask] | None = None,
        pace: Callable[[], None] | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.checkpoint_dir = Path(checkpoint_dir)
        self.metadata = read_checkpoint_metadata(self.checkpoint_dir)
        # The engine's load checks, before any work: the layers are read one by one later, and a
        # NaN scale there silently changed keep/requantize decisions instead of being refused.
        config = check_gptq_checkpoint(self.checkpoint_dir).config
        self.task = task
        self.settings = settings
        self.state_out = Path(state_out)
        self.served_layers = {int(k): Path(v) for k, v in (served_layers or {}).items()}
        hessian_dir = self.metadata.get("hessian_state") or ""
        self.state_dirs = [Path(d) for d in state_dirs] if state_dirs else []
        if hessian_dir:
            self.state_dirs.append(self.checkpoint_dir / hessian_dir)
        # Added again (its Hessians stored, not removed): the served weights came from an
        # aggregate holding its old Hessians, which is what a linear's change is measured from.
        self.replaces_stored = task.name not in set(drop_tasks)
        self.drop_tasks = set(drop_tasks) | {task.name}
        self.pace = pace
        self.method: Method = parse_method(self.metadata["method"])
        if self.method.hessian_forward is None:
            raise IncrementalError(f"{checkpoint_dir} was quantized with {self.method.name}, which uses no "
                                   "calibration: adding a task changes nothing to re-quantize")
        if not self.state_dirs:
            raise IncrementalError(f"{checkpoint_dir} was written without Hessian state (--no-hessian-state): "
                                   "re-quantize it fully instead")
        self.spec = QuantSpec(**self.metadata["spec"])
        calibration = self.metadata.get("calibration", {})
        self.options = MlgptqOptions(**calibration.get("mlgptq", {}))
        # Before the model loads: a missing or corrupt state file, or missing costs, is named at once.
        weighs_costs = self.method.kind in ("mlgptq", "minimax") and self.options.sensitivity != "none"
        stored_costs = load_raw_costs([self.state_out, *self.state_dirs]) if weighs_costs else None
        if weighs_costs and stored_costs is None:
            raise IncrementalError(
                f"{self.checkpoint_dir}: mlgptq sensitivity '{self.options.sensitivity}' needs every task's probed cost "
                f"(hessian_state/{COSTS_FILE}), which this checkpoint lacks; re-quantize it fully")
        self.left_out: dict[str, str] = {}
        if not settings.exact:  # the stored Hessians are used: only the tasks they hold whole
            if not isinstance(config.get("num_hidden_layers"), int):
                raise IncrementalError(f"{self.checkpoint_dir}/config.json has no integer num_hidden_layers")
            self.left_out = consistent_stored_tasks(self.state_dirs, config["num_hidden_layers"], self.drop_tasks,
                                                    stored_costs).left_out
            self.drop_tasks |= set(self.left_out)
            for name, why in self.left_out.items():  # the job goes on without it, every layer alike
                log.warning("a stored task is left out of the aggregate", extra={"left_out": name, "reason": why})
        self.max_samples = settings.max_samples if settings.max_samples is not None else calibration.get("max_samples")
        self.max_tokens = settings.max_tokens or calibration.get("max_tokens") or _DRIVER_DEFAULTS["max_tokens"]
        self.max_batch_tokens = (settings.max_batch_tokens or calibration.get("max_batch_tokens")
                                 or _DRIVER_DEFAULTS["max_batch_tokens"])
        if settings.exact:
            existing = existing_tasks if existing_tasks is not None else [
                CalibrationTask(entry["name"],
                                recorded_path(entry["adapter"], "adapter", entry["name"], self.checkpoint_dir)
                                if entry.get("adapter") else None,
                                recorded_path(entry["calib"], "calibration file", entry["name"], self.checkpoint_dir))
                for entry in self.metadata.get("tasks", [])]
            self.existing_tasks = [t for t in existing if t.name not in self.drop_tasks]
        else:
            self.existing_tasks = []

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        calibrated = [*self.existing_tasks, task]
        token_batches: dict[str, list[TokenBatch]] = {}
        self.calibration: dict[str, dict] = {}
        for item in calibrated:
            examples = read_calibration_examples(Path(item.calib_path), limit=self.max_samples)
            sequences = tokenize_examples(examples, self.tokenizer, self.max_tokens)
            token_batches[item.name] = make_batches(sequences, self.max_batch_tokens, pad_id)
            self.calibration[item.name] = calibration_entry(item, sequences)

        self.model = load_base_model(Path(model_dir))
        self.layers_module = decoder_layers(self.model)
        self.num_layers = len(self.layers_module)
        adapters = {item.name: Path(item.adapter_dir) for item in calibrated if item.adapter_dir is not None}
        self.peft_model = attach_adapters_quietly(self.model, adapters)
        forward_model = self.peft_model if self.peft_model is not None else self.model
        onednn_linears(forward_model)  # as the driver does: the same matmuls, the same Hessians
        self.streams: list[Stream] = []
        forward = self.method.hessian_forward
        for item in calibrated:
            adapter = item.name if forward == "adapter" and item.adapter_dir is not None else None
            with active_adapter(self.peft_model, adapter):
                batches = [capture_first_layer_inputs(forward_model, b.input_ids, b.token_mask)
                           for b in token_batches[item.name]]
            self.streams.append(Stream(item.name, forward, adapter, batches))
        self.task_costs = self._task_costs(stored_costs) if stored_costs is not None else None

    def _task_costs(self, stored: dict[str, float]) -> dict[str, float] | None:
        """The merged set's costs (the method weighs tasks by a probed cost): the stored raw
        probes of the tasks that stay, the new task probed on the float model as the full
        driver probes it, normalised over the set (a full run's costs); written to state_out."""
        calibrated = {item.name for item in self.existing_tasks}
        if missing := sorted(calibrated - set(stored)):
            raise IncrementalError(f"task {missing[0]!r} has no probed cost in {COSTS_FILE} of "
                                   f"{[str(d) for d in self.state_dirs]}; drop it or re-quantize the checkpoint fully")
        raw = {name: value for name, value in stored.items() if name not in self.drop_tasks}
        raw.update(probe_impurity(self.model, self.tokenizer, self.peft_model, [self.task],
                                  probe_count(self.options.probe_samples, self.max_samples),
                                  max_tokens=self.max_tokens))  # as the full driver probes
        save_raw_costs(self.state_out, raw)
        return normalized(raw)

    # ------------------------------------------------------------------ inputs
    def served_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        source = self.served_layers.get(layer, self.checkpoint_dir / WEIGHTS_FILE)
        return read_layer_tensors(source, layer)

    def _state_dir_of(self, layer: int) -> Path | None:
        """The first state directory holding the layer's state file (None: none does)."""
        return next((d for d in self.state_dirs if layer_state_path(d, layer).is_file()), None)

    def stored_state(self, layer: int) -> tuple[LayerState, References]:
        """A layer's stored Hessians and the tasks' reference errors kept beside them."""
        directory = self._state_dir_of(layer)
        if directory is None:
            raise IncrementalError(f"no Hessian state for layer {layer} in {[str(d) for d in self.state_dirs]}")
        state, forward = load_layer_state(directory, layer)
        if forward != self.method.hessian_forward:
            raise IncrementalError(f"{directory}: layer {layer} holds '{forward}'-forward Hessians, "
                                   f"{self.method.name} needs '{self.method.hessian_forward}'")
        return state, load_reference_errors(directory, layer)

    def stored_references(self, layer: int) -> References:
        """The tasks' reference errors stored for a layer (none where no state holds it)."""
        directory = self._state_dir_of(layer)
        return load_reference_errors(directory, layer) if directory is not None else {}

    # ------------------------------------------------------------------ the layer loop
    def layers(self, start: int = 0) -> Iterator[LayerOutcome]:
        """One outcome per layer from `start` (the layers before it are taken as served:
        a resumed run's finished layers)."""
        if not 0 <= start <= self.num_layers:
            raise IncrementalError(f"start layer {start} outside 0..{self.num_layers}")
        for index in range(start):
            started = time.perf_counter()
            self._write_weights(index, self.served_tensors(index))
            propagate(self.layers_module[index], self.streams, self.peft_model)
            yield LayerOutcome(index, [], None, time.perf_counter() - started, 0.0)
        for index in range(start, self.num_layers):
            yield self._process(index)

    def _process(self, index: int) -> LayerOutcome:
        """The layer true-sequentially (`layerwise`): each input group's Hessians are taken
        with the linears before it already decided, as the full driver does."""
        layer = self.layers_module[index]
        forward = self.method.hessian_forward
        # exact: every Hessian is recomputed, but the references stay the stored ones
        stored, references = (None, self.stored_references(index)) if self.settings.exact else self.stored_state(index)
        served = self.served_tensors(index)
        prefix = f"model.layers.{index}"
        timer = PhaseTimer()
        policy = LinearPolicy(self.method, self.spec, self.options, self.task_costs, self.settings.change_threshold,
                              self.settings.quality_tolerance)
        state: LayerState = {}
        kept_references: References = {}
        tensors: dict[str, torch.Tensor] = {}
        decisions: list[LinearDecision] = []

        def decide_group(group: str, hessians: GroupHessians) -> None:
            with timer.phase("quantize"):
                if stored is None:
                    existing = {item.name: hessians[(item.name, forward)] for item in self.existing_tasks}
                else:
                    existing = {name: stat for name, stat in stored.get(group, {}).items()
                                if name not in self.drop_tasks}
                state[group] = {**existing, self.task.name: hessians[(self.task.name, forward)]}
                self._check_costs(index, group, state[group])
                own = stored.get(group, {}).get(self.task.name) if stored is not None and self.replaces_stored else None
                served_from = existing if own is None else {**existing, self.task.name: own}
                group_decisions, group_tensors, kept_references[group] = decide_group_linears(
                    policy, layer, prefix, group, served, existing, state[group], served_from, references.get(group))
                decisions.extend(group_decisions)
                tensors.update(group_tensors)
            if self.pace is not None:
                self.pace()

        quantize_layer_sequential(layer, self.streams, self.peft_model, index, decide_group, timer)
        with timer.phase("quantize"):
            save_layer_state(self.state_out, index, state, forward, kept_references)
        changed = any(decision.swapped for decision in decisions)
        forward_seconds = timer.seconds.get("forward", 0.0) + timer.seconds.get("hessian", 0.0)
        return LayerOutcome(index, decisions, tensors if changed else None, forward_seconds,
                            timer.seconds.get("quantize", 0.0))

    def _check_costs(self, index: int, group: str, merged: dict[str, TaskHessian]) -> None:
        """A task aggregated without a cost would be a bare KeyError deep in the aggregate;
        `consistent_stored_tasks` leaves such tasks out, so this is a bug's last guard."""
        if self.task_costs is not None and (missing := sorted(set(merged) - set(self.task_costs))):
            raise IncrementalError(f"layer {index} ({group}): task {missing[0]!r} has Hessians but no cost in "
                                   f"{COSTS_FILE}; remove it (remove_task) or add it again with its calibration")

    def _write_weights(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Put a layer's quantized weights (dequantized) into the calibration model."""
        layer = self.layers_module[index]
        for linear_name in LINEAR_NAMES:
            linear = plain_linear(layer, linear_name)
            quantized = unpack_layer_linear(tensors, f"model.layers.{index}.{linear_name}", self.spec,
                                            linear.in_features, linear.out_features)
            with torch.no_grad():  # a versioned write, as in incremental_linears.decide_group_linears
                linear.weight.copy_(quantized.dequantize(linear.weight.dtype))
