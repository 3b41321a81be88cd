"""The committed task adapters: PEFT-standard files that load in PEFT and in Inlaid's engine.

PEFT's forward with an adapter is checked against the base model with the LoRA deltas
merged by hand from the safetensors file (W + alpha/r * B @ A); the engine's greedy tokens
are checked against PEFT's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "adapters"
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _manifest() -> dict:
    path = ADAPTERS / "MANIFEST.json"
    return json.loads(path.read_text()) if path.is_file() else {"adapters": {}}


ADAPTER_TASKS = sorted(_manifest()["adapters"])


def test_manifest_covers_committed_adapters():
    on_disk = sorted(p.parent.name for p in ADAPTERS.glob("*/adapter_config.json"))
    assert on_disk == ADAPTER_TASKS
    if not ADAPTER_TASKS:
        pytest.skip("no adapters committed yet")
    ranks = {_manifest()["adapters"][t]["rank"] for t in ADAPTER_TASKS}
    assert len(ranks) >= 2  # heterogeneous ranks across the suite


@pytest.mark.parametrize("task", ADAPTER_TASKS)
def test_adapter_files_are_peft_standard(task, model_dir):
    from safetensors.torch import load_file

    from inlaid.tasks import get_task

    get_task(task)
    entry = _manifest()["adapters"][task]
    config = json.loads((ADAPTERS / task / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == PROJECTIONS
    assert config["r"] == entry["rank"] and config["lora_alpha"] > 0
    tensors = load_file(str(ADAPTERS / task / "adapter_model.safetensors"))
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(tensors) == layers * len(PROJECTIONS) * 2
    for name, tensor in tensors.items():
        assert torch.isfinite(tensor).all(), name
        if "lora_A" in name:
            assert tensor.shape[0] == config["r"], name
        else:
            assert tensor.shape[1] == config["r"], name


def _merged_by_hand(model_dir: Path, adapter_dir: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            module_name = name.removeprefix("base_model.model.").replace(".lora_A.weight", "")
            modules[module_name].weight += scale * (b.double() @ a.double())
    return model


@pytest.mark.parametrize("task", ADAPTER_TASKS[:1])  # one: a 135M float64 model is slow to load
def test_peft_forward_equals_hand_merged_weights(task, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    example = get_task(task).load_split("eval")[0]
    prompt = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        base_logits = base(ids).logits[0, -1]
        peft_logits = PeftModel.from_pretrained(base, str(ADAPTERS / task)).eval()(ids).logits[0, -1]
        merged_logits = _merged_by_hand(model_dir, ADAPTERS / task)(ids).logits[0, -1]
    # PEFT keeps adapter weights in float32 (not float64): differences ~1e-5 on logits ~20
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model


def test_engine_greedy_tokens_match_peft(model_dir):
    if not ADAPTER_TASKS:
        pytest.skip("no adapters committed yet")
    from inlaid.tasks.generation import GenerationRequest, chat_prompt, engine_available, generate_with_engine, generate_with_peft

    if not engine_available():
        pytest.skip("Inlaid's engine runner is not available")
    from transformers import AutoTokenizer

    from inlaid.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    adapters = {task: ADAPTERS / task for task in ADAPTER_TASKS}
    requests = []
    for task in ADAPTER_TASKS:  # one mixed batch: every adapter, and the base, side by side
        example = get_task(task).load_split("eval")[0]
        prompt = chat_prompt(tokenizer, example["messages"])
        requests += [GenerationRequest(prompt, task, 6), GenerationRequest(prompt, None, 6)]
    ours = generate_with_engine(model_dir, adapters, requests, show_progress=False)
    reference = generate_with_peft(model_dir, adapters, requests, batch_size=1, show_progress=False)  # no padding
    assert [o.text for o in ours] == [r.text for r in reference]
