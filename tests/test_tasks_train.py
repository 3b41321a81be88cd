"""LoRA training: the loss is the standard causal-LM loss, and a resumed run equals a straight one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, model_dir) -> Path:
    """A 2-layer random Llama with the default model's tokenizer (chat template included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


def _config(tiny_model_dir: Path, out_dir: Path, steps: int):
    from inlaid.tasks.train import TrainConfig

    return TrainConfig(task="sentiment", model_dir=str(tiny_model_dir), out_dir=str(out_dir), rank=4, steps=steps,
                       batch_size=2, lr=1e-2, warmup_steps=1, save_every=2, precision="fp32", save_dtype="float32",
                       split="calib", threads=2)


def test_loss_equals_transformers_causal_lm_loss(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.tasks import get_task
    from inlaid.tasks.train import LORA_TARGET_MODULES, _collate, _loss, tokenize_sample

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    examples = get_task("sentiment").load_split("calib")[:3]
    samples = [tokenize_sample(tokenizer, e["messages"], e["reference"]) for e in examples]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False))
    input_ids, attention, labels = _collate(samples, tokenizer.eos_token_id, torch.device("cpu"))
    with torch.no_grad():
        ours = _loss(model, input_ids, attention, labels)
        reference = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    # the loss covers the reference and the end-of-turn token only
    ids, prompt_len = samples[0]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == examples[0]["reference"]


def test_resumed_training_equals_uninterrupted(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from inlaid.tasks.train import LORA_TARGET_MODULES, train

    straight = train(_config(tiny_model_dir, tmp_path / "straight", steps=4))
    interrupted = tmp_path / "resumed"
    train(_config(tiny_model_dir, interrupted, steps=2))
    (interrupted / "training.json").unlink()
    resumed = train(_config(tiny_model_dir, interrupted, steps=4))  # picks up the step-2 checkpoint

    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it did train
    config = json.loads((straight / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(LORA_TARGET_MODULES) and config["r"] == 4
    info = json.loads((straight / "training.json").read_text())
    assert info["steps"] == 4 and info["task"] == "sentiment" and len(info["train_data_sha256"]) == 64
