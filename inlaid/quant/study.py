"""Aggregation study: on real model layers, how each way of combining the per-task Hessians
trades the tasks' reconstruction errors against each other (what chose `mlgptq`).

For the chosen decoder layers, every task's calibration samples run through the UNQUANTIZED
model (adapter active: the H_t every method but gptq-mixed uses; adapters off: the base
Hessians of gptq-mixed), then each variant quantizes every linear of those layers and each
task's relative error ‖(W−Q)X_t‖²/‖WX_t‖² is measured with its adapter-forward H_t.
Reported per variant: the mean over linears of the worst task's error and of the task mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid.quant.aggregate import (
    TaskHessian, elementwise_max, quantize_minimax, quantize_static, task_errors,
)
from inlaid.quant.calibration import CalibrationTask, make_batches, read_calibration_examples, tokenize_examples
from inlaid.quant.gptq import gptq_quantize, rtn_quantize
from inlaid.quant.methods import parse_method, quantize_linear
from inlaid.quant.model_io import (
    GROUP_OF_LINEAR, LINEAR_NAMES, HessianHooks, active_adapter, attach_adapters, capture_first_layer_inputs,
    decoder_layers, load_base_model, run_layer,
)
from inlaid.quant.spec import QuantSpec

VARIANTS: dict[str, str] = {
    "rtn": "round-to-nearest",
    "mixed": "token mean, adapters off (gptq-mixed, 'GPTQ-tweaked')",
    "token-mean": "token mean, adapters on (gptq-mean-lora)",
    "task-mean": "mean of the H_t (each task the same weight)",
    "trace-norm": "mean of trace-normalised H_t",
    "error-norm": "mean of H_t / ‖WX_t‖² (each task's relative error the same weight)",
    "max": "literal element-wise max of the H_t",
    "mlgptq": "mlgptq's default aggregate without its probed task costs (the study has no probe): the task mean",
    "bounded": "mlgptq until the NLL table: adapter-on token mean + 4 rounds toward the worst task, task mean within +5 %",
    "minimax:4:2": "minimax (mlgptq before): error-norm + 4 rounds of reweighting (exponent 2)",
    "minimax:8:2": "error-norm + 8 rounds of reweighting (exponent 2)",
    "own": "each task its own H_t (per-task models, not shareable: the bound)",
}


@dataclass
class StudyResult:
    variant: str
    worst: float  # mean over linears of max_t e_t
    mean: float  # mean over linears of mean_t e_t
    per_task: dict[str, float]


def collect_layer_hessians(
    model_dir: Path, tasks: list[CalibrationTask], layers: list[int], max_samples: int, max_tokens: int = 512,
) -> dict[int, dict[tuple[str, bool], dict[str, TaskHessian]]]:
    """layer -> (task, adapter on?) -> input group -> H, through the unquantized model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_base_model(model_dir)
    peft_model = attach_adapters(model, {t.name: t.adapter_dir for t in tasks if t.adapter_dir})
    forward_model = peft_model if peft_model is not None else model
    decoder = decoder_layers(model)
    wanted = set(layers)
    results: dict[int, dict] = {index: {} for index in layers}
    for task in tasks:
        sequences = tokenize_examples(read_calibration_examples(task.calib_path, max_samples), tokenizer, max_tokens)
        batches = make_batches(sequences, 4096, tokenizer.pad_token_id or 0)
        for adapter_on in (True, False):
            adapter = task.name if adapter_on and task.adapter_dir else None
            with active_adapter(peft_model, adapter), torch.no_grad():
                states = [capture_first_layer_inputs(forward_model, b.input_ids, b.token_mask) for b in batches]
                for index in range(max(layers) + 1):
                    hooks = HessianHooks(decoder[index]) if index in wanted else None
                    for state in states:
                        if hooks:
                            hooks.token_mask = state.token_mask
                        state.hidden = run_layer(decoder[index], state)
                    if hooks:
                        results[index][(task.name, adapter_on)] = {
                            g: TaskHessian(a.hessian.clone(), a.tokens) for g, a in hooks.accumulators.items()
                        }
                        hooks.remove()
    return results


def _quantized_for(variant: str, weight: torch.Tensor, adapter_stats, base_stats, spec: QuantSpec):
    if variant == "rtn":
        return rtn_quantize(weight, spec).dequantize()
    if variant == "mixed":
        return quantize_static("token-mean", [weight], base_stats, spec)[0].quantized.dequantize()
    if variant == "max":
        return gptq_quantize(weight, elementwise_max(adapter_stats), spec).dequantize()
    if variant == "mlgptq":
        return quantize_linear(parse_method("mlgptq"), weight, adapter_stats, spec).quantized.dequantize()
    if variant == "bounded":
        return quantize_minimax([weight], adapter_stats, spec, rounds=4, start="token-mean",
                                mean_slack=0.05)[0].quantized.dequantize()
    if variant.startswith("minimax"):
        _, rounds, step = variant.split(":")
        return quantize_minimax([weight], adapter_stats, spec, rounds=int(rounds), step=float(step))[0].quantized.dequantize()
    return quantize_static(variant, [weight], adapter_stats, spec)[0].quantized.dequantize()


def run_study(
    model_dir: Path, hessians: dict[int, dict], spec: QuantSpec, variants: list[str],
) -> list[StudyResult]:
    from safetensors import safe_open

    weights_file = next(iter(sorted(Path(model_dir).glob("*.safetensors"))))
    sums = {v: {"worst": [], "mean": [], "tasks": {}} for v in variants}
    with safe_open(str(weights_file), framework="pt") as handle:
        for layer_index, per_stream in hessians.items():
            task_names = sorted({task for task, _ in per_stream})
            for linear in LINEAR_NAMES:
                group = GROUP_OF_LINEAR[linear]
                weight = handle.get_tensor(f"model.layers.{layer_index}.{linear}.weight").float()
                adapter_stats = {t: per_stream[(t, True)][group] for t in task_names}
                base_stats = {t: per_stream[(t, False)][group] for t in task_names}
                for variant in variants:
                    if variant == "own":
                        errors = {t: task_errors(weight, gptq_quantize(weight, s.hessian, spec).dequantize(),
                                                 {t: s})[t] for t, s in adapter_stats.items()}
                    else:
                        quantized = _quantized_for(variant, weight, adapter_stats, base_stats, spec)
                        errors = task_errors(weight, quantized, adapter_stats)
                    sums[variant]["worst"].append(max(errors.values()))
                    sums[variant]["mean"].append(sum(errors.values()) / len(errors))
                    for task, error in errors.items():
                        sums[variant]["tasks"].setdefault(task, []).append(error)
    results = []
    for variant in variants:
        entry = sums[variant]
        results.append(StudyResult(
            variant, sum(entry["worst"]) / len(entry["worst"]), sum(entry["mean"]) / len(entry["mean"]),
            {task: sum(values) / len(values) for task, values in entry["tasks"].items()},
        ))
    return results


def markdown(results: list[StudyResult], spec: QuantSpec, layers: list[int]) -> str:
    tasks = list(results[0].per_task)
    lines = [f"{spec.bits}-bit g{spec.group_size}, layers {layers}; ×1e-3, mean over linears", "",
             "| aggregation | worst task | task mean | " + " | ".join(tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for result in results:
        cells = " | ".join(f"{1e3 * result.per_task[t]:.2f}" for t in tasks)
        lines.append(f"| {result.variant}: {VARIANTS.get(result.variant, '')} | {1e3 * result.worst:.2f} | "
                     f"{1e3 * result.mean:.2f} | {cells} |")
    return "\n".join(lines) + "\n"
