"""A bad quantized checkpoint (or adapter, or request) is refused in the user's terms, the
same way by every command that reads it: quantize-add runs the engine's tensor checks, a
broken weights file is named as such, a float model is not served as a quantized one, an
adapter for another base says which dimension differs, and a --max-tokens past the context
says it is capped. The checkpoints here are synthetic (one packed linear): seconds."""

from __future__ import annotations

import argparse
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inlaid.quant import checkpoint as checkpoint_module
from inlaid.quant.checkpoint import CheckpointMetadata, load_gptq_checkpoint, pack_linear, write_checkpoint
from inlaid.quant.errors import CheckpointError
from inlaid.quant.gptq import QuantizedWeight
from inlaid.quant.spec import QuantSpec

MATH_CALIB = Path(__file__).resolve().parents[1] / "inlaid" / "tasks" / "data" / "math" / "calib.jsonl"
NAN_SCALE = "model.layers.0.self_attn.q_proj.scales"
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1,
               "vocab_size": 32, "max_position_embeddings": 128}


def _checkpoint(root: Path, nan_scale: bool = False) -> Path:
    """A one-linear 4-bit checkpoint as `inlaid quantize` writes it (metadata included)."""
    spec = QuantSpec(bits=4, group_size=32)
    generator = torch.Generator().manual_seed(0)
    scales = torch.rand(2, 64, generator=generator) + 0.01
    if nan_scale:
        scales[0, 3] = float("nan")
    weight = QuantizedWeight(codes=torch.randint(0, 16, (64, 64), generator=generator, dtype=torch.uint8),
                             scales=scales, zeros=torch.full((2, 64), 8, dtype=torch.int32),
                             g_idx=torch.arange(64, dtype=torch.int32) // 32, bits=4, group_size=32)
    out = root / ("nan" if nan_scale else "good")
    (root / "base").mkdir(exist_ok=True)
    metadata = CheckpointMetadata(method="mlgptq", tasks=[{"name": "alpha"}], spec=spec.__dict__)
    write_checkpoint(out, root / "base", TINY_CONFIG, pack_linear("model.layers.0.self_attn.q_proj", weight),
                     {"model.norm.weight": torch.ones(64)}, spec, metadata)
    return out


def check_gptq_checkpoint(checkpoint: Path):  # looked up when called: absent before the fix
    return checkpoint_module.check_gptq_checkpoint(checkpoint)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    return err


# ---------------------------------------------------------------- 1: quantize-add runs the engine's checks

def test_quantize_add_refuses_a_nan_scale_with_the_engines_message(tmp_path, capsys) -> None:
    from inlaid.cli import main
    from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings

    checkpoint = _checkpoint(tmp_path, nan_scale=True)
    with pytest.raises(CheckpointError) as engine_refusal:
        load_gptq_checkpoint(checkpoint)
    assert f"{NAN_SCALE}: expected finite values, found 1 NaN/inf" in str(engine_refusal.value)
    assert "the checkpoint is corrupt" in str(engine_refusal.value)
    # The quantizer refuses before it reads its model, tokenizer or task (none exist here).
    with pytest.raises(CheckpointError) as incremental_refusal:
        IncrementalQuantizer(tmp_path / "no-model", checkpoint, None, IncrementalSettings(), tmp_path / "state")
    assert str(incremental_refusal.value) == str(engine_refusal.value)
    out = tmp_path / "extended"
    assert main(["quantize-add", "--checkpoint", str(checkpoint), "--task", f"beta=:{MATH_CALIB}",
                 "--max-samples", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, NAN_SCALE, "expected finite values", "the checkpoint is corrupt")
    assert not (out / "model.safetensors").exists()
    with pytest.raises(CheckpointError) as shared_refusal:
        check_gptq_checkpoint(checkpoint)
    assert str(shared_refusal.value) == str(engine_refusal.value)


def test_a_sound_checkpoint_passes_the_shared_checks(tmp_path) -> None:
    checkpoint = _checkpoint(tmp_path)
    assert check_gptq_checkpoint(checkpoint).bits == 4
    assert set(load_gptq_checkpoint(checkpoint).linears) == {"model.layers.0.self_attn.q_proj"}


# ---------------------------------------------------------------- 2: a broken weights file, named

def _truncate(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:-100])


def _garble_dtype_key(weights: Path) -> None:
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size].replace(b'"dtype"', b'"dtypX"', 1)
    weights.write_bytes(data[:8] + header + data[8 + size :])


