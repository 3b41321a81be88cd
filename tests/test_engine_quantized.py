"""The engine serves a GPTQ checkpoint: logits equal transformers on the dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch

from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.protocol import BatchPlan, ChunkPlan

QUANTIZED_LAYERS = (0, 1, 2, 29)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory, model_dir):
    """RTN 4-bit (group 64, asymmetric) on a few layers, written in the GPTQ format."""
    from inlaid.engine.weights import read_state_dict
    from inlaid.quant.checkpoint import CheckpointMetadata, pack_linear, write_checkpoint
    from inlaid.quant.gptq import rtn_quantize
    from inlaid.quant.spec import QuantSpec

    spec = QuantSpec(bits=4, group_size=64, symmetric=False)
    state = read_state_dict(model_dir)
    packed = {}
    for layer in QUANTIZED_LAYERS:
        for projection in PROJECTIONS:
            prefix = f"model.layers.{layer}.{projection}"
            packed.update(pack_linear(prefix, rtn_quantize(state.pop(prefix + ".weight"), spec)))
    out = tmp_path_factory.mktemp("rtn4")
    write_checkpoint(out, model_dir, json.loads((model_dir / "config.json").read_text()), packed, state, spec,
                     CheckpointMetadata(method="rtn", tasks=[], spec={"bits": 4, "group_size": 64}))
    return out


def _reference_logits(checkpoint_dir, token_ids: list[int]) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint

    raw = json.loads((checkpoint_dir / "config.json").read_text())
    raw.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**raw)).eval()
    state = dequantized_state_dict(load_gptq_checkpoint(checkpoint_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def _engine_logits(engine: Engine, token_ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, one position per chunk (positions 0..n-1)."""
    blocks = list(range(-(-len(token_ids) // engine.config.block_size)))
    rows = []
    for position in range(len(token_ids)):
        plan = BatchPlan(step_id=position, chunks=[ChunkPlan(
            seq_id=0, token_ids=[token_ids[position]], start_pos=position, block_table=blocks,
            adapter_slot=-1, sample=True, sampling=SamplingParams(), num_generated=0)])
        rows.append(engine.runner.forward_logits(plan)[1][0])
    return torch.stack(rows)


def test_quantized_checkpoint_logits(rtn_checkpoint, model_dir):
    token_ids = Engine(EngineConfig(model_dir=str(model_dir))).tokenizer.encode("The river flows to the sea because")
    reference = _reference_logits(rtn_checkpoint, token_ids)
    base = EngineConfig(model_dir=str(model_dir), quantized_dir=str(rtn_checkpoint), dtype="float32",
                        max_lora_slots=1, max_lora_rank=8, num_kv_blocks=16)
    exact = Engine.local(EngineConfig(**{**base.__dict__, "quant_kernel": "dense"}))
    assert exact.runner.model.layers[0].self_attn.qkv_proj.quantized is not None
    assert (_engine_logits(exact, token_ids) - reference).abs().max().item() < 1e-3
    # The int4 CPU kernel computes in bf16: close, not bit-equal.
    fast = Engine.local(EngineConfig(**{**base.__dict__, "quant_kernel": "int4"}))
    fast_logits = _engine_logits(fast, token_ids)
    relative = (fast_logits - reference).norm() / reference.norm()
    assert relative.item() < 2e-2
    assert (fast_logits.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.8
