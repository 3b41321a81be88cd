"""Multi-task calibration driver: quantize a model layer by layer for a set of tasks.

For each decoder layer: every calibration stream (a task's samples with its adapter
active, or with adapters off for gptq-mixed) runs the layer and feeds per-input-group
Hessians; the method turns them into one quantized weight per linear, whose dequantized
values are written back into the model; the streams then run the quantized layer to make
the next layer's inputs. Only one layer's activations per stream are held at a time.

After each layer its packed tensors and errors go to `<out>/.partial/` (and its Hessians
to `<out>/hessian_state/`), so a crashed run resumes at the first missing layer: the
completed layers are reloaded and the streams re-run through them.
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
from safetensors.torch import save_file

from inlaid.quant.aggregate import TaskHessian, task_errors
from inlaid.quant.calibration import (
    CalibrationTask, TokenBatch, make_batches, read_calibration_examples, tokenize_examples,
)
from inlaid.quant.checkpoint import (
    HESSIAN_STATE_DIR, CheckpointMetadata, pack_linear, unpack_linear, write_checkpoint,
)
from inlaid.quant.errors import CheckpointError, QuantizationError
from inlaid.quant.hessian import check_finite
from inlaid.quant.methods import Method, MlgptqOptions, quantize_linear
from inlaid.quant.model_io import (
    GROUP_OF_LINEAR, LINEAR_NAMES, HessianHooks, LayerInputs, active_adapter, attach_adapters,
    capture_first_layer_inputs, decoder_layers, load_base_model, plain_linear, run_layer,
)
from inlaid.quant.spec import QuantSpec
from inlaid.quant.state import save_layer_state

PARTIAL_DIR = ".partial"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class DriverConfig:
    model_dir: Path
    tasks: list[CalibrationTask]
    method: Method
    spec: QuantSpec
    out_dir: Path
    max_samples: int | None = 128
    max_tokens: int = 512
    max_batch_tokens: int = 4096
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
class Stream:
    """One task's calibration samples moving through the layers under one forward."""

    task: str
    forward: str  # "adapter": the task's own forward (its adapter, if it has one); "base"
    adapter: str | None  # the adapter name active for this stream (None = adapters off)
    batches: list[LayerInputs]


@dataclass
class QuantizationReport:
    out_dir: Path
    method: str
    layer_errors: list[dict]
    calibration: dict
    seconds: float
    peak_rss_mb: float
    layers_resumed: int


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in chunks: model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_digest(adapter_dir: Path | None) -> dict[str, str] | None:
    """Digests of what defines an adapter (its config and weights); None for the base forward."""
    if adapter_dir is None:
        return None
    files = [Path(adapter_dir) / name for name in ADAPTER_FILES]
    return {p.name: file_digest(p) for p in files if p.is_file()}


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
            "calib": str(task.calib_path),
            "calib_sha256": file_digest(task.calib_path),
            "adapter": str(task.adapter_dir) if task.adapter_dir else None,
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


def _partial_path(out_dir: Path, layer_index: int) -> Path:
    return Path(out_dir) / PARTIAL_DIR / f"layer_{layer_index:03d}.safetensors"


def _prepare_partial_dir(config: DriverConfig) -> int:
    """Check or start the partial directory; return how many leading layers are done."""
    partial = Path(config.out_dir) / PARTIAL_DIR
    run_file = partial / "run.json"
    fingerprint = config.fingerprint()
    if partial.is_dir() and run_file.is_file():
        recorded = json.loads(run_file.read_text()).get("fingerprint")
        if config.resume and recorded == fingerprint:
            done = 0
            while _partial_path(config.out_dir, done).is_file():
                done += 1
            return done
        if config.resume and recorded != fingerprint:
            raise CheckpointError(
                f"{config.out_dir} holds a partial run with other settings; pass --restart to discard it "
                "or choose another --out"
            )
        for stale in partial.glob("layer_*.safetensors"):
            stale.unlink()
    partial.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"fingerprint": fingerprint}))
    return 0


