"""What `batch_invariant`'s row-by-row attention costs a prompt's prefill step.

Under `EngineConfig.batch_invariant` every query row of a step, prompt rows too, is its own
query of the native decode attention (inlaid/engine/attention_groups.py), so that a prompt
token's attention has the same bits whole or chunked; by default a whole prompt takes torch's
causal SDPA. This times one prompt's prefill step (one sampled token) on the float default
model both ways, side by side, one torch thread, the best of the repeats after a warm-up.

    .venv/bin/python bench/row_attention.py [--lengths 128 512 1536] [--repeats 4]

Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def _prefill_seconds(batch_invariant: bool, length: int, repeats: int) -> float:
    from inlaid.engine import Engine, EngineConfig, SamplingParams
    from inlaid.models.prepare import prepare_default_model

    blocks = -(-length // 16) + 8
    engine = Engine.local(EngineConfig(model_dir=str(prepare_default_model(quiet=True)), dtype="float32",
                                       num_kv_blocks=blocks, max_num_batched_tokens=max(2048, length),
                                       batch_invariant=batch_invariant))
    prompt = [1000 + i % 20000 for i in range(length)]
    times = []
    for _ in range(repeats + 1):
        engine.add_request(prompt, sampling=SamplingParams(max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1536])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if min(args.lengths) < 2 or args.repeats < 1:
        parser.error("--lengths must be 2 tokens or more and --repeats at least 1")
    from inlaid.engine.config import ModelConfig
    from inlaid.models.prepare import prepare_default_model

    limit = ModelConfig.from_dir(prepare_default_model(quiet=True)).max_position_embeddings
    if max(args.lengths) >= limit:  # one token must still be generated after the prompt
        parser.error(f"--lengths must be below the default model's context of {limit} tokens, got {max(args.lengths)}")
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread\n")
    print("| prompt tokens | SDPA (default) s | row by row (batch_invariant) s | ratio |\n|---|---|---|---|")
    for length in args.lengths:
        default = _prefill_seconds(False, length, args.repeats)
        rows = _prefill_seconds(True, length, args.repeats)
        print(f"| {length} | {default:.3f} | {rows:.3f} | {rows / default:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
