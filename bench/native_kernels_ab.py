"""The native CPU kernels switched on and off in ONE engine, decode step by decode step.

The 4-bit suite base with the nine committed adapters (max rank 64, 9 slots, one thread);
each round runs the same requests (batch B, adapters cycled, 20 new tokens, EOS ignored)
under five settings: every native kernel (the engine), then each of the int4 GEMM, the LoRA
kernel and the decode attention replaced by torch's route, then all three; the figure is the median decode step
(every request decoding one token) over the rounds. Switching in one process, round after
round, keeps the machine's drift out of the comparison.

    .venv/bin/python bench/native_kernels_ab.py [--rounds 3] [--batches 1,2,4,16]

Writes bench/results/native_kernels_ab.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # label -> (int4 kernel's first row count, native LoRA kernel, native decode attention)
    "all native (the engine)": (1, True, True),
    "int4 through torch": (sys.maxsize, True, True),
    "LoRA through torch": (1, False, True),
    "attention through torch": (1, True, False),
    "none (torch's kernels)": (sys.maxsize, False, False),
}


def _decode_steps(engine, prompts: list[list[int]], adapters: list[str]) -> list[float]:
    from inlaid.engine import SamplingParams

    for prompt, adapter in zip(prompts, adapters):
        engine.add_request(prompt, sampling=SamplingParams(max_tokens=20, ignore_eos=True), adapter=adapter)
    steps = []
    while engine.has_unfinished():
        plan = engine.begin_step()
        start = time.perf_counter()
        result = engine.runner.execute(plan)
        elapsed = time.perf_counter() - start
        engine.finish_step(result)
        if len(plan.chunks) == len(prompts) and all(len(c.token_ids) == 1 for c in plan.chunks):
            steps.append(elapsed)
    return steps


def measure(rounds: int, batches: list[int]) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_precision import _four_bit_checkpoint, _prompts

    from inlaid.demo import committed_adapters
    from inlaid.engine import Engine, EngineConfig
    from inlaid.engine.lora import LoraLinear
    from inlaid.kernels import attention_native, lora_cpu
    from inlaid.models.prepare import prepare_default_model

    torch.set_num_threads(1)
    model_dir = prepare_default_model(quiet=True)
    checkpoint, label = _four_bit_checkpoint(model_dir, Path(os.environ.get("TMPDIR", "/tmp")))
    adapters = committed_adapters()
    names = list(adapters)
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), quantized_dir=str(checkpoint), threads=1,
                                       weight_dtype="bfloat16", max_lora_slots=len(names), max_lora_rank=64,
                                       max_num_seqs=max(batches), num_kv_blocks=512))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    prepared = [p for m in engine.runner.model.modules() if isinstance(m, LoraLinear) for p in (m.quantized or [])
                if p.kind == "int4"]
    saved = lora_cpu.USE_NATIVE, attention_native.USE_NATIVE
    rows = []
    try:
        for batch in batches:
            prompts = _prompts(engine, batch)
            chosen = [names[i % len(names)] for i in range(batch)]
            _decode_steps(engine, prompts[:2], chosen[:2])  # warm-up
            times: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for _ in range(rounds):
                for name, (int4_from, native_lora, native_attention) in SETTINGS.items():
                    for p in prepared:
                        p.native_min_m = int4_from
                    lora_cpu.USE_NATIVE = native_lora
                    attention_native.USE_NATIVE = native_attention
                    times[name] += _decode_steps(engine, prompts, chosen)
            rows.append({"batch": batch, **{name: 1e3 * statistics.median(t) for name, t in times.items()}})
            print(rows[-1], flush=True)
    finally:
        lora_cpu.USE_NATIVE, attention_native.USE_NATIVE = saved
    return {"checkpoint": label, "rounds": rounds, "threads": 1, "loadavg_before": list(os.getloadavg()),
            "torch": torch.__version__, "rows": rows}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Native CPU kernels on and off in one engine (decode step, ms)", "",
             f"4-bit base: {result['checkpoint']}; nine committed adapters cycled over the batch; median "
             f"decode step over {result['rounds']} rounds per setting, settings interleaved; 1 thread; torch "
             f"{result['torch']}; load average before "
             f"{', '.join(f'{v:.1f}' for v in result['loadavg_before'])}.", "",
             "| batch | " + " | ".join(SETTINGS) + " | torch's kernels / the engine |",
             "|---|" + "---|" * len(SETTINGS) + "---|"]
    for row in result["rows"]:
        ratio = row["none (torch's kernels)"] / row["all native (the engine)"]
        lines.append(f"| {row['batch']} | " + " | ".join(f"{row[name]:.1f}" for name in SETTINGS) + f" | {ratio:.2f}x |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,2,4,16")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.rounds, [int(b) for b in args.batches.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native_kernels_ab.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "native_kernels_ab.md")
    print((args.out / "native_kernels_ab.md").read_text())


if __name__ == "__main__":
    main()
