"""The CPU's masked LoRA route on compact copies (real ranks) against the padded pools, side
by side in one run (kernels/lora_compact_cpu.py).

The default model with the nine committed task adapters (ranks 8-64, every projection) in
9 slots at R_max = 64, every step mixing all nine: the median decode step (every request
decoding one token) in the process's CPU time, fp32 and 4-bit (int4 kernel, bf16 head)
bases, batch 16 and 32 (where the masked route runs: tokens x slots <= 512) and 64 (the
per-adapter route, unchanged: a control). Rounds alternate the two routes.

    .venv/bin/python bench/lora_compact.py [--rounds 2]    # bench/results/lora_compact.{json,md}

One torch thread (the server's executor runs one); about 5 minutes; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
BATCHES = (16, 32, 64)


def measure(rounds: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import engine_precision as precision

    import inlaid.engine.lora as lora_module
    from inlaid.demo import committed_adapters
    from inlaid.engine import Engine, EngineConfig
    from inlaid.models.prepare import prepare_default_model

    torch.set_num_threads(1)
    compact_pools = lora_module.LoraLinear._compact_pools
    model_dir = prepare_default_model(quiet=True)
    checkpoint, checkpoint_label = precision._four_bit_checkpoint(model_dir, Path(tempfile.mkdtemp()))
    task_adapters = committed_adapters()
    names = list(task_adapters)
    bases = {"fp32": {}, "4-bit": {"quantized_dir": str(checkpoint), "weight_dtype": "bfloat16"}}
    rows = []
    try:
        for base, fields in bases.items():
            engine = Engine.local(EngineConfig(model_dir=str(model_dir), threads=1, max_lora_slots=len(names),
                                               max_lora_rank=64, num_kv_blocks=1024, **fields))
            for name, path in task_adapters.items():
                engine.register_adapter(name, str(path))
            for batch in BATCHES:
                prompts = precision._prompts(engine, batch)
                adapters = [names[i % len(names)] for i in range(batch)]
                seconds: dict[str, list[float]] = {"padded": [], "compact": []}
                for _ in range(rounds):
                    for route in seconds:
                        lora_module.LoraLinear._compact_pools = (
                            compact_pools if route == "compact" else (lambda self: None))
                        steps = precision._decode_steps(engine, prompts, adapters)
                        seconds[route].append(statistics.median(cpu for _, cpu in steps))
                padded, compact = (1000 * statistics.median(seconds[r]) for r in ("padded", "compact"))
                rows.append({"base": base, "batch": batch, "padded_ms": round(padded, 1),
                             "compact_ms": round(compact, 1), "speedup": round(padded / compact, 2)})
                print(rows[-1], flush=True)
    finally:
        lora_module.LoraLinear._compact_pools = compact_pools
    return {"machine": f"{platform.machine()} {platform.processor() or 'cpu'}, 1 torch thread",
            "rounds": rounds, "four_bit_checkpoint": checkpoint_label, "rows": rows}


def render(result: dict) -> str:
    lines = ["# CPU LoRA: compact (real ranks) vs padded pools", "",
             f"9 committed task adapters (ranks 8-64) mixed in every step, 9 slots at R_max 64; median decode "
             f"step in CPU ms, {result['rounds']} alternating rounds; {result['machine']}. 4-bit base: "
             f"{result['four_bit_checkpoint']}. Batch 64 takes the per-adapter route either way (a control).", "",
             "| base | batch | padded ms | compact ms | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['base']} | {r['batch']} | {r['padded_ms']} | {r['compact_ms']} | {r['speedup']}x |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_compact.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "lora_compact.md").write_text(render(result))
    print(render(result))
    return result


if __name__ == "__main__":
    main()
