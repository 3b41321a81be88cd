"""How long a long prompt pauses the streams beside it: `[executor]
max_prefill_tokens_beside_decodes` at the CPU default (512) against the whole step budget (2048,
no cap), one `inlaid serve` each, on the 4-bit suite base `make run` built.

    .venv/bin/python bench/prefill_stalls.py [--prompt-tokens 6000] [--stream-tokens 60] [--rounds 3]

A stream (the `code` adapter, greedy, `ignore_eos`) runs; after its 4th chunk a second client
sends one long prompt (`--prompt-tokens` token ids, the `qa` adapter, 2 new tokens). Per run:
the stream's longest pause between two chunks, its 90th-percentile pause, its whole time,
and the long prompt's own latency. Then the cost where nobody streams: one offline batch (24
prompts of 400 tokens, 32 new tokens each) through an in-process engine at each setting. The
settings alternate over `--rounds` runs on one machine and the medians are reported (each
figure's own: the max and the p90 may come from other runs): compare them, not absolute
times (a loaded machine stretches both).

Writes bench/results/prefill_stalls.json; states the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from inlaid.client import Client

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
PORT = 18_830


def _config(checkpoint: Path, port: int, cap: int | None) -> str:
    executor = 'max_lora_slots = 2\nmax_lora_rank = 64\nweight_dtype = "bfloat16"\nnum_kv_blocks = 1024\n'
    if cap is not None:
        executor += f"max_prefill_tokens_beside_decodes = {cap}\n"
    return (f'[model]\nquantized_dir = "{checkpoint}"\n[executor]\n{executor}[server]\n'
            f'address = "tcp://127.0.0.1:{port}"\n[tasks]\nqa = "{ADAPTERS / "qa"}"\ncode = "{ADAPTERS / "code"}"\n')


def _one_run(checkpoint: Path, port: int, cap: int | None, prompt_tokens: int, stream_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inlaid-prefill-stalls-") as folder:
        (Path(folder) / "server.toml").write_text(_config(checkpoint, port, cap))
        with open(Path(folder) / "server.log", "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "inlaid.cli", "serve", "--config", "server.toml",
                                       "--log-level", "WARNING"], cwd=folder, stderr=log)
        try:
            address = f"tcp://127.0.0.1:{port}"
            client = Client(address, timeout_s=600)
            client.wait_ready(timeout_s=600)
            client.generate("warm up", task="code", max_tokens=4)
            long_prompt: dict[str, Any] = {}

            def send_long_prompt() -> None:
                started = time.perf_counter()
                try:
                    Client(address, timeout_s=600).generate(
                        prompt_token_ids=[100 + k % 1000 for k in range(prompt_tokens)], task="qa", max_tokens=2)
                except Exception as error:  # noqa: BLE001  (raised in the main thread below)
                    long_prompt["error"] = error
                long_prompt["seconds"] = time.perf_counter() - started

            sender = threading.Thread(target=send_long_prompt)
            stream = client.stream("Write a long story about a dragon.", task="code", max_tokens=stream_tokens,
                                   ignore_eos=True)
            started = last = time.perf_counter()
            pauses = []
            for index, _ in enumerate(stream):
                now = time.perf_counter()
                if index:
                    pauses.append(now - last)
                last = now
                if index == 3:
                    sender.start()
            stream_seconds = time.perf_counter() - started
            if sender.ident is None:
                raise RuntimeError("the stream ended before its 4th chunk: no long prompt was sent beside it")
            sender.join()
            if "error" in long_prompt:
                raise long_prompt["error"]
            pauses.sort()
            return {"max_pause_s": round(pauses[-1], 3), "p90_pause_s": round(pauses[int(0.9 * len(pauses))], 3),
                    "stream_s": round(stream_seconds, 3), "long_prompt_s": round(long_prompt["seconds"], 3)}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


def _offline_batches(checkpoint: Path, caps: tuple[int | None, ...], rounds: int) -> dict[int | None, float]:
    """Seconds (median of `rounds`, alternating) of one offline batch per cap: 24 prompts of 400
    token ids, 32 new tokens each, through one in-process engine (what `inlaid eval` and
    `generate` run), where nobody streams and only throughput counts."""
    from inlaid.engine.config import EngineConfig
    from inlaid.engine.engine import Engine
    from inlaid.engine.sequence import SamplingParams
    from inlaid.models.prepare import prepare_default_model

    model = str(prepare_default_model(quiet=True))
    prompts = [[100 + (k * 7 + i) % 1000 for k in range(400)] for i in range(24)]
    engines = {cap: Engine.local(EngineConfig(model_dir=model, quantized_dir=str(checkpoint), weight_dtype="bfloat16",
                                              num_kv_blocks=1024, max_lora_slots=2,
                                              max_prefill_tokens_beside_decodes=cap)) for cap in caps}
    seconds: dict[int | None, list[float]] = {cap: [] for cap in caps}
    for _ in range(rounds):
        for cap, engine in engines.items():
            started = time.perf_counter()
            engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
            seconds[cap].append(time.perf_counter() - started)
    return {cap: round(statistics.median(values), 3) for cap, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    from inlaid.demo import machine_name
    from inlaid.engine.config import CPU_PREFILL_BESIDE_DECODES
    from inlaid.quant.suite import is_complete, suite_checkpoint_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=6000, help="the long prompt's tokens (default 6000)")
    parser.add_argument("--stream-tokens", type=int, default=60, help="the stream's new tokens (default 60)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each setting, alternating (default 3); the medians are reported")
    parser.add_argument("--port", type=int, default=PORT, help=f"the servers' port (default {PORT})")
    args = parser.parse_args(argv)
    if not 4 < args.stream_tokens <= 4096 or not 1 <= args.prompt_tokens <= 8000 or not 1 <= args.rounds <= 20:
        parser.error("--stream-tokens must be 5-4096, --prompt-tokens 1-8000 (the default model's context is 8192) "
                     "and --rounds 1-20")
    checkpoint = suite_checkpoint_dir()
    if not is_complete(checkpoint):
        print(f"prefill_stalls: the 4-bit suite base is not built ({checkpoint}): run `make run` first",
              file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    settings = ((f"beside decodes {CPU_PREFILL_BESIDE_DECODES} (CPU default)", None),
                ("no cap (the step budget, 2048)", 2048))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in settings}
    for round_index in range(args.rounds):  # alternating, so that a load drift reaches both settings alike
        for label, cap in settings:
            runs[label].append(_one_run(checkpoint, args.port, cap, args.prompt_tokens, args.stream_tokens))
            print(f"round {round_index + 1}: {label} {runs[label][-1]}", flush=True)
    medians = {label: {key: statistics.median(run[key] for run in results) for key in results[0]}
               for label, results in runs.items()}
    for label, values in medians.items():
        print(f"median of {args.rounds}: {label} {values}")
    offline = _offline_batches(checkpoint, tuple(cap for _, cap in settings), args.rounds)
    offline_seconds = {label: offline[cap] for label, cap in settings}
    print(f"offline batch (24 prompts x 400 tokens, 32 new tokens), median of {args.rounds}: {offline_seconds}")
    report = {"prompt_tokens": args.prompt_tokens, "stream_tokens": args.stream_tokens, "medians": medians,
              "runs": runs, "offline_batch_s": offline_seconds, "machine": machine_name(),
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill_stalls.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS / 'prefill_stalls.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
