"""What an adapter load costs the executor: the load itself and the decode step after it.

On the default model with the nine committed task adapters, 8 slots (one fewer than the
tasks, so one adapter is always out): 16 sequences decode, and every `--every` steps the
adapter in one slot is replaced by the one that is out, as the scheduler does when a
request of the missing task arrives. Reported, each as a median:
  * the load: read from disk (first time) and from the executor's host cache (later);
  * a decode step right after a load against a decode step with no load before it; the
    step after a load brings the compact LoRA copies up to date (kernels/lora_compact_cpu.py):
    in place where the new adapter fits its slot's columns, else rebuilt in full, reported
    apart (which one ran is counted over the projections).

    .venv/bin/python bench/adapter_load.py [--threads 1] [--steps 120] [--every 5]

Writes bench/results/adapter_load.{json,md}. One torch thread by default (the server's
executor runs one). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SLOTS = 8
BATCH = 16


def measure(threads: int, steps: int, every: int) -> dict:
    from inlaid.demo import committed_adapters
    from inlaid.engine import Engine, EngineConfig
    from inlaid.models.prepare import prepare_default_model
    from inlaid.protocol import SamplingParams

    import inlaid.engine.lora as lora_module

    torch.set_num_threads(threads)
    outcomes: list[bool] = []  # per projection brought up to date: in place?
    update = lora_module.update_compact_slots

    def recorded_update(*args):  # noqa: ANN002, ANN202
        updated = update(*args)
        outcomes.append(updated is not None)
        return updated

    lora_module.update_compact_slots = recorded_update
    adapters = committed_adapters()
    names = list(adapters)
    engine = Engine.local(EngineConfig(model_dir=str(prepare_default_model(quiet=True)), threads=threads,
                                       max_lora_slots=SLOTS, max_lora_rank=64, num_kv_blocks=512))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    runner = engine.runner
    sampling = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for index in range(BATCH):
        engine.add_request(f"Request {index}: tell me about the weather.", sampling=sampling,
                           adapter=names[index % SLOTS])
    engine.step()  # the prefill, loading the first 8 adapters
    disk_loads, cached_loads, without_load = [], [], []
    after_load: dict[str, list[float]] = {"in place": [], "rebuilt": []}
    out, seen = names[SLOTS], set(names[:SLOTS])
    for step in range(steps):
        loaded = False
        if step % every == every - 1:
            slot = (step // every) % SLOTS
            replaced = Path(runner.slot_contents[slot]).name
            started = time.perf_counter()
            runner.load_adapter(slot, out, str(adapters[out]))
            (cached_loads if out in seen else disk_loads).append(time.perf_counter() - started)
            seen.add(out)
            out, loaded = replaced, True
        outcomes.clear()
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        if loaded:
            after_load["in place" if outcomes and all(outcomes) else "rebuilt"].append(elapsed)
        else:
            without_load.append(elapsed)
    lora_module.update_compact_slots = update
    ms = lambda values: round(1000 * statistics.median(values), 2) if values else None  # noqa: E731
    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.processor() or 'cpu'}",
        "batch": BATCH, "slots": SLOTS, "adapters": len(names), "threads": threads,
        "load_from_disk_ms": ms(disk_loads), "load_cached_ms": ms(cached_loads),
        "decode_step_after_load_in_place_ms": ms(after_load["in place"]),
        "decode_step_after_load_rebuilt_ms": ms(after_load["rebuilt"]), "decode_step_without_load_ms": ms(without_load),
        "counts": {"disk": len(disk_loads), "cached": len(cached_loads), "after_in_place": len(after_load["in place"]),
                   "after_rebuilt": len(after_load["rebuilt"]), "without": len(without_load)},
    }


def render(result: dict) -> str:
    return "\n".join([
        "# Adapter load cost (CPU executor, default model, float32)",
        "",
        f"{result['adapters']} task adapters on {result['slots']} slots, {result['batch']} sequences decoding, "
        f"{result['threads']} torch thread(s); medians.",
        "",
        "| what | ms |",
        "|---|---|",
        f"| load an adapter from disk (first time) | {result['load_from_disk_ms']} |",
        f"| load an adapter from the host cache | {result['load_cached_ms']} |",
        f"| decode step right after a load, copies updated in place ({result['counts']['after_in_place']} loads) | "
        f"{result['decode_step_after_load_in_place_ms']} |",
        f"| decode step right after a load, copies rebuilt ({result['counts']['after_rebuilt']} loads) | "
        f"{result['decode_step_after_load_rebuilt_ms']} |",
        f"| decode step with no load before it | {result['decode_step_without_load_ms']} |",
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=5, help="steps between loads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.threads, args.steps, args.every)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "adapter_load.md").write_text(render(result))
    print(render(result))
    return result


if __name__ == "__main__":
    main()
