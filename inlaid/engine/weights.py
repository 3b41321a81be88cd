"""Load a Hugging Face Llama-family checkpoint (safetensors) into `LlamaModel`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from inlaid.engine.config import ModelConfig, ModelLoadError
from inlaid.engine.model import LlamaModel
from inlaid.quant.checkpoint_files import is_gptq_checkpoint
from inlaid.kernels.dispatch import PreparedQuantLinear, QuantLinearWeights, fuse_quant_slices, prepare_quant_linear

# HF name suffix -> (our module path suffix, slice index within a fused projection)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no .safetensors weights")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"weight shards listed in the index are missing: {missing}")
    return files


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ModelLoadError(f"cannot read {path} (corrupt or truncated safetensors?): {error}") from error
    return tensors


def load_model(
    config: ModelConfig,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    quant_kernel: str = "auto",
    weight_dtype: torch.dtype | None = None,
    batch_invariant: bool = False,
) -> LlamaModel:
    """Build the model from a float checkpoint, or from a GPTQ checkpoint (low-bit projections).

    dtype: activations, norms, biases; weight_dtype (default dtype): dense projection
    weights, the embedding and the lm_head."""
    model_dir = Path(model_dir)
    quantized: dict[str, QuantLinearWeights] = {}
    if is_gptq_checkpoint(model_dir):
        # The one place the engine touches the quantizer: reading the checkpoint it wrote.
        from inlaid.quant.checkpoint import load_gptq_checkpoint
        from inlaid.quant.errors import CheckpointError

        try:
            checkpoint = load_gptq_checkpoint(model_dir)
        except (CheckpointError, SafetensorError, OSError) as error:
            raise ModelLoadError(f"cannot load the quantized checkpoint {model_dir}: {error}") from error
        state, quantized = checkpoint.tensors, checkpoint.linears
    else:
        state = read_state_dict(model_dir)
    model = LlamaModel(config)
    params = dict(model.named_parameters())
    assigned: set[str] = set()
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            target, rows = "lm_head_weight", None
        else:
            target, rows = _our_name(name, model)
        if target not in params:
            raise ModelLoadError(f"unexpected tensor {name!r} in {model_dir}")
        param = params[target]
        if rows is None:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"{name}: shape {tuple(tensor.shape)}, config expects {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            start, stop = rows
            if tensor.shape[0] != stop - start or tuple(tensor.shape[1:]) != tuple(param.shape[1:]):
                raise ModelLoadError(f"{name}: shape {tuple(tensor.shape)} does not match the config")
            param.data[start:stop].copy_(tensor)
        assigned.add(f"{target}[{rows}]")
    slices_by_module = quantized_slices(model, quantized, assigned)
    expected = _expected_slots(model, config)
    missing = sorted(expected - assigned)
    if missing:
        raise ModelLoadError(f"{model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model = model.to(device=device, dtype=dtype)
    if weight_dtype is not None and weight_dtype != dtype:
        model.store_weights_as(weight_dtype)
    for module_path, slices in slices_by_module.items():
        prepared = prepare_module(model, module_path, slices, device, dtype, quant_kernel, str(model_dir),
                                  batch_invariant)
        model.get_submodule(module_path).use_quantized(prepared)
    return model


def quantized_slices(model: LlamaModel, quantized: dict[str, QuantLinearWeights],
                     assigned: set[str] | None = None) -> dict[str, dict[int, QuantLinearWeights]]:
    """Our module path -> slice index -> weights, for checkpoint linears named the HF way
    (`assigned` collects the parameter slots they fill)."""
    slices_by_module: dict[str, dict[int, QuantLinearWeights]] = {}
    for prefix, weights in quantized.items():
        target, rows = _our_name(prefix + ".weight", model)
        if assigned is not None:
            assigned.add(f"{target}[{rows}]")
            if weights.bias is not None:
                assigned.add(f"{target.removesuffix('.weight')}.bias[{rows}]")
        module_path = target.removesuffix(".weight")
        linear = model.get_submodule(module_path)
        slice_index = 0 if rows is None else linear.slice_offsets.index(rows[0])
        slices_by_module.setdefault(module_path, {})[slice_index] = weights
    return slices_by_module


def prepare_module(model: LlamaModel, module_path: str, slices: dict[int, QuantLinearWeights], device: torch.device,
                   dtype: torch.dtype, quant_kernel: str, where: str, batch_invariant: bool = False
                   ) -> list[PreparedQuantLinear]:
    """The prepared low-bit weights of one (possibly fused) projection, ready for `use_quantized`
    (batch_invariant: EngineConfig's, see prepare_quant_linear)."""
    linear = model.get_submodule(module_path)
    if sorted(slices) != list(range(len(linear.out_slices))):
        raise ModelLoadError(f"{where}: {module_path} is only partly quantized")
    # The prepared low-bit weight carries its own bias. Slices that can share one kernel
    # call are concatenated along N at load (the checkpoint stays per projection).
    ordered = [slices[i] for i in sorted(slices)]
    fused = fuse_quant_slices(ordered) if len(ordered) > 1 else None
    parts = [fused] if fused is not None else ordered
    return [prepare_quant_linear(part, device, dtype, mode=quant_kernel, batch_invariant=batch_invariant)
            for part in parts]


def _our_name(hf_name: str, model: LlamaModel) -> tuple[str, tuple[int, int] | None]:
    name = hf_name.removeprefix("model.")
    for hf_part, (our_part, slice_index) in _FUSED.items():
        marker = f".{hf_part}."
        if marker in name:
            layer_prefix, kind = name.split(marker)
            our_name = f"{layer_prefix}.{our_part}.{kind}"
            linear = model.get_submodule(f"{layer_prefix}.{our_part}")
            start = linear.slice_offsets[slice_index]
            return our_name, (start, start + linear.out_slices[slice_index])
    return name, None


def _expected_slots(model: LlamaModel, config: ModelConfig) -> set[str]:
    expected = set()
    for name, _ in model.named_parameters():
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            linear = model.get_submodule(name.rsplit(".", 1)[0])
            for index in range(3):
                start = linear.slice_offsets[index]
                expected.add(f"{name}[{(start, start + linear.out_slices[index])}]")
        elif name.endswith("gate_up_proj.weight"):
            linear = model.get_submodule(name.rsplit(".", 1)[0])
            for index in range(2):
                start = linear.slice_offsets[index]
                expected.add(f"{name}[{(start, start + linear.out_slices[index])}]")
        else:
            expected.add(f"{name}[None]")
    return expected
