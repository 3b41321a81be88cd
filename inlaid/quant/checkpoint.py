"""The quantized checkpoint: standard GPTQ tensors and configs, Inlaid's metadata beside them.

Directory layout written by `write_checkpoint`:

    config.json              the base config + `quantization_config` (quant_method: gptq)
    quantize_config.json     the AutoGPTQ-style quantization config
    model.safetensors        per quantized linear `<name>.qweight/.qzeros/.scales/.g_idx`
                             (int32 / int32 / fp16 / int32), every other tensor as in the base
    tokenizer files, chat template, generation_config.json (copied from the base)
    inlaid_quant.json        Inlaid metadata: method, tasks, calibration counts, errors,
                             per-linear task weights, the Hessian-state directory
    hessian_state/           per-layer per-task Hessians (safetensors), the state that
                             incremental task addition starts from

`load_gptq_checkpoint(dir)` reads it back: the config, one `QuantLinearWeights` per
quantized linear (the kernels' dataclass), and the remaining float tensors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inlaid.kernels.gptq_format import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from inlaid.kernels.dispatch import QuantLinearWeights
from inlaid.quant.errors import CheckpointError
from inlaid.quant.gptq import QuantizedWeight
from inlaid.quant.spec import QuantSpec

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "inlaid_quant.json"
HESSIAN_STATE_DIR = "hessian_state"
_COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
)
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def pack_linear(prefix: str, quantized: QuantizedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one linear, keyed `<prefix>.qweight` etc. (prefix = module path)."""
    codes_kn = quantized.codes.T.to(torch.int32).contiguous()
    tensors = {
        f"{prefix}.qweight": pack_qweight(codes_kn, quantized.bits),
        f"{prefix}.qzeros": pack_qzeros(quantized.zeros.to(torch.int32), quantized.bits),
        f"{prefix}.scales": quantized.scales.to(torch.float16).contiguous(),
        # a copy: linears quantized together may share one g_idx (safetensors refuses shared memory)
        f"{prefix}.g_idx": quantized.g_idx.to(torch.int32).clone(),
    }
    if bias is not None:
        tensors[f"{prefix}.bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def unpack_linear(weights: QuantLinearWeights) -> QuantizedWeight:
    """The inverse of pack_linear (codes and zeros back as integers)."""
    codes = unpack_qweight(weights.qweight, weights.bits, weights.in_features)
    zeros = unpack_qzeros(weights.qzeros, weights.bits, weights.out_features)
    g_idx = weights.g_idx if weights.g_idx is not None else (
        torch.arange(weights.in_features, dtype=torch.int32) // weights.group_size
    )
    return QuantizedWeight(
        codes=codes.T.to(torch.uint8).contiguous(),
        scales=weights.scales.to(torch.float32),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=weights.bits,
        group_size=weights.group_size,
    )


def quantization_config(spec: QuantSpec) -> dict:
    """The `quantization_config` block of config.json (and quantize_config.json)."""
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.act_order,
        "static_groups": spec.static_groups,
        "sym": spec.symmetric,
        "damp_percent": spec.damp_percent,
        "true_sequential": False,
        "modules_in_block_to_quantize": None,
    }


@dataclass
class CheckpointMetadata:
    """What Inlaid records beside the GPTQ tensors (written as inlaid_quant.json)."""

    method: str
    tasks: list[dict]
    spec: dict
    base_model: str = ""  # the float base the quantized weights (and the aggregate's W) came from
    calibration: dict = field(default_factory=dict)
    layer_errors: list[dict] = field(default_factory=list)
    task_weights: dict = field(default_factory=dict)
    hessian_state: str = HESSIAN_STATE_DIR
    timing: dict = field(default_factory=dict)
    format_version: int = 1


