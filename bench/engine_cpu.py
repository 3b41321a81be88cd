"""Engine vs transformers + PEFT mixed-batch generate, same process, same threads (CPU).

Batch 16 over 4 rank-16 adapters on all seven projections, 64 new tokens each (EOS
ignored on both sides so both produce the same number of tokens). Runs alternate
(ours, reference, ours, reference, ...) and the medians are compared.

    .venv/bin/python bench/engine_cpu.py [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

NUM_ADAPTERS = 4
BATCH = 16
NEW_TOKENS = 64
RANK = 16
RESULTS = Path(__file__).parent / "results"
TOPICS = ["the ocean", "a library", "mountains", "coffee", "trains", "winter", "a robot", "music",
          "gardens", "the moon", "bicycles", "rain", "a market", "bridges", "owls", "deserts"]


def _make_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dirs = {}
    for index in range(NUM_ADAPTERS):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets,
                                                init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(0.3)
        dirs[f"task{index}"] = root / f"task{index}"
        model.save_pretrained(str(dirs[f"task{index}"]))
    return dirs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from inlaid.engine import Engine, EngineConfig, SamplingParams
    from inlaid.models.prepare import prepare_default_model

    model_dir = prepare_default_model(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _make_adapters(model_dir, Path(tmp))
        names = list(adapters)
        chosen = [names[i % NUM_ADAPTERS] for i in range(BATCH)]
        prompts = [f"Write a short paragraph about {topic}." for topic in TOPICS[:BATCH]]

        engine = Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32",
                                           max_lora_slots=NUM_ADAPTERS, max_lora_rank=RANK))
        for name, path in adapters.items():
            engine.register_adapter(name, str(path))
        messages = [[{"role": "user", "content": p}] for p in prompts]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)

        tokenizer = engine.tokenizer
        prompt_ids = [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in messages]
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[2] * (width - len(p)) + p for p in prompt_ids])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(hf, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapters[name]), adapter_name=name)
        peft_model.eval()

        def run_ours() -> float:
            started = time.perf_counter()
            outputs = engine.generate(prompt_ids, params, chosen)
            assert all(len(o.token_ids) == NEW_TOKENS for o in outputs)
            return time.perf_counter() - started

        def run_reference() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                out = peft_model.generate(input_ids=input_ids, attention_mask=attention, adapter_names=chosen,
                                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                          do_sample=False, pad_token_id=2)
            assert out.shape[1] - width == NEW_TOKENS
            return time.perf_counter() - started

        engine.generate(prompt_ids[:2], SamplingParams(max_tokens=4), chosen[:2])  # warm-up
        ours, reference = [], []
        for _ in range(args.rounds):
            ours.append(run_ours())
            reference.append(run_reference())

    total_tokens = BATCH * NEW_TOKENS
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "batch": BATCH, "adapters": NUM_ADAPTERS, "rank": RANK, "new_tokens": NEW_TOKENS,
        "ours_seconds": ours, "reference_seconds": reference,
        "ours_tokens_per_s": total_tokens / statistics.median(ours),
        "reference_tokens_per_s": total_tokens / statistics.median(reference),
    }
    result["speedup"] = result["ours_tokens_per_s"] / result["reference_tokens_per_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_cpu.json").write_text(json.dumps(result, indent=2))
    table = (
        f"# Engine vs transformers + PEFT (CPU)\n\n{result['machine']}, torch {result['torch']}; batch {BATCH}, "
        f"{NUM_ADAPTERS} adapters r{RANK} (all projections), {NEW_TOKENS} new tokens, fp32, "
        f"median of {args.rounds} alternating runs\n\n"
        "| engine | tokens/s |\n|---|---|\n"
        f"| Inlaid | {result['ours_tokens_per_s']:.1f} |\n"
        f"| transformers + PEFT (adapter_names) | {result['reference_tokens_per_s']:.1f} |\n"
        f"| **ratio** | **{result['speedup']:.2f}x** |\n"
    )
    (RESULTS / "engine_cpu.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
