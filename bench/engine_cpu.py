"""CPU engine benchmark, two parts in one run.

1. Engine vs transformers + PEFT mixed-batch generate, same process, same threads. Batch
   16 over 4 rank-16 adapters on all seven projections, 64 new tokens each (EOS ignored on
   both sides so both produce the same number of tokens). Two configurations of each side:
   Inlaid in float32 and with bf16 weights (float32 activations, KV, LoRA); transformers +
   PEFT in float32 and in bfloat16. Rounds alternate over all four and the medians are
   compared: same precision (fp32 vs fp32) and each side at its fastest.
2. The base's precision (`engine_precision.py`): decode speed of the engine at batch 1 / 4 / 16
   / 64 over the nine committed task adapters, on fp32, bf16 and 4-bit (native and torch int4 kernels) base
   weights, with a per-step profile of where the time goes.

    .venv/bin/python bench/engine_cpu.py [--rounds 5] [--threads N] [--sweep-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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


ENGINES = {  # label -> (EngineConfig dtype, weight_dtype)
    "Inlaid fp32": ("float32", "auto"),
    "Inlaid fp32, bf16 weights": ("float32", "bfloat16"),
}
REFERENCES = {"transformers + PEFT fp32": torch.float32, "transformers + PEFT bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweep-rounds", type=int, default=3, help="rounds per (precision, batch) of part 2")
    parser.add_argument("--sweep-threads", type=int, default=1, help="torch threads of part 2 (the server's executor: 1)")
    args = parser.parse_args(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    import os

    load_before = os.getloadavg()
    result, table = compare_with_transformers(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_precision import precision_sweep

    result["precision"], sweep_table = precision_sweep(args.sweep_rounds, args.sweep_threads, RESULTS / "engine_cpu.png")
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    load_note = (f"\nMachine load (1/5/15-min averages) before the run {', '.join(f'{x:.1f}' for x in load_before)}, "
                 f"after {', '.join(f'{x:.1f}' for x in result['load_average']['after'])}.\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_cpu.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "engine_cpu.md").write_text(table + "\n" + sweep_table + load_note)
    print(sweep_table + load_note)
    return result


def compare_with_transformers(args: argparse.Namespace) -> tuple[dict, str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from inlaid.engine import Engine, EngineConfig, SamplingParams
    from inlaid.models.prepare import prepare_default_model

    model_dir = prepare_default_model(quiet=True)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _make_adapters(model_dir, Path(tmp))
        names = list(adapters)
        chosen = [names[i % NUM_ADAPTERS] for i in range(BATCH)]
        prompts = [f"Write a short paragraph about {topic}." for topic in TOPICS[:BATCH]]
        messages = [[{"role": "user", "content": p}] for p in prompts]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)

        for label, (dtype, weight_dtype) in ENGINES.items():
            engine = Engine.local(EngineConfig(model_dir=str(model_dir), dtype=dtype, weight_dtype=weight_dtype,
                                               max_lora_slots=NUM_ADAPTERS, max_lora_rank=RANK))
            for name, path in adapters.items():
                engine.register_adapter(name, str(path))
            tokenizer = engine.tokenizer
            prompt_ids = [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in messages]
            engine.generate(prompt_ids[:2], SamplingParams(max_tokens=4), chosen[:2])  # warm-up

            def run_ours(engine=engine) -> None:
                outputs = engine.generate(prompt_ids, params, chosen)
                assert all(len(o.token_ids) == NEW_TOKENS for o in outputs)

            runners[label] = run_ours

        width = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[2] * (width - len(p)) + p for p in prompt_ids])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        for label, dtype in REFERENCES.items():
            hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
            peft_model = PeftModel.from_pretrained(hf, str(adapters[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(str(adapters[name]), adapter_name=name)
            peft_model.eval()

            def run_reference(peft_model=peft_model) -> None:
                with torch.no_grad():
                    out = peft_model.generate(input_ids=input_ids, attention_mask=attention, adapter_names=chosen,
                                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                              do_sample=False, pad_token_id=2)
                assert out.shape[1] - width == NEW_TOKENS

            runners[label] = run_reference

        seconds: dict[str, list[float]] = {label: [] for label in runners}
        for _ in range(args.rounds):  # alternate, so drifting machine load hits every runner alike
            for label, run in runners.items():
                started = time.perf_counter()
                run()
                seconds[label].append(time.perf_counter() - started)

    total_tokens = BATCH * NEW_TOKENS
    tokens_per_s = {label: total_tokens / statistics.median(times) for label, times in seconds.items()}
    best_reference = max(REFERENCES, key=lambda label: tokens_per_s[label])

    def paired(ours: str, reference: str) -> float:
        # Each round runs both back to back, so a per-round ratio cancels the machine's drift
        # between rounds (measured: the same runner's rounds vary by up to 1.7x on a shared VM).
        return statistics.median(r / o for o, r in zip(seconds[ours], seconds[reference]))

    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "batch": BATCH, "adapters": NUM_ADAPTERS, "rank": RANK, "new_tokens": NEW_TOKENS, "rounds": args.rounds,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "speedup_same_precision": tokens_per_s["Inlaid fp32"] / tokens_per_s["transformers + PEFT fp32"],
        "speedup_best_vs_best": tokens_per_s["Inlaid fp32, bf16 weights"] / tokens_per_s[best_reference],
        "best_reference": best_reference,
        "paired_speedup_same_precision": paired("Inlaid fp32", "transformers + PEFT fp32"),
        "paired_speedup_best_vs_best": paired("Inlaid fp32, bf16 weights", best_reference),
    }
    rows = "".join(f"| {label} | {tokens_per_s[label]:.1f} |\n" for label in runners)
    table = (
        f"# Engine vs transformers + PEFT (CPU)\n\n{result['machine']}, torch {result['torch']}; batch {BATCH}, "
        f"{NUM_ADAPTERS} adapters r{RANK} (all projections), {NEW_TOKENS} new tokens, "
        f"median of {args.rounds} alternating rounds\n\n"
        "| engine | tokens/s |\n|---|---|\n" + rows +
        f"| **Inlaid fp32 / transformers + PEFT fp32** (same precision) | **{result['speedup_same_precision']:.2f}x** |\n"
        f"| **Inlaid bf16 weights / {best_reference}** (each at its fastest) | **{result['speedup_best_vs_best']:.2f}x** |\n"
        f"\nRatios above: of the median times. Median of the per-round ratios (each round runs every "
        f"engine back to back): same precision {result['paired_speedup_same_precision']:.2f}x, "
        f"each at its fastest {result['paired_speedup_best_vs_best']:.2f}x.\n"
    )
    print(table)
    return result, table


if __name__ == "__main__":
    main(sys.argv[1:])