def _load_partial_layer(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = json.loads((handle.metadata() or {}).get("inlaid", "{}"))
    return tensors, meta


def _write_dequantized(layer, tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec) -> None:
    from inlaid.kernels.dispatch import QuantLinearWeights

    for linear_name in LINEAR_NAMES:
        key = f"{prefix}.{linear_name}"
        linear = plain_linear(layer, linear_name)
        weights = QuantLinearWeights(
            qweight=tensors[key + ".qweight"], qzeros=tensors[key + ".qzeros"], scales=tensors[key + ".scales"],
            g_idx=tensors[key + ".g_idx"], bits=spec.bits, group_size=spec.effective_group_size(linear.in_features),
            in_features=linear.in_features, out_features=linear.out_features,
        )
        linear.weight.data.copy_(unpack_linear(weights).dequantize(linear.weight.dtype))


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


def quantize_model(config: DriverConfig) -> QuantizationReport:
    """Run the whole layer-by-layer quantization; write the checkpoint to config.out_dir."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    started = time.time()
    out_dir = Path(config.out_dir)
    task_names = [task.name for task in config.tasks]
    if len(set(task_names)) != len(task_names):
        raise QuantizationError(f"task names must be unique, got {task_names}")
    tokenizer = AutoTokenizer.from_pretrained(str(config.model_dir))
    token_batches, calibration = _load_calibration(config, tokenizer)
    model = load_base_model(Path(config.model_dir))
    adapters = {task.name: task.adapter_dir for task in config.tasks if task.adapter_dir is not None}
    peft_model = attach_adapters(model, adapters)
    forward_model = peft_model if peft_model is not None else model
    layers = decoder_layers(model)
    layers_done = _prepare_partial_dir(config)

    streams: list[Stream] = []
    for task_name, adapter_on in _needed_streams(config):
        adapter = task_name if adapter_on and task_name in adapters else None
        with active_adapter(peft_model, adapter):
            batches = [capture_first_layer_inputs(forward_model, b.input_ids, b.token_mask) for b in token_batches[task_name]]
        streams.append(Stream(task_name, "adapter" if adapter_on else "base", adapter, batches))

    layer_errors: list[dict] = []
    task_weights: dict[str, dict[str, float]] = {}
    bar = tqdm(range(len(layers)), desc=f"{config.method.name} {config.spec.bits}-bit", unit="layer",
               disable=not config.progress)
    for layer_index in bar:
        layer = layers[layer_index]
        prefix = f"model.layers.{layer_index}"
        partial_path = _partial_path(out_dir, layer_index)
        if layer_index < layers_done:
            tensors, meta = _load_partial_layer(partial_path)
            _write_dequantized(layer, tensors, prefix, config.spec)
            layer_errors += meta.get("errors", [])
            task_weights.update(meta.get("task_weights", {}))
        else:
            stats = collect_layer_hessians(layer, streams, peft_model, layer_index)
            tensors, errors, weights = _quantize_layer(config, layer, prefix, stats, task_names)
            layer_errors += errors
            task_weights.update(weights)
            meta = {"errors": errors, "task_weights": weights}
            if config.save_hessian_state and config.method.hessian_forward is not None:
                save_layer_state(out_dir / HESSIAN_STATE_DIR, layer_index,
                                 _method_state(config.method, stats, task_names), config.method.hessian_forward)
            temporary = partial_path.with_suffix(".tmp")
            save_file(tensors, str(temporary), metadata={"inlaid": json.dumps(meta)})
            temporary.replace(partial_path)
        for stream in streams:
            with active_adapter(peft_model, stream.adapter):
                for batch in stream.batches:
                    batch.hidden = run_layer(layer, batch)
        this_layer = [max(entry["errors"].values()) for entry in layer_errors
                      if entry["layer"] == layer_index and entry["errors"]]
        if this_layer:
            bar.set_postfix(worst_err=f"{max(this_layer):.2e}", rss_mb=f"{peak_rss_mb():.0f}")
    bar.close()
    del streams

    seconds = time.time() - started
    if config.write_model:
        quantized: dict[str, torch.Tensor] = {}
        for layer_index in range(len(layers)):
            tensors, _ = _load_partial_layer(_partial_path(out_dir, layer_index))
            quantized.update(tensors)
        skip = {f"model.layers.{i}.{name}.weight" for i in range(len(layers)) for name in LINEAR_NAMES}
        base_config = json.loads((Path(config.model_dir) / "config.json").read_text())
        metadata = CheckpointMetadata(
            method=config.method.name,
            tasks=[{"name": name, **calibration[name]} for name in task_names],
            spec=config.spec.to_dict(),
            base_model=str(Path(config.model_dir).resolve()),
            calibration={"max_samples": config.max_samples, "max_tokens": config.max_tokens,
                         "max_batch_tokens": config.max_batch_tokens, "mlgptq": asdict(config.mlgptq)},
            layer_errors=layer_errors,
            task_weights=task_weights,
            hessian_state=HESSIAN_STATE_DIR if config.save_hessian_state and config.method.hessian_forward else "",
            timing={"seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1)},
        )
        write_checkpoint(out_dir, Path(config.model_dir), base_config, quantized,
                         _float_tensors(Path(config.model_dir), skip), config.spec, metadata)
    return QuantizationReport(out_dir, config.method.name, layer_errors, calibration, seconds, peak_rss_mb(),
                              layers_done)


def _method_state(method: Method, stats: dict[tuple[str, str], dict[str, TaskHessian]],
                  task_names: list[str]) -> dict[str, dict[str, TaskHessian]]:
    """The Hessians the method aggregates (group -> task -> H): the state to store."""
    state: dict[str, dict[str, TaskHessian]] = {}
    for (task, forward), per_group in stats.items():
        if forward == method.hessian_forward and task in method.hessian_tasks(task_names):
            for group, stat in per_group.items():
                state.setdefault(group, {})[task] = stat
    return state


def collect_layer_hessians(layer, streams: list[Stream], peft_model, layer_index: int) -> dict[tuple[str, str], dict[str, TaskHessian]]:
    hooks = HessianHooks(layer)
    stats: dict[tuple[str, str], dict[str, TaskHessian]] = {}
    try:
        for stream in streams:
            hooks.start_stream()
            with active_adapter(peft_model, stream.adapter):
                for batch in stream.batches:
                    hooks.token_mask = batch.token_mask
                    run_layer(layer, batch)
            per_group = {}
            for group, accumulator in hooks.accumulators.items():
                check_finite(accumulator.hessian, f"layer {layer_index} {group}, task '{stream.task}'")
                per_group[group] = TaskHessian(accumulator.hessian, accumulator.tokens)
            stats[(stream.task, stream.forward)] = per_group
    finally:
        hooks.remove()
    return stats


def _quantize_layer(
    config: DriverConfig, layer, prefix: str, stats: dict[tuple[str, str], dict[str, TaskHessian]], task_names: list[str],
) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, dict[str, float]]]:
    method = config.method
    tensors: dict[str, torch.Tensor] = {}
    errors: list[dict] = []
    weights: dict[str, dict[str, float]] = {}
    layer_index = int(prefix.rsplit(".", 1)[1])
    for linear_name in LINEAR_NAMES:
        group = GROUP_OF_LINEAR[linear_name]
        linear = plain_linear(layer, linear_name)
        weight = linear.weight.data.float()
        method_stats = {}
        if method.hessian_forward is not None:
            method_stats = {task: stats[(task, method.hessian_forward)][group]
                            for task in method.hessian_tasks(task_names)}
        outcome = quantize_linear(method, weight, method_stats, config.spec, config.mlgptq)
        dequantized = outcome.quantized.dequantize()
        if config.measure_errors and task_names:
            measured = {task: stats[(task, "adapter")][group] for task in task_names if (task, "adapter") in stats}
            errors.append({"layer": layer_index, "linear": linear_name, "errors": task_errors(weight, dequantized, measured)})
        if outcome.task_weights:
            weights[f"{prefix}.{linear_name}"] = outcome.task_weights
        tensors.update(pack_linear(f"{prefix}.{linear_name}", outcome.quantized,
                                   linear.bias.data if linear.bias is not None else None))
        linear.weight.data.copy_(dequantized.to(linear.weight.dtype))
    return tensors, errors, weights
