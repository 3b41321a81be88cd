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
    UNFINISHED               present while a run writes the directory (and after one was
                             interrupted): every loader refuses the directory while it is there

`load_gptq_checkpoint(dir)` reads it back: the config, one `QuantLinearWeights` per
quantized linear (the kernels' dataclass), and the remaining float tensors. Every linear's
tensors are checked against the config (bits, group size) and the model's shapes, and its
scales for finite values, so a corrupt checkpoint is refused naming the file and the tensor;
`check_gptq_checkpoint` runs the same checks for the jobs that read it layer by layer, and
`quantized_dir_problem` the cheap ones (files, quantization_config, the weights' header).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from inlaid.file_modes import as_umask_allows
from inlaid.kernels.gptq_format import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from inlaid.kernels.dispatch import QuantLinearWeights
from inlaid.quant.checkpoint_files import (
    METADATA_FILE,
    WEIGHTS_FILE,
    corrupt_weights_error,
    quantized_dir_problem,
    read_inlaid_metadata,
)
from inlaid.quant.errors import CheckpointError
from inlaid.quant.gptq import QuantizedWeight
from inlaid.quant.spec import QuantSpec

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
        "true_sequential": True,  # each linear's Hessian on its quantized predecessors' outputs (layerwise.py)
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
    _sort_header_metadata(temporary)
    as_umask_allows(temporary)
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


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors file's `__metadata__` with its keys sorted, in place. safetensors
    writes them in a hash map's order, which changes from process to process, so two runs
    that quantized to the same tensors wrote files with different bytes (and sha256)."""
    with open(path, "r+b") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > header_length:  # not the same entries in another order: left as written
            return
        file.seek(8)
        file.write(text.ljust(header_length, b" "))


@dataclass
class QuantizedCheckpoint:
    config: dict
    linears: dict[str, QuantLinearWeights]  # module path (e.g. model.layers.0.self_attn.q_proj) -> tensors
    tensors: dict[str, torch.Tensor]  # every other tensor (embeddings, norms, lm_head if untied)
    metadata: dict | None


@dataclass(frozen=True)
class GptqFormat:
    """A checkpoint's config.json and the GPTQ format its quantization_config gives."""

    config: dict
    bits: int
    group_size: int
    weights_path: Path


def read_gptq_format(checkpoint_dir: Path) -> GptqFormat:
    """The format of a GPTQ checkpoint directory, after `quantized_dir_problem`'s checks."""
    checkpoint_dir = Path(checkpoint_dir)
    if problem := quantized_dir_problem(checkpoint_dir):
        raise CheckpointError(problem)
    config_path = checkpoint_dir / "config.json"
    config = json.loads(config_path.read_text())
    quant = config.get("quantization_config")
    if quant is None:
        quant = json.loads((checkpoint_dir / "quantize_config.json").read_text())
    if not isinstance(quant, dict) or quant.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{checkpoint_dir}: config.json has no GPTQ quantization_config")
    try:
        bits = int(quant["bits"])
        group_size = int(quant["group_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: quantization_config needs integer bits and group_size ({error})") from None
    if bits not in (2, 3, 4, 8) or not (group_size == -1 or group_size > 0):
        raise CheckpointError(f"{config_path}: quantization_config bits {bits} / group_size {group_size}: bits must "
                              "be 2, 3, 4 or 8 and group_size -1 or positive")
    return GptqFormat(config, bits, group_size, checkpoint_dir / WEIGHTS_FILE)


def check_gptq_checkpoint(checkpoint_dir: Path) -> GptqFormat:
    """Every check `load_gptq_checkpoint` makes (the same code: `take_quant_linears` with the
    config), one linear's tensors in memory at a time, so a job that reads the checkpoint
    layer by layer (quantize-add, a server's requantizer) refuses a corrupt one before any
    work, with the message the engine's load gives."""
    gptq = read_gptq_format(checkpoint_dir)
    try:
        with safe_open(str(gptq.weights_path), framework="pt") as handle:
            keys = set(handle.keys())
            for prefix in sorted(key[: -len(".qweight")] for key in keys if key.endswith(".qweight")):
                raw = {prefix + suffix: handle.get_tensor(prefix + suffix)
                       for suffix in (*_QUANT_SUFFIXES, ".bias") if prefix + suffix in keys}
                take_quant_linears(raw, gptq.bits, gptq.group_size, str(gptq.weights_path), config=gptq.config)
    except SafetensorError as error:
        raise corrupt_weights_error(gptq.weights_path, error) from None
    return gptq


def load_gptq_checkpoint(checkpoint_dir: Path) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint directory (ours or any AutoGPTQ-format single-file one).
    Refuses a directory a run is still writing (or was interrupted writing), and checks every
    quantized linear against the config (`take_quant_linears`)."""
    checkpoint_dir = Path(checkpoint_dir)
    gptq = read_gptq_format(checkpoint_dir)
    raw: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(gptq.weights_path), framework="pt") as handle:
            for key in handle.keys():
                raw[key] = handle.get_tensor(key)
    except SafetensorError as error:
        raise corrupt_weights_error(gptq.weights_path, error) from None
    linears = take_quant_linears(raw, gptq.bits, gptq.group_size, str(gptq.weights_path), config=gptq.config)
    return QuantizedCheckpoint(config=gptq.config, linears=linears, tensors=raw,
                               metadata=read_inlaid_metadata(checkpoint_dir))


def linear_features(config: dict | None, prefix: str) -> tuple[int, int] | None:
    """(in_features, out_features) of the Llama-family linear at module path `prefix` by the
    model config, or None when the config does not say (another architecture, a bare config)."""
    if not config:
        return None
    try:
        hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    shapes = {
        "self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }
    for suffix, features in shapes.items():
        if prefix.endswith("." + suffix):
            return features
    return None


def _check_linear(where: str, prefix: str, tensors: dict[str, torch.Tensor | None], bits: int, group_size: int,
                  features: tuple[int, int] | None) -> tuple[int, int]:
    """(in_features, out_features) of one quantized linear after checking its GPTQ tensors
    against the config's bits and group size (and the model's shapes, when known) and its
    scales (and bias) for finite values; a CheckpointError names the file, the tensor, what
    was expected and what was found."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    g_idx, bias = tensors["g_idx"], tensors["bias"]

    def refuse(name: str, expected: str, found: torch.Tensor | str, hint: str = "") -> CheckpointError:
        shown = found if isinstance(found, str) else f"{str(found.dtype).removeprefix('torch.')} {tuple(found.shape)}"
        return CheckpointError(f"{where}: tensor {prefix}.{name}: expected {expected}, found {shown}{hint}")

    for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tensor.dim() != 2:
            raise refuse(name, "a 2-D tensor", tensor)
    if features is not None:
        in_features, out_features = features
        source = "by config.json"
    else:
        out_features = scales.shape[1]  # unpacked: the same at every bit width
        in_features = g_idx.shape[0] if g_idx is not None and g_idx.dim() == 1 else qweight.shape[0] * 32 // bits
        source = "by the tensors"
    group = in_features if group_size == -1 else group_size
    groups = (in_features + group - 1) // group
    described = (f"for K={in_features}, N={out_features} ({source}), {bits}-bit, group size {group_size} "
                 f"(quantization_config)")

    def implied_bits(packed: int, unpacked: int) -> str:
        if unpacked and (packed * 32) % unpacked == 0 and packed * 32 // unpacked in (2, 3, 4, 8) \
                and packed * 32 // unpacked != bits:
            return f": the tensors look {packed * 32 // unpacked}-bit, the config says {bits}-bit"
        return ""

    if (in_features * bits) % 32 or (out_features * bits) % 32:
        raise refuse("qweight", f"K={in_features} and N={out_features} to pack into whole int32 words at {bits} bits",
                     qweight)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (in_features * bits // 32, out_features):
        hint = implied_bits(qweight.shape[0], in_features) if qweight.shape[1] == out_features else ""
        raise refuse("qweight", f"int32 {(in_features * bits // 32, out_features)} {described}", qweight, hint)
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, out_features * bits // 32):
        hint = implied_bits(qzeros.shape[1], out_features) if qzeros.shape[0] == groups else ""
        raise refuse("qzeros", f"int32 {(groups, out_features * bits // 32)} {described}", qzeros, hint)
    if not scales.is_floating_point() or tuple(scales.shape) != (groups, out_features):
        raise refuse("scales", f"float {(groups, out_features)} {described}", scales)
    if g_idx is not None:
        if g_idx.is_floating_point() or tuple(g_idx.shape) != (in_features,):
            raise refuse("g_idx", f"int32 ({in_features},) {described}", g_idx)
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise refuse("g_idx", f"group indices in [0, {groups}) {described}",
                         f"values in [{int(g_idx.min())}, {int(g_idx.max())}]")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise refuse("bias", f"({out_features},)", bias)
    for name, tensor in (("scales", scales), ("bias", bias)):
        if tensor is not None:
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise refuse(name, "finite values", f"{bad} NaN/inf of {tensor.numel()}", ": the checkpoint is corrupt")
    return in_features, out_features


def take_quant_linears(raw: dict[str, torch.Tensor], bits: int, group_size: int,
                       where: str, config: dict | None = None) -> dict[str, QuantLinearWeights]:
    """Pop every quantized linear's GPTQ tensors out of `raw` (module path -> weights); `where`
    names the file in the messages. Given the checkpoint's `config` (what a checkpoint load
    passes), each linear is checked (`_check_linear`) against its bits and group size and
    the model's shapes where the config gives them; without it (a live layer swap, which
    checks the result against the served model itself) K and N are read off qweight."""
    prefixes = sorted({key[: -len(".qweight")] for key in raw if key.endswith(".qweight")})
    linears: dict[str, QuantLinearWeights] = {}
    for prefix in prefixes:
        missing = [suffix for suffix in _QUANT_SUFFIXES[:3] if prefix + suffix not in raw]
        if missing:
            raise CheckpointError(f"{where}: {prefix} lacks {missing}")
        tensors = {"qweight": raw[prefix + ".qweight"], "qzeros": raw[prefix + ".qzeros"],
                   "scales": raw[prefix + ".scales"], "g_idx": raw.get(prefix + ".g_idx"),
                   "bias": raw.get(prefix + ".bias")}
        if config is not None:
            in_features, out_features = _check_linear(where, prefix, tensors, bits, group_size,
                                                      linear_features(config, prefix))
        else:
            in_features, out_features = tensors["qweight"].shape[0] * 32 // bits, tensors["qweight"].shape[1]
        for suffix in (*_QUANT_SUFFIXES, ".bias"):
            raw.pop(prefix + suffix, None)
        g_idx = tensors["g_idx"]
        linears[prefix] = QuantLinearWeights(
            qweight=tensors["qweight"],
            qzeros=tensors["qzeros"],
            scales=tensors["scales"],
            g_idx=g_idx.to(torch.int32) if g_idx is not None else None,
            bits=bits,
            group_size=in_features if group_size == -1 else group_size,
            in_features=in_features,
            out_features=out_features,
            bias=tensors["bias"],
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
