"""Llama-family variants load and compute like transformers (tiny random models, fp32)."""

from __future__ import annotations

import pytest
import torch

from inlaid.engine.config import EngineConfig, ModelConfig
from inlaid.protocol import BatchPlan, ChunkPlan, SamplingParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)


def _llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=rope, tie_word_embeddings=False))


def _llama2_linear_rope():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    return LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=rope, tie_word_embeddings=True))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=None))


@pytest.mark.parametrize("build", [_llama3, _llama2_linear_rope, _qwen2, _mistral])
def test_variant_matches_transformers(tmp_path, build):
    from inlaid.engine.runner import ModelRunner

    torch.manual_seed(0)
    reference_model = build().eval()
    with torch.no_grad():  # random biases so the qkv-bias path is exercised
        for name, param in reference_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    reference_model.save_pretrained(str(tmp_path))
    config = ModelConfig.from_dir(tmp_path)
    runner = ModelRunner(EngineConfig(model_dir=str(tmp_path), dtype="float32", num_kv_blocks=32, block_size=8,
                                      max_lora_slots=1, max_lora_rank=4))
    token_ids = torch.randint(0, config.vocab_size, (150,)).tolist()  # long enough for llama3's scaled band
    with torch.no_grad():
        reference = reference_model(torch.tensor([token_ids])).logits[0]
    # One prefill chunk of 100 tokens, then the rest as a second chunk on top of the cache.
    blocks = list(range(-(-len(token_ids) // 8)))
    rows = []
    plan_a = BatchPlan(step_id=0, chunks=[ChunkPlan(seq_id=0, token_ids=token_ids[:100], start_pos=0,
                                                    block_table=blocks, adapter_slot=-1, sample=True,
                                                    sampling=SamplingParams(), num_generated=0)])
    rows.append(runner.forward_logits(plan_a)[1][0])
    plan_b = BatchPlan(step_id=1, chunks=[ChunkPlan(seq_id=0, token_ids=token_ids[100:], start_pos=100,
                                                    block_table=blocks, adapter_slot=-1, sample=True,
                                                    sampling=SamplingParams(), num_generated=0)])
    rows.append(runner.forward_logits(plan_b)[1][0])
    ours = torch.stack(rows)
    expected = reference[[99, 149]]
    assert (ours - expected).abs().max().item() < 1e-4