@pytest.mark.parametrize("damage", [_truncate, _garble_dtype_key], ids=["truncated", "garbled dtype key"])
def test_a_broken_weights_file_is_named_before_any_model_loads(tmp_path, capsys, model_dir, damage) -> None:
    from inlaid.cli import main

    checkpoint = _checkpoint(tmp_path)
    damage(checkpoint / "model.safetensors")
    expected = f"{checkpoint / 'model.safetensors'} is truncated or not a safetensors file ("
    for read in (load_gptq_checkpoint, check_gptq_checkpoint):
        with pytest.raises(CheckpointError) as refusal:
            read(checkpoint)
        assert str(refusal.value).startswith(expected) and str(refusal.value).endswith(
            "the checkpoint is corrupt; rebuild it"), refusal.value
    assert main(["generate", "--model", str(model_dir), "--quantized", str(checkpoint), "--prompt", "hi"]) == 2
    _one_line_error(capsys, "inlaid generate: --quantized: " + expected, "rebuild it")


# ---------------------------------------------------------------- 3: a float model is not a quantized one

def test_generate_refuses_a_float_model_as_the_quantized_checkpoint(capsys, model_dir) -> None:
    from inlaid.cli import main
    from inlaid.engine.config import EngineConfig, ModelLoadError
    from inlaid.engine.runner import ModelRunner

    assert main(["generate", "--model", str(model_dir), "--quantized", str(model_dir), "--prompt", "hi"]) == 2
    _one_line_error(capsys, f"{model_dir}: config.json has no GPTQ quantization_config: not a quantized "
                            "checkpoint (give the float model as --model)")
    # The engine itself (a server's executors) refuses it too, before loading any weights.
    with pytest.raises(ModelLoadError, match="has no GPTQ quantization_config: not a quantized checkpoint"):
        ModelRunner(EngineConfig(model_dir=str(model_dir), quantized_dir=str(model_dir)))
    # And `inlaid serve` before any executor starts (config check, torch-free).
    from inlaid.serve.config_parsing import ConfigError, check_quantized_dir

    with pytest.raises(ConfigError, match=r"model.quantized_dir: .* not a quantized checkpoint \(give the float "
                                          r"model as model.dir\)"):
        check_quantized_dir(str(model_dir))


def test_serve_refuses_a_truncated_weights_file_before_any_executor_starts(tmp_path) -> None:
    from inlaid.serve.config_parsing import ConfigError, check_quantized_dir

    checkpoint = _checkpoint(tmp_path)
    _truncate(checkpoint / "model.safetensors")
    with pytest.raises(ConfigError, match="is truncated or not a safetensors file"):
        check_quantized_dir(str(checkpoint))


# ---------------------------------------------------------------- 4: an adapter for another base

@pytest.mark.parametrize("half", ["A", "B"])
def test_an_adapter_of_another_width_says_which_dimension_differs(tmp_path, model_dir, half) -> None:
    from inlaid.engine.adapter_config import AdapterError
    from inlaid.engine.adapter_weights import check_servable_adapter
    from inlaid.engine.config import ModelConfig

    model = ModelConfig.from_dir(str(model_dir))
    adapter = tmp_path / "wide"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}))
    width = {"A": (16, 768), "B": (768, 16)}  # a base of hidden size 768 (this one has 576)
    save_file({f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{h}.weight":
               torch.zeros(width[h] if h == half else ((16, 576) if h == "A" else (576, 16)))
               for layer in range(model.num_layers) for h in "AB"}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError) as refusal:
        check_servable_adapter("wide", str(adapter), model, max_rank=64)
    assert "trained for another base model (hidden size 768, this base has 576)" in str(refusal.value)
    assert "rank mismatch" not in str(refusal.value)


# ---------------------------------------------------------------- 5: --max-tokens past the context

@dataclass
class _FinishedOutput:
    request_id: str
    text_delta: str = "x"
    new_token_ids: list[int] = field(default_factory=lambda: [1])
    finished: bool = True
    finish_reason: str = "length"
    error: None = None


class _InstantEngine:
    """What `inlaid generate` uses of an engine, finishing every request at once (a real one
    would generate until the context is full: minutes)."""

    max_model_len = 8192

    def __init__(self) -> None:
        self.pending: list[str] = []

    def prompt_tokens(self, prompt, messages) -> list[int]:
        return [1] * 5

    def add_request(self, prompt, *, messages=None, sampling=None, adapter=None) -> str:
        self.pending.append(f"req-{len(self.pending)}")
        return self.pending[-1]

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[_FinishedOutput]:
        finished, self.pending = self.pending, []
        return [_FinishedOutput(request_id) for request_id in finished]


def test_max_tokens_past_the_context_says_where_it_stops(monkeypatch, capsys, model_dir) -> None:
    from inlaid.engine import Engine
    from inlaid.engine.cli import add_arguments, run

    monkeypatch.setattr(Engine, "local", classmethod(lambda cls, config: _InstantEngine()))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--model", str(model_dir), "--prompt", "hi", "--max-tokens", "100000000"])) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert notes == ["inlaid generate: note: --max-tokens 100000000 is more than the context leaves (8187): "
                     "generating at most 8187"]
    assert run(parser.parse_args(["--model", str(model_dir), "--prompt", "hi", "--max-tokens", "8187"])) == 0
    assert "note" not in capsys.readouterr().err
