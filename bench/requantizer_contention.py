"""How much does a requantizer-like job on another core slow a serving-like loop? (Linux)

    .venv/bin/python bench/requantizer_contention.py [SECONDS]

victim: 1 thread pinned to CPU 0, int4 (120 weights of 1536x576) + fp32 matmuls at batch 8,
about 70 MB of weights: more than this VM's 32 MB L3. aggressor: 1 thread, SCHED_IDLE, nice
19, GPTQ of a 1536x576 layer plus a Hessian product in a loop, pinned to CPU 1 or unpinned,
at a duty cycle of 1.0 or 0.5. Prints the victim's iterations/s per setting and the ratio to
running alone (measured first and last). docs/dynamic-tasks.md quotes it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def victim(seconds: float, results: multiprocessing.Queue, pinned: bool) -> None:
    if pinned:
        os.sched_setaffinity(0, {0})
    import torch

    torch.set_num_threads(1)
    activations = torch.randn(8, 576)
    packed_weights = [torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (1536, 576), dtype=torch.int32), 2)
                      for _ in range(120)]
    scales_and_zeros = torch.randn(576 // 64, 1536, 2)
    dense_weights = [torch.randn(1536, 576) for _ in range(12)]
    start = time.perf_counter()
    iterations = 0
    while time.perf_counter() < start + seconds:
        for packed in packed_weights:
            torch._weight_int4pack_mm_for_cpu(activations, packed, 64, scales_and_zeros)
        for weight in dense_weights:
            activations @ weight.T
        iterations += 1
    results.put(iterations / (time.perf_counter() - start))


def aggressor(share: float, pinned: bool, stop: multiprocessing.Event) -> None:
    if pinned:
        os.sched_setaffinity(0, {1})
    os.nice(19)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import torch

    sys.path.insert(0, str(REPO))
    from inlaid.quant.gptq import gptq_quantize
    from inlaid.quant.spec import QuantSpec

    torch.set_num_threads(1)
    weight = torch.randn(1536, 576)
    inputs = torch.randn(2048, 576)
    hessian = inputs.T @ inputs
    while not stop.is_set():
        cpu_before = time.process_time()
        gptq_quantize(weight, hessian, QuantSpec(bits=4, group_size=128))
        inputs.T @ inputs
        used = time.process_time() - cpu_before
        if share < 1:
            time.sleep(used * (1 - share) / share)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seconds", nargs="?", type=float, default=10.0, help="victim seconds per setting (default 10)")
    seconds = parser.parse_args(argv).seconds  # it read sys.argv[1] as a float: `--help` was a traceback
    if not hasattr(os, "sched_setaffinity") or not hasattr(os, "SCHED_IDLE") or len(os.sched_getaffinity(0)) < 2 \
            or not {0, 1} <= os.sched_getaffinity(0):
        print("requantizer_contention: needs Linux and CPUs 0 and 1; skipped")
        return 0
    settings = [("alone", None, True), ("idle, pinned, duty 1.0", 1.0, True), ("idle, pinned, duty 0.5", 0.5, True),
                ("idle, unpinned, duty 1.0", 1.0, False), ("alone again", None, True)]
    rates: dict[str, float] = {}
    for label, share, pinned in settings:
        results: multiprocessing.Queue = multiprocessing.Queue()
        stop = multiprocessing.Event()
        background = None
        if share is not None:
            background = multiprocessing.Process(target=aggressor, args=(share, pinned, stop))
            background.start()
            time.sleep(2)  # its imports and first GPTQ start before the victim measures
        foreground = multiprocessing.Process(target=victim, args=(seconds, results, pinned))
        foreground.start()
        rates[label] = results.get()
        foreground.join()
        if background is not None:
            stop.set()
            background.join()
        print(f"{label:26s} {rates[label]:8.3f} iterations/s", flush=True)
    alone = (rates["alone"] + rates["alone again"]) / 2
    for label, rate in rates.items():
        print(f"{label:26s} {rate / alone:.3f} of alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
