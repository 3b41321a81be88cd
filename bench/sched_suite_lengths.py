"""Record every suite request's greedy output length (the scheduler's workload data).

Runs the in-process engine (default model, each task's committed adapter, greedy, the
task's token budget) over the eval and calib examples of the nine suite tasks and writes
`inlaid/scheduling/data/suite_lengths.jsonl`: per example its prompt tokens, generated
tokens (end-of-turn token included: the decode steps the server runs), reference tokens
and budget. Traces and the predictor benchmark read it. About 10-20 minutes on 2 cores, so
`make bench` does not run it (no `main`): the committed file is its output.

    .venv/bin/python bench/sched_suite_lengths.py [--threads 1]
    .venv/bin/python bench/sched_suite_lengths.py --quantized   # -> inlaid/scheduling/data/suite_lengths_4bit.jsonl

`--quantized` records the lengths the MLGPTQ 4-bit suite base (bf16 embedding/head where the
CPU multiplies bf16 natively, as `make run` serves it) generates: its greedy answers differ
from the fp32 model's, and so do their lengths. `bench/sched_real.py --suite-lengths` replays
them, so that the simulation runs the work the 4-bit server does, and a server on a quantized
base tunes its scheduler on them (`inlaid.scheduling.suite.lengths_file_for`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ADAPTERS = Path(__file__).parents[1] / "adapters"


def run(threads: int, quantized: bool = False, out: Path | None = None) -> int:
    from inlaid.engine import Engine, EngineConfig, SamplingParams
    from inlaid.engine.tokenizer import Tokenizer
    from inlaid.models.prepare import prepare_default_model
    from inlaid.scheduling.suite import (SUITE_LENGTHS_4BIT_FILE, SUITE_LENGTHS_FILE, SuiteRecord, prompt_token_ids,
                                         suite_examples, write_suite_lengths)
    from inlaid.tasks import get_task

    model_dir = prepare_default_model(quiet=True)
    tokenizer = Tokenizer(model_dir)
    base: dict[str, str] = {}
    if quantized:
        from sched_cost import quantized_base_settings

        base = quantized_base_settings()
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), threads=threads, max_num_seqs=64, max_lora_slots=9,
                                       **base))
    examples = suite_examples()
    tasks = sorted({record_id.split("/")[0] for record_id, _, _ in examples})
    for task in tasks:
        engine.register_adapter(task, str(ADAPTERS / task))
    prompts = [prompt_token_ids(tokenizer, example) for _, _, example in examples]
    budgets = [get_task(record_id.split("/")[0]).max_new_tokens for record_id, _, _ in examples]
    outputs = engine.generate(prompts, [SamplingParams(max_tokens=b) for b in budgets],
                              [record_id.split("/")[0] for record_id, _, _ in examples], use_tqdm=True)
    records = [
        SuiteRecord(record_id=record_id, task=record_id.split("/")[0], split=split, prompt_tokens=len(prompt),
                    output_tokens=len(output.token_ids), reference_tokens=len(tokenizer.encode(example["reference"])),
                    max_tokens=budget, finish_reason=output.finish_reason)
        for (record_id, split, example), prompt, budget, output in zip(examples, prompts, budgets, outputs)
    ]
    write_suite_lengths(records, out or (SUITE_LENGTHS_4BIT_FILE if quantized else SUITE_LENGTHS_FILE))
    return len(records)


def record(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantized", action="store_true",
                        help="the 4-bit suite base's lengths, written to "
                             "inlaid/scheduling/data/suite_lengths_4bit.jsonl")
    args = parser.parse_args(argv)
    print(f"{run(args.threads, args.quantized)} records written")


if __name__ == "__main__":
    record()
