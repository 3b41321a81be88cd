"""A random-weight PEFT adapter saved by PEFT itself, served by the engine and compared with
PEFT's own logits: where LoRA sits, and what it computes there."""

from __future__ import annotations

from pathlib import Path

import torch

from inlaid.engine.adapter_weights import check_servable_adapter
from inlaid.engine.config import ModelConfig


def served_where_peft_puts_lora(engine, model_dir: Path, directory: Path, greedy_logits, seed: int,
                                **config) -> int:  # type: ignore[no-untyped-def]
    """Save a random-weight PEFT adapter of `config`, check the engine puts LoRA on exactly the
    (layer, projection) pairs PEFT does and serves PEFT's own logits; the count of those pairs."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from inlaid.engine.adapter_config import PROJECTIONS

    def base():  # type: ignore[no-untyped-def]
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    torch.manual_seed(seed)
    made = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    made.save_pretrained(str(directory))
    spec = check_servable_adapter(directory.name, str(directory), ModelConfig.from_dir(str(model_dir)), 32)
    wanted = {(layer, projection) for layer in range(30) for projection in PROJECTIONS
              if not spec.excludes(layer, projection)}
    peft_model = PeftModel.from_pretrained(base(), str(directory)).eval()
    adapted = {(int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-1])
               for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and ".layers." in name}
    assert adapted == wanted  # the engine's rule is PEFT's
    for name, module in peft_model.named_modules():  # and each module's rank and scale are PEFT's
        if hasattr(module, "lora_A") and ".layers." in name:
            layer, projection = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-1]
            assert spec.rank_at(layer, projection) == module.r["default"], name
            assert spec.scale_at(layer, projection) == module.scaling["default"], name
    engine.register_adapter(directory.name, str(directory))
    prompt_ids = engine.tokenizer.encode("The capital of France is")
    (served,) = greedy_logits(engine, [prompt_ids], [directory.name], max_tokens=1)[0]
    with torch.no_grad():
        expected = peft_model(torch.tensor([prompt_ids])).logits[0, -1]
    torch.testing.assert_close(served, expected, atol=2e-4, rtol=0)
    engine.scheduler.adapters.unregister(directory.name)
    return len(wanted)
