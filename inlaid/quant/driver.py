"""Multi-task calibration driver: quantize a model layer by layer for a set of tasks.

Every calibration stream (a task's samples with its adapter active, or with adapters off
for gptq-mixed) goes through each decoder layer once, true-sequentially (layerwise.py): at
each input group the streams' Hessians are collected, the method quantizes the group's
linears and their dequantized weights are written back before the streams move on. Only
one layer's activations per stream are held at a time.

After each layer its packed tensors and errors go to `<out>/.partial/` (partial.py; its
Hessians to `<out>/hessian_state/`), so a crashed run resumes at the first missing layer:
the completed layers are reloaded and the streams re-run through them (a finished run keeps
it: the same command again rewrites the checkpoint from it in seconds).
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from inlaid.build_lock import exclusive_run
from inlaid.engine.adapter_config import adapter_signature
from inlaid.quant.aggregate import TaskHessian, TaskHessians
from inlaid.quant.calibration import (
    CALIBRATION_BATCH_TOKENS, DEFAULT_MAX_TOKENS, CalibrationTask, TokenBatch, make_batches, read_calibration_examples,
    tokenize_examples,
)
from inlaid.quant.checkpoint import (
    HESSIAN_STATE_DIR, CheckpointMetadata, pack_linear, write_checkpoint,
)
from inlaid.quant.errors import CheckpointError, QuantizationError
from inlaid.quant.inputs import finished_checkpoint_problem, output_removed_unless_kept
from inlaid.quant.layerwise import GroupHessians, PhaseTimer, Stream, propagate, quantize_layer_sequential
from inlaid.quant.methods import Method, MlgptqOptions, quantize_linears
from inlaid.quant.model_io import (
    INPUT_GROUPS, LINEAR_NAMES, active_adapter, capture_first_layer_inputs, decoder_layers,
    load_base_model, onednn_linears, plain_linear, release_onednn,
)
from inlaid.quant.partial import (
    load_partial_layer, prepare_partial_dir, save_partial_layer, write_dequantized,
)
from inlaid.quant.run_support import (
    absolute, adapter_digest, attach_adapters_quietly, file_digest, probe_bar, run_settings,
)
from inlaid.quant.spec import QuantSpec
from inlaid.quant.state import save_layer_state
from inlaid.quant.task_costs import normalized, probe_count, probe_impurity, save_raw_costs
from inlaid.quant.unfinished import mark_finished


@dataclass
class DriverConfig:
    model_dir: Path
    tasks: list[CalibrationTask]
    method: Method
    spec: QuantSpec
    out_dir: Path
    max_samples: int | None = 128
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_batch_tokens: int = CALIBRATION_BATCH_TOKENS
    measure_errors: bool = True
    error_tasks: list[str] | None = None  # measure errors for these tasks only (None: every task)
    save_hessian_state: bool = True
    mlgptq: MlgptqOptions = field(default_factory=MlgptqOptions)
    progress: bool = True
    resume: bool = True
    write_model: bool = True

    def fingerprint(self) -> str:
        """Identifies what a partial run computed, by content (the model's, adapters' and
        calibration files'), so a resume matches the same inputs wherever they lie."""
        model_dir = Path(self.model_dir)
        described = {
            "model": {p.name: file_digest(p) for p in sorted(model_dir.glob("*.safetensors"))}
            | {"config.json": file_digest(model_dir / "config.json")},
            "method": self.method.name, "spec": self.spec.to_dict(),
            "tasks": [(t.name, adapter_digest(t.adapter_dir), file_digest(t.calib_path)) for t in self.tasks],
            "max_samples": self.max_samples, "max_tokens": self.max_tokens,
            "max_batch_tokens": self.max_batch_tokens, "mlgptq": asdict(self.mlgptq),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class QuantizationReport:
    out_dir: Path
    method: str
    layer_errors: list[dict]
    calibration: dict
    seconds: float
    peak_rss_mb: float
    layers_resumed: int
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (see quantize_model)
    cpu_phases: dict[str, float] = field(default_factory=dict)  # this process's CPU seconds per phase


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_calibration(config: DriverConfig, tokenizer) -> tuple[dict[str, list[TokenBatch]], dict]:
    batches: dict[str, list[TokenBatch]] = {}
    counts: dict[str, dict] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for task in config.tasks:
        examples = read_calibration_examples(task.calib_path, limit=config.max_samples)
        sequences = tokenize_examples(examples, tokenizer, config.max_tokens)
        batches[task.name] = make_batches(sequences, config.max_batch_tokens, pad_id)
        counts[task.name] = {
            "samples": len(sequences), "tokens": int(sum(len(s) for s in sequences)),
            # absolute: `quantize-add --exact` reads them again, maybe from another directory
            "calib": absolute(task.calib_path),
            "calib_sha256": file_digest(task.calib_path),
            "adapter": absolute(task.adapter_dir),
            # what it held: a server re-adding the same files and samples does nothing (serve/hessian_sources.py)
            "adapter_signature": adapter_signature(task.adapter_dir) if task.adapter_dir is not None else None,
        }
    return batches, counts


def _needed_streams(config: DriverConfig) -> list[tuple[str, bool]]:
    """(task, adapter on?) pairs to run: the method's Hessian streams plus, when errors
    are measured, every task's adapter stream."""
    names = [task.name for task in config.tasks]
    wanted: list[tuple[str, bool]] = []
    forward = config.method.hessian_forward
    if forward is not None:
        wanted += [(name, forward == "adapter") for name in config.method.hessian_tasks(names)]
    if config.measure_errors:
        measured = names if config.error_tasks is None else [n for n in names if n in config.error_tasks]
        wanted += [(name, True) for name in measured if (name, True) not in wanted]
    return wanted


def _float_tensors(model_dir: Path, skip: set[str]) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key not in skip:
                    tensors[key] = handle.get_tensor(key)
    return tensors


@dataclass
class _Calibrated:
    """The model with its adapters and every stream captured at the first layer's input."""

    model: torch.nn.Module
    peft_model: torch.nn.Module | None
    streams: list[Stream]
    calibration: dict
    tokenizer: object


def _prepare(config: DriverConfig) -> _Calibrated:
    from transformers import AutoTokenizer

    task_names = [task.name for task in config.tasks]
    if len(set(task_names)) != len(task_names):
        raise QuantizationError(f"task names must be unique, got {task_names}")
    tokenizer = AutoTokenizer.from_pretrained(str(config.model_dir))
    token_batches, calibration = _load_calibration(config, tokenizer)
    model = load_base_model(Path(config.model_dir))
    adapters = {task.name: task.adapter_dir for task in config.tasks if task.adapter_dir is not None}
    peft_model = attach_adapters_quietly(model, adapters)
    forward_model = peft_model if peft_model is not None else model
    onednn_linears(forward_model)
    streams: list[Stream] = []
    for task_name, adapter_on in _needed_streams(config):
        adapter = task_name if adapter_on and task_name in adapters else None
        with active_adapter(peft_model, adapter):
            batches = [capture_first_layer_inputs(forward_model, b.input_ids, b.token_mask) for b in token_batches[task_name]]
        streams.append(Stream(task_name, "adapter" if adapter_on else "base", adapter, batches))
    return _Calibrated(model, peft_model, streams, calibration, tokenizer)


def _task_costs(config: DriverConfig, calibrated: _Calibrated) -> dict[str, float] | None:
    """Each task's raw probed cost (`task_costs.py`), None when every task's error costs alike."""
    if config.method.kind not in ("mlgptq", "minimax") or config.mlgptq.sensitivity == "none":
        return None
    tasks = probe_bar(config.tasks, config.progress)  # a bar like the layers' (it ran 11-17 s unseen)
    return probe_impurity(calibrated.model, calibrated.tokenizer, calibrated.peft_model, tasks,
                          probe_count(config.mlgptq.probe_samples, config.max_samples), max_tokens=config.max_tokens)


def calibration_forward_seconds(config: DriverConfig) -> PhaseTimer:
    """The floor a quantization run is measured against: the same calibration streams (same
    samples, batches and adapters) through every decoder layer, with nothing else done.
    Phases: "load" (model, adapters and the first layer's inputs) and "forward" (the layers)."""
    timer = PhaseTimer()
    with timer.phase("load"):
        calibrated = _prepare(config)
    with timer.phase("forward"):
        for layer in decoder_layers(calibrated.model):
            propagate(layer, calibrated.streams, calibrated.peft_model)
            release_onednn(layer)
    return timer


def quantize_model(config: DriverConfig) -> QuantizationReport:
    """Run the whole layer-by-layer quantization; write the checkpoint to config.out_dir.

    Phases timed (report.phases): load (model, adapters, calibration, first-layer inputs),
    forward and hessian (the true-sequential layer pass), quantize (aggregation, GPTQ and
    the per-task errors), resume (finished layers reloaded and re-run), write (per-layer
    state and the final checkpoint). One run an out_dir at a time: another one is refused."""
    with exclusive_run(Path(config.out_dir), CheckpointError):
        return _quantize_model(config)


def _quantize_model(config: DriverConfig) -> QuantizationReport:
    from tqdm import tqdm

    started = time.perf_counter()
    timer = PhaseTimer()
    out_dir = Path(config.out_dir)
    task_names = [task.name for task in config.tasks]
    # Before the model loads: a --out holding another run's layers is refused in a second.
    # From here until the checkpoint is complete, out_dir is marked unfinished; a fresh start
    # (--restart) drops the earlier run's Hessian state before this run writes any.
    # A run that fails or is interrupted (Ctrl-C) before its first layer is kept (the model or
    # its tokenizer does not load, the probe is cut short) leaves none of the --out it created:
    # else a corrected rerun was refused as "an unfinished partial run with other settings".
    fingerprint = config.fingerprint()
    with output_removed_unless_kept(out_dir) as created:
        problem = finished_checkpoint_problem(out_dir, fingerprint) if config.resume else None
        if problem:
            raise CheckpointError(problem)
        layers_done = prepare_partial_dir(out_dir, fingerprint, config.resume, discard=(HESSIAN_STATE_DIR,),
                                          settings=run_settings(config))
        created.kept = layers_done > 0  # resumed: what is there is an earlier run's
        with timer.phase("load"):
            calibrated = _prepare(config)
        with timer.phase("probe"):
            raw_costs = _task_costs(config, calibrated)
            task_costs = normalized(raw_costs) if raw_costs else None
            if raw_costs and config.save_hessian_state:
                save_raw_costs(out_dir / HESSIAN_STATE_DIR, raw_costs)  # what a later task addition merges with
        streams, peft_model = calibrated.streams, calibrated.peft_model
        layers = decoder_layers(calibrated.model)

        layer_errors: list[dict] = []
        task_weights: dict[str, dict[str, float]] = {}
        bar = tqdm(range(len(layers)), desc=f"{config.method.name} {config.spec.bits}-bit", unit="layer",
                   disable=not config.progress)
        for layer_index in bar:
            layer = layers[layer_index]
            prefix = f"model.layers.{layer_index}"
            if layer_index < layers_done:
                with timer.phase("resume"):
                    tensors, meta = load_partial_layer(out_dir, layer_index)
                    write_dequantized(layer, tensors, prefix, config.spec)
                    propagate(layer, streams, peft_model)
                layer_errors += meta.get("errors", [])
                task_weights.update(meta.get("task_weights", {}))
            else:
                result = _LayerResult()

                def quantize_group(group: str, hessians: GroupHessians) -> None:
                    with timer.phase("quantize"):
                        _quantize_group(config, layer, prefix, group, hessians, task_names, result, task_costs)

                collected = quantize_layer_sequential(layer, streams, peft_model, layer_index, quantize_group, timer)
                layer_errors += result.errors
                task_weights.update(result.task_weights)
                with timer.phase("write"):
                    if config.save_hessian_state and config.method.hessian_forward is not None:
                        save_layer_state(out_dir / HESSIAN_STATE_DIR, layer_index,
                                         _method_state(config.method, collected, task_names),
                                         config.method.hessian_forward)
                    save_partial_layer(out_dir, layer_index, result.tensors,
                                       {"errors": result.errors, "task_weights": result.task_weights})
                    created.kept = True  # a layer done: kept for a resume whatever happens next
            release_onednn(layer)  # its packed weights are not needed again
            this_layer = [max(entry["errors"].values()) for entry in layer_errors
                          if entry["layer"] == layer_index and entry["errors"]]
            if this_layer:
                bar.set_postfix(worst_err=f"{max(this_layer):.2e}", rss_mb=f"{peak_rss_mb():.0f}")
        bar.close()
    calibration = calibrated.calibration
    del streams, calibrated

    if config.write_model:
        with timer.phase("write"):
            timing = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "phases": _rounded(timer.seconds), "cpu_phases": _rounded(timer.cpu_seconds)}
            _write_model(config, out_dir, len(layers), calibration, layer_errors, task_weights, timing, task_costs,
                         fingerprint)
        # .partial/ stays: the same command again reloads every layer from it (seconds, where
        # recomputing took the whole run, with the checkpoint marked unfinished meanwhile).
        mark_finished(out_dir)
    return QuantizationReport(out_dir, config.method.name, layer_errors, calibration, time.perf_counter() - started,
                              peak_rss_mb(), layers_done, _rounded(timer.seconds), _rounded(timer.cpu_seconds))


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in seconds.items()}


