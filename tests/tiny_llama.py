"""Small real inputs for the quantizer and dynamic-task tests: a tiny random Llama (with the
default model's tokenizer, so the engine and the server can serve it), PEFT adapters on it,
calibration files, and full MLGPTQ checkpoints of it written by the real driver."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "generation_config.json")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = dict(bits=4, group_size=32)


def make_tiny_model(directory: Path, source: Path, layers: int = 4, hidden: int = 64, seed: int = 0,
                    max_positions: int = 512) -> Path:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=True,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # trained-model magnitudes, so activations (and Hessians) are non-trivial
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.08)
    model.save_pretrained(str(directory))
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    return directory


def two_layer_model_or_skip(root: Path) -> Path:
    """The quantizer CLI tests' model: two layers of 64 on the default model's tokenizer
    (skips the test when the default model is not prepared)."""
    import pytest

    from inlaid.models.prepare import default_model_dir

    source = default_model_dir()
    if not (source / "tokenizer.json").is_file():
        pytest.skip("the default model (tokenizer) is not prepared; run `make setup`")
    return make_tiny_model(root / "model", source, layers=2, hidden=64, seed=0, max_positions=256)


def make_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 4, scale: float = 0.5,
                 poison: str | None = None) -> Path:
    """Random LoRA on every projection, B scaled by `scale`; `poison`: a module path whose B is
    filled with inf (for the refusal tests)."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False,
                             lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
                if poison is not None and poison in name:
                    parameter.fill_(float("inf"))
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def write_calibration(path: Path, topic: str, count: int) -> Path:
    lines = []
    for index in range(count):
        words = " ".join(f"{topic}{(index * 7 + k) % 13}" for k in range(3 + index % 5))
        lines.append(json.dumps({
            "id": f"{topic}-{index}", "task": topic,
            "messages": [{"role": "user", "content": f"Tell me about {words}."}],
            "reference": f"{topic} answer {index}: " + words * (1 + index % 3), "answers": ["x"],
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def calibration_tasks(model_dir: Path, root: Path, samples: dict[str, int]) -> list:
    """One CalibrationTask per name: an adapter of its own (seeded by its position) and
    `samples[name]` calibration samples, written under `root`."""
    from inlaid.quant.calibration import CalibrationTask

    return [CalibrationTask(name, make_adapter(model_dir, root / f"adapter_{name}", seed=index + 1),
                            write_calibration(root / f"{name}.jsonl", name, count))
            for index, (name, count) in enumerate(samples.items())]


def quantize_full(model_dir: Path, tasks: list, out_dir: Path, method: str = "mlgptq") -> Path:
    """A full MLGPTQ checkpoint with its Hessian state, through the real driver."""
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.methods import parse_method
    from inlaid.quant.spec import QuantSpec

    quantize_model(DriverConfig(
        model_dir=model_dir, tasks=tasks, method=parse_method(method, [t.name for t in tasks]),
        spec=QuantSpec(**SPEC), out_dir=out_dir, max_samples=None, max_tokens=64, max_batch_tokens=200,
        progress=False,
    ))
    return out_dir
