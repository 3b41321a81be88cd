"""The calibration forward: a transformers Llama in fp32 with PEFT adapters, run one
decoder layer at a time, with hooks that feed each linear's inputs to Hessian accumulators.

The decoder linears of one layer, grouped by the input they share (q/k/v read the same
normalised hidden state, gate/up too), so one Hessian serves each group.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from inlaid.kernels.dense_cpu import PackedDenseWeight, packing_supported
from inlaid.quant.errors import AdapterMismatchError, CheckpointError
from inlaid.quant.hessian import HessianAccumulator

LINEAR_NAMES: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
GROUP_OF_LINEAR: dict[str, str] = {linear: group for group, linears in INPUT_GROUPS.items() for linear in linears}
STAGES: tuple[str, ...] = tuple(INPUT_GROUPS)  # the order a decoder layer computes its groups' inputs in


def load_base_model(model_dir: Path):
    """The Hugging Face Llama model in fp32, eval mode, no KV cache."""
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


def onednn_linears(model: nn.Module) -> None:
    """Route every float32 nn.Linear of `model` (base layers and LoRA A/B alike) through
    oneDNN (kernels/dense_cpu.py). MKL's fp32 GEMM reaches about a third of oneDNN's speed on
    the AMD EPYC CPUs measured here (1024 tokens, 576 -> 1536: 79 -> 29 ms; the outputs agree
    to float32 rounding).

    The packed copy is kept until the weight changes: a write through a versioned in-place
    op (`with torch.no_grad(): weight.copy_(...)`, what the quantizer does) re-packs on the
    next call. A write through `weight.data` is invisible to it: call `release_onednn` after
    one. (Re-packing on every call cost 13 % of the calibration forward.)"""
    for module in model.modules():
        if isinstance(module, nn.Linear) and packing_supported(module.weight):
            module.forward = _OneDnnForward(module)


def release_onednn(model: nn.Module) -> None:
    """Drop the packed copies under `model` (memory; or after writing weights via `.data`)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _OneDnnForward):
            module.forward.packed = None


class _OneDnnForward:
    """An nn.Linear's forward through its packed weight (packed again when the weight changes)."""

    def __init__(self, module: nn.Linear) -> None:
        self.module = module
        self.packed: PackedDenseWeight | None = None
        self.packed_from: tuple[int, int] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        version = (weight._version, weight.data_ptr())
        if self.packed is None or version != self.packed_from:
            self.packed, self.packed_from = PackedDenseWeight(weight.detach()), version
        out = self.packed.linear(x.reshape(-1, x.shape[-1]))
        if self.module.bias is not None:
            out = out + self.module.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def decoder_layers(model) -> nn.ModuleList:
    inner = model
    while not hasattr(inner, "layers"):
        if hasattr(inner, "model"):
            inner = inner.model
        elif hasattr(inner, "base_model") and inner.base_model is not inner:
            inner = inner.base_model
        else:
            raise CheckpointError("cannot find the decoder layers of this model")
    return inner.layers