@dataclass
class _LayerResult:
    """What quantizing one layer produced: packed tensors, per-linear errors and task weights."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    task_weights: dict[str, dict[str, float]] = field(default_factory=dict)


def _write_model(config: DriverConfig, out_dir: Path, layer_count: int, calibration: dict, layer_errors: list[dict],
                 task_weights: dict[str, dict[str, float]], timing: dict, task_costs: dict[str, float] | None,
                 fingerprint: str) -> None:
    quantized: dict[str, torch.Tensor] = {}
    for layer_index in range(layer_count):
        tensors, _ = load_partial_layer(out_dir, layer_index)
        quantized.update(tensors)
    skip = {f"model.layers.{i}.{name}.weight" for i in range(layer_count) for name in LINEAR_NAMES}
    base_config = json.loads((Path(config.model_dir) / "config.json").read_text())
    metadata = CheckpointMetadata(
        method=config.method.name,
        tasks=[{"name": task.name, **calibration[task.name]} for task in config.tasks],
        spec=config.spec.to_dict(),
        base_model=str(Path(config.model_dir).resolve()),
        calibration={"max_samples": config.max_samples, "max_tokens": config.max_tokens,
                     "max_batch_tokens": config.max_batch_tokens, "mlgptq": asdict(config.mlgptq),
                     "task_costs": task_costs, "fingerprint": fingerprint,
                     "order": "true-sequential: each linear's Hessian on its quantized predecessors' outputs"},
        layer_errors=layer_errors,
        task_weights=task_weights,
        hessian_state=HESSIAN_STATE_DIR if config.save_hessian_state and config.method.hessian_forward else "",
        timing=timing,
    )
    write_checkpoint(out_dir, Path(config.model_dir), base_config, quantized,
                     _float_tensors(Path(config.model_dir), skip), config.spec, metadata)


def _method_state(method: Method, collected: dict[str, GroupHessians],
                  task_names: list[str]) -> dict[str, dict[str, TaskHessian]]:
    """The Hessians the method aggregates (group -> task -> H): the state to store."""
    wanted = method.hessian_tasks(task_names)
    return {group: {task: stat for (task, forward), stat in hessians.items()
                    if forward == method.hessian_forward and task in wanted}
            for group, hessians in collected.items()}


def _quantize_group(
    config: DriverConfig, layer: torch.nn.Module, prefix: str, group: str, hessians: GroupHessians,
    task_names: list[str], result: _LayerResult, task_costs: dict[str, float] | None = None,
) -> None:
    """Quantize the linears reading input `group`, write their dequantized weights back into
    the layer (the streams read them next) and record tensors, errors and task weights."""
    method = config.method
    layer_index = int(prefix.rsplit(".", 1)[1])
    method_stats = {}
    if method.hessian_forward is not None:
        method_stats = {task: hessians[(task, method.hessian_forward)] for task in method.hessian_tasks(task_names)}
    measured_stats = {task: hessians[(task, "adapter")] for task in task_names if (task, "adapter") in hessians}
    # One stack of the per-task Hessians serves every linear of the group (and the errors,
    # when the method aggregates the same adapter-forward Hessians it is measured with).
    method_stack = TaskHessians(method_stats) if len(method_stats) > 1 else None
    measured_stack = None
    if config.measure_errors and measured_stats:
        same = method.hessian_forward == "adapter" and list(method_stats) == list(measured_stats)
        measured_stack = method_stack if same and method_stack is not None else TaskHessians(measured_stats)
    linears = [plain_linear(layer, name) for name in INPUT_GROUPS[group]]
    weights = [linear.weight.data.float() for linear in linears]
    outcomes = quantize_linears(method, weights, method_stats, config.spec, config.mlgptq, method_stack, task_costs)
    for linear_name, linear, weight, outcome in zip(INPUT_GROUPS[group], linears, weights, outcomes):
        dequantized = outcome.quantized.dequantize()
        if measured_stack is not None:
            # the search already measured its result on these Hessians
            reuse = measured_stack is method_stack and set(outcome.task_errors) == set(measured_stack.names)
            errors = outcome.task_errors if reuse else measured_stack.errors(weight, dequantized)
            result.errors.append({"layer": layer_index, "linear": linear_name, "errors": errors})
        if outcome.task_weights:
            result.task_weights[f"{prefix}.{linear_name}"] = outcome.task_weights
        result.tensors.update(pack_linear(f"{prefix}.{linear_name}", outcome.quantized,
                                          linear.bias.data if linear.bias is not None else None))
        with torch.no_grad():  # a versioned write: the packed copy follows (model_io.onednn_linears)
            linear.weight.copy_(dequantized.to(linear.weight.dtype))
