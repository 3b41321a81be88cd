"""Greedy parity with transformers + PEFT on a mixed batch of adapters (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from inlaid.engine import Engine, EngineConfig
from inlaid.kernels.dispatch import packing_supported

NEW_TOKENS = 48
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Translate to French: The cat sits on the mat.",
    "List three colours:",
    "In 1905, Albert Einstein published",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village near the mountains, there lived an old clockmaker who",
    "Summarize: The meeting was postponed because of the storm.",
    "Hello",
]
ADAPTERS = ["attn-r8", None, "mlp-r16", "all-r32", "attn-r8", "all-r32", None, "mlp-r16", "all-r32", "attn-r8"]


def _reference(hf_model, model_dir, adapter_dirs, prompt_ids):
    """transformers + PEFT mixed-adapter greedy generate: tokens and per-step logits."""
    from peft import PeftModel

    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(hf_model, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    peft_model.eval()
    pad = 2
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            adapter_names=[a if a is not None else "__base__" for a in ADAPTERS],
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = out.sequences[:, width:].tolist()
    logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V]
    peft_model.unload()
    return tokens, logits


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["default", "batch_invariant"])
def test_mixed_batch_matches_transformers_peft(model_dir, hf_model, adapter_dirs, greedy_logits, batch_invariant):
    """batch_invariant: every row's attention through the native decode kernel (prompt rows too,
    engine/attention_groups.py), the prompts chunked by a 16-token budget."""
    budget = {"max_num_batched_tokens": 16} if batch_invariant else {}
    config = EngineConfig(model_dir=str(model_dir), dtype="float32", max_lora_slots=4, max_lora_rank=32,
                          num_kv_blocks=512, block_size=16, batch_invariant=batch_invariant, **budget)
    engine = Engine.local(config)
    # The default packs float32 weights for oneDNN (kernels/dense_cpu.py): parity covers that path.
    assert config.pack_weights and (engine.runner.model.packed_head is not None) == packing_supported(
        engine.runner.model.embed_tokens.weight)
    if batch_invariant and not engine.runner._native_decode_attention:
        pytest.skip("the native decode attention is not built here")
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, str(path))
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    # Step by step, to see the logits the runner computes; stops at EOS like the reference.
    our_logits = greedy_logits(engine, prompt_ids, ADAPTERS, NEW_TOKENS, ignore_eos=False)

    ref_tokens, ref_logits = _reference(hf_model, model_dir, adapter_dirs, prompt_ids)
    eos = set(engine.model_config.eos_token_ids)
    for index in range(len(PROMPTS)):
        reference = ref_tokens[index]
        cut = next((i + 1 for i, t in enumerate(reference) if t in eos), len(reference))
        reference = reference[:cut]
        mine = [int(row.argmax()) for row in our_logits[index]]
        assert mine == reference, f"prompt {index} ({ADAPTERS[index]}): tokens differ"
        ours_stacked = torch.stack(our_logits[index])
        max_diff = (ours_stacked - ref_logits[index, : len(mine)]).abs().max().item()
        assert max_diff < 1e-3, f"prompt {index}: logits differ by {max_diff}"
    # The adapters really change the outputs (else parity would be trivial).
    assert len({tuple(t[:8]) for t in ref_tokens}) > 5


def test_pack_weights_off_multiplies_the_plain_weights(model_dir, adapter_dirs, greedy_logits):
    """`pack_weights=False` keeps no packed copies and computes the same logits (to float32
    summation order) and greedy tokens as the packed default."""
    outputs = {}
    for pack in (True, False):
        engine = Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", max_lora_slots=4,
                                           max_lora_rank=32, num_kv_blocks=128, pack_weights=pack))
        model = engine.runner.model
        if not pack:
            assert model.packed_head is None and model.layers[0].mlp.down_proj.packed is None
        for name, path in adapter_dirs.items():
            engine.register_adapter(name, str(path))
        prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
        outputs[pack] = [torch.stack(rows) for rows in greedy_logits(engine, prompt_ids, ADAPTERS[:3], 6)]
    for packed, plain in zip(outputs[True], outputs[False]):
        assert torch.equal(packed.argmax(-1), plain.argmax(-1))
        assert (packed - plain).abs().max().item() < 1e-3