def write_checkpoint(
    out_dir: Path, base_dir: Path, base_config: dict, quantized_tensors: dict[str, torch.Tensor],
    float_tensors: dict[str, torch.Tensor], spec: QuantSpec, metadata: CheckpointMetadata,
) -> None:
    """Write the GPTQ checkpoint (see the module docstring); `quantized_tensors` come from
    pack_linear, `float_tensors` are the base's remaining tensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clash = set(quantized_tensors) & set(float_tensors)
    if clash:
        raise CheckpointError(f"tensors both quantized and float: {sorted(clash)[:3]}")
    tensors = {**float_tensors, **quantized_tensors}
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    temporary = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(temporary), metadata={"format": "pt", "quant_method": "gptq"})
    temporary.replace(out_dir / WEIGHTS_FILE)
    config = dict(base_config)
    config["quantization_config"] = quantization_config(spec)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    quantize_config = {k: v for k, v in quantization_config(spec).items() if k != "modules_in_block_to_quantize"}
    quantize_config.update({"model_name_or_path": str(out_dir), "model_file_base_name": "model"})
    (out_dir / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2))
    for name in _COPIED_FILES:
        source = Path(base_dir) / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata.__dict__, indent=2))


@dataclass
class QuantizedCheckpoint:
    config: dict
    linears: dict[str, QuantLinearWeights]  # module path (e.g. model.layers.0.self_attn.q_proj) -> tensors
    tensors: dict[str, torch.Tensor]  # every other tensor (embeddings, norms, lm_head if untied)
    metadata: dict | None


def load_gptq_checkpoint(checkpoint_dir: Path) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint directory (ours or any AutoGPTQ-format single-file one)."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    weights_path = checkpoint_dir / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a quantized checkpoint (config.json + {WEIGHTS_FILE})")
    config = json.loads(config_path.read_text())
    quant = config.get("quantization_config")
    if quant is None and (checkpoint_dir / "quantize_config.json").is_file():
        quant = json.loads((checkpoint_dir / "quantize_config.json").read_text())
    if not quant or quant.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{checkpoint_dir}: config.json has no GPTQ quantization_config")
    bits = int(quant["bits"])
    group_size = int(quant["group_size"])
    raw: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_path), framework="pt") as handle:
        for key in handle.keys():
            raw[key] = handle.get_tensor(key)
    linears = take_quant_linears(raw, bits, group_size, str(checkpoint_dir))
    metadata_path = checkpoint_dir / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else None
    return QuantizedCheckpoint(config=config, linears=linears, tensors=raw, metadata=metadata)


def take_quant_linears(raw: dict[str, torch.Tensor], bits: int, group_size: int,
                       where: str) -> dict[str, QuantLinearWeights]:
    """Pop every quantized linear's GPTQ tensors out of `raw` (module path -> weights)."""
    prefixes = sorted({key[: -len(".qweight")] for key in raw if key.endswith(".qweight")})
    linears: dict[str, QuantLinearWeights] = {}
    for prefix in prefixes:
        missing = [suffix for suffix in _QUANT_SUFFIXES[:3] if prefix + suffix not in raw]
        if missing:
            raise CheckpointError(f"{where}: {prefix} lacks {missing}")
        qweight = raw.pop(prefix + ".qweight")
        in_features = qweight.shape[0] * 32 // bits
        out_features = qweight.shape[1]
        g_idx = raw.pop(prefix + ".g_idx", None)
        linears[prefix] = QuantLinearWeights(
            qweight=qweight,
            qzeros=raw.pop(prefix + ".qzeros"),
            scales=raw.pop(prefix + ".scales"),
            g_idx=g_idx.to(torch.int32) if g_idx is not None else None,
            bits=bits,
            group_size=in_features if group_size == -1 else group_size,
            in_features=in_features,
            out_features=out_features,
            bias=raw.pop(prefix + ".bias", None),
        )
    return linears


def dequantized_state_dict(checkpoint: QuantizedCheckpoint, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain float state dict (nn.Linear weights dequantized): for references and for
    running the quantized model through transformers."""
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in checkpoint.tensors.items()}
    for prefix, weights in checkpoint.linears.items():
        state[prefix + ".weight"] = unpack_linear(weights).dequantize(dtype)
        if weights.bias is not None:
            state[prefix + ".bias"] = weights.bias.to(dtype)
    return state