def plain_linear(layer: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear holding the base weight (inside a PEFT LoRA wrapper if there is one)."""
    module = layer.get_submodule(name)
    return module.base_layer if hasattr(module, "base_layer") else module


def check_adapter_fits(model, adapter_dir: Path) -> None:
    """Raise AdapterMismatchError unless every LoRA matrix of the adapter fits a base linear."""
    from safetensors import safe_open

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterMismatchError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"{adapter_dir}: only LoRA adapters are supported, got {config.get('peft_type')}")
    modules = dict(model.named_modules())
    with safe_open(str(weights_path), framework="pt") as handle:
        for key in handle.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_path = key.split(".lora_")[0]
            if module_path.startswith("base_model.model."):
                module_path = module_path[len("base_model.model."):]
            target = modules.get(module_path)
            if target is None:
                raise AdapterMismatchError(f"{adapter_dir}: module '{module_path}' does not exist in the base model")
            target = target.base_layer if hasattr(target, "base_layer") else target
            shape = tuple(handle.get_slice(key).get_shape())
            if ".lora_A." in key and shape[1] != target.in_features:
                raise AdapterMismatchError(
                    f"{adapter_dir}: {key} expects {shape[1]} input features, the base has {target.in_features} "
                    "(adapter trained for another base model?)"
                )
            if ".lora_B." in key and shape[0] != target.out_features:
                raise AdapterMismatchError(
                    f"{adapter_dir}: {key} produces {shape[0]} features, the base has {target.out_features} "
                    "(adapter trained for another base model?)"
                )


def attach_adapters(model, adapters: dict[str, Path]):
    """Wrap `model` in a PeftModel holding every adapter under its task name (None if none)."""
    if not adapters:
        return None
    from peft import PeftModel

    peft_model = None
    for name, adapter_dir in adapters.items():
        check_adapter_fits(model, Path(adapter_dir))
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
            else:
                peft_model.load_adapter(str(adapter_dir), adapter_name=name)
        except RuntimeError as error:
            raise AdapterMismatchError(f"adapter {adapter_dir} does not load onto this base: {error}") from None
    peft_model.eval()
    return peft_model


@contextmanager
def active_adapter(peft_model, name: str | None) -> Iterator[None]:
    """Run with adapter `name` active, or with every adapter disabled when name is None."""
    if peft_model is None:
        if name is not None:
            raise AdapterMismatchError(f"adapter '{name}' requested but no adapter is loaded")
        yield
        return
    if name is None:
        with peft_model.disable_adapter():
            yield
        return
    peft_model.set_adapter(name)
    yield


@contextmanager
def layer_adapter(module: nn.Module, peft_model, name: str | None) -> Iterator[None]:
    """`active_adapter` for the LoRA layers inside `module` (one decoder layer) only.

    PEFT's model-wide `set_adapter` walks every module of the model: 30 ms on the default
    model, and the layer-by-layer quantizer switches 9 streams x 5 stages x 30 layers times
    (40 s of a 190 s quantization). The LoRA layers read only their own active-adapter and
    disabled flags, which this sets and, for `None`, restores."""
    if peft_model is None:
        with active_adapter(None, name):  # its check: no adapter can be asked for
            yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [sub for sub in module.modules() if isinstance(sub, BaseTunerLayer)]
    if name is None:
        for tuner in tuners:
            tuner.enable_adapters(False)
        try:
            yield
        finally:
            for tuner in tuners:
                tuner.enable_adapters(True)
        return
    for tuner in tuners:
        tuner.set_adapter(name)  # as PEFT's model-wide call does (a module the adapter skips ignores it)
    yield


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """One batch at the input of a decoder layer: hidden states plus the layer's other
    arguments (rotary embeddings, mask), which are the same for every layer."""

    hidden: torch.Tensor
    token_mask: torch.Tensor
    layer_kwargs: dict = field(default_factory=dict)


@torch.no_grad()
def capture_first_layer_inputs(forward_model, input_ids: torch.Tensor, token_mask: torch.Tensor) -> LayerInputs:
    """Run the model up to decoder layer 0 and keep what it receives."""
    layers = decoder_layers(forward_model)
    captured: dict = {}

    def grab(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        forward_model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return LayerInputs(hidden=captured["hidden"].detach(), token_mask=token_mask, layer_kwargs=captured["kwargs"])


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> torch.Tensor:
    output = layer(inputs.hidden, **inputs.layer_kwargs)
    return output[0] if isinstance(output, tuple) else output


class _StageInput(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _input_of(module: nn.Module, run) -> torch.Tensor:
    """What `module` receives while `run()` executes (which is cut short there)."""

    def stop(_module, args):
        raise _StageInput(args[0])

    handle = module.register_forward_pre_hook(stop)
    try:
        run()
    except _StageInput as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} was never called")


class LayerPass:
    """One batch through a Llama decoder layer one input group at a time (STAGES order).

    `advance(group)` returns what that group's linears read, computed with the layer's
    other linears as they stand at that moment: when the caller quantizes each group before
    advancing to the next, every linear's input already includes the quantization of the
    linears before it in the layer (GPTQ's "true-sequential" order) and the layer runs once.
    `finish()` returns the layer's output. With nothing changed in between, the result is
    exactly `run_layer` (the same operations in the same order)."""

    def __init__(self, layer: nn.Module, inputs: LayerInputs) -> None:
        self.layer = layer
        self.inputs = inputs
        self._residual = inputs.hidden
        self._input: torch.Tensor | None = None

    @torch.no_grad()
    def advance(self, group: str) -> torch.Tensor:
        layer = self.layer
        if group == "attn_in":
            self._input = layer.input_layernorm(self._residual)
        elif group == "attn_out":
            source = self._input
            self._input = _input_of(layer.self_attn.o_proj,
                                    lambda: layer.self_attn(hidden_states=source, **self.inputs.layer_kwargs))
        elif group == "mlp_in":
            self._residual = self._residual + layer.self_attn.o_proj(self._input)
            self._input = layer.post_attention_layernorm(self._residual)
        elif group == "mlp_out":
            source = self._input
            self._input = _input_of(layer.mlp.down_proj, lambda: layer.mlp(source))
        else:
            raise ValueError(f"unknown input group '{group}'; the stages are {', '.join(STAGES)}")
        return self._input

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        return self._residual + self.layer.mlp.down_proj(self._input)


class HessianHooks:
    """Forward pre-hooks on one decoder layer's linears: each input group's tokens (pads
    dropped) go to the accumulator of the current stream."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.token_mask: torch.Tensor | None = None
        self._handles = []
        for group, linears in INPUT_GROUPS.items():
            linear = plain_linear(layer, linears[0])
            self._handles.append(linear.register_forward_pre_hook(self._make_hook(group, linear.in_features)))

    def start_stream(self) -> None:
        self.accumulators = {}

    def _make_hook(self, group: str, features: int):
        def hook(_module, args):
            inputs = args[0]
            if self.token_mask is not None:
                inputs = inputs[self.token_mask]
            accumulator = self.accumulators.get(group)
            if accumulator is None:
                accumulator = self.accumulators[group] = HessianAccumulator(features)
            accumulator.add(inputs)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
