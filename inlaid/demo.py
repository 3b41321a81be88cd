"""`make run`: every committed task adapter served from ONE shared MLGPTQ 4-bit base.

1. The base: MLGPTQ, 4-bit, group 128, calibrated on every task of adapters/MANIFEST.json
   (`inlaid.quant.suite.ensure_suite_checkpoint`: built once with a progress bar, cached
   under $XDG_CACHE_HOME/inlaid/quantized/ by its inputs, resumed if interrupted).
2. Quality against the fp32 base: teacher-forced NLL of a few eval answers per task, adapter on, through the
   engine on the unquantized base and on the 4-bit base as served, and on the bare base for
   scale (low noise: a handful of greedy task scores would move by chance).
3. Memory: the base at fp32 / bf16 / 4-bit, what the executor holds (adapters, KV).
4. Served: all tasks + the bare base through `inlaid serve` and the client SDK, mixed in
   every step; latency and throughput of that workload.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ADAPTER_ROOT = REPO / "adapters"
SERVED_EXAMPLES_PER_TASK = 2
SERVED_MAX_TOKENS = 32
BASE_PROMPTS = ["Name three primary colours.", "Write one sentence about the sea."]
# Quality sample per task: eval examples in file order until their answers hold this many
# tokens (short answers, like math's, take more examples), at most QUALITY_MAX_EXAMPLES.
QUALITY_ANSWER_TOKENS = 48
QUALITY_MAX_EXAMPLES = 6
KV_BLOCKS = 512  # 8192 tokens of KV: the served workload needs ~6000


def committed_adapters() -> dict[str, Path]:
    return {
        path.name: path
        for path in sorted(ADAPTER_ROOT.iterdir())
        if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    } if ADAPTER_ROOT.is_dir() else {}


def executor_options(adapters: dict[str, Path]) -> dict[str, Any]:
    """The executor's settings for this demo: a slot per adapter, the pools at the largest
    rank, KV sized for the workload; the embedding/head in bf16 where the CPU has it (the
    largest dense matrix left beside the 4-bit projections)."""
    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.kernels.dense_cpu import native_bf16

    ranks = [read_adapter_spec(name, str(path)).rank for name, path in adapters.items()]
    options: dict[str, Any] = {"max_lora_slots": len(adapters), "max_lora_rank": max(ranks), "num_kv_blocks": KV_BLOCKS}
    if native_bf16():
        options["weight_dtype"] = "bfloat16"
    return options


# ------------------------------------------------------------------------ 1. the base
def shared_base(model_dir: Path) -> tuple[Path, float, bool]:
    """(checkpoint dir, seconds, whether it was cached)."""
    from inlaid.quant.errors import QuantizationError
    from inlaid.quant.suite import ensure_suite_checkpoint, is_complete, suite_checkpoint_dir

    directory = suite_checkpoint_dir(model_dir)
    cached = is_complete(directory)
    if done := _kept_layers(directory):  # the bar starts at 0 all the same
        print(f"resuming the interrupted build: {done} finished layers kept in {directory}")
    started = time.monotonic()
    try:
        checkpoint = ensure_suite_checkpoint(model_dir, progress=True)
    except OSError as error:  # a read-only or full cache: one line, as the model's step says it
        if error.errno not in _CACHE_ERRNOS:
            raise  # not the cache's fault: its traceback is what a report needs
        raise DemoError(f"the 4-bit base cannot be built in {directory.parent}: {error.strerror or error} (set "
                        "XDG_CACHE_HOME to a writable directory with ~2.5 GB free)") from None
    except QuantizationError as error:
        if not _cache_full(error):
            raise  # the quantizer's own failure: its traceback is what a report needs
        # the quantizer's words for a disk filling up mid-build (safetensors' "os error 28"), one line
        parent = directory.parent
        free = f"; {shutil.disk_usage(parent).free / 1e9:.1f} GB free there" if parent.is_dir() else ""
        raise DemoError(f"the 4-bit base could not be built in {directory.parent}: {error}{free} (set XDG_CACHE_HOME "
                        "to a writable directory with ~2.5 GB free)") from None
    return checkpoint, time.monotonic() - started, cached


# ------------------------------------------------------- 2. quality against the fp32 base
@dataclass
class TaskQuality:
    task: str
    examples: int
    tokens: int
    nll_no_adapter: float  # mean per answer token, unquantized base, adapter off
    nll_float: float  # unquantized base + adapter
    nll_quantized: float  # the 4-bit base as served + adapter

    @property
    def perplexity_kept(self) -> float:
        """exp(-(NLL increase)): the unquantized base's perplexity over the 4-bit one's."""
        return math.exp(self.nll_float - self.nll_quantized)

    @property
    def gain_kept(self) -> float:
        """The share of the adapter's NLL gain (over the bare base) left on the 4-bit base."""
        return (self.nll_no_adapter - self.nll_quantized) / (self.nll_no_adapter - self.nll_float)


def quality_requests(model_dir: Path, adapters: dict[str, Path]):
    """(task, ScoreRequest) per sampled eval example: the chat prompt's tokens, then those of
    the reference answer and the end of turn, tokenized apart (the answer tokens a model
    would have to generate; the convention of bench/quality.py's NLL table)."""
    from inlaid.engine.scoring import ScoreRequest
    from inlaid.engine.tokenizer import Tokenizer
    from inlaid.quant.calibration import END_OF_TURN
    from inlaid.tasks import get_task

    tokenizer = Tokenizer(model_dir)
    requests = []
    for name, path in adapters.items():
        answer_tokens = 0
        for example in get_task(name).load_split("eval")[:QUALITY_MAX_EXAMPLES]:
            prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(example["messages"]))
            answer_ids = tokenizer.encode(example["reference"] + END_OF_TURN)
            requests.append((name, ScoreRequest(prompt_ids + answer_ids, len(prompt_ids), (name, str(path)))))
            answer_tokens += len(answer_ids)
            if answer_tokens >= QUALITY_ANSWER_TOKENS:
                break
    return requests


def measure_quality(model_dir: Path, checkpoint: Path, adapters: dict[str, Path], options: dict[str, Any]):
    """Per-task quality rows, and the memory the 4-bit executor holds (same settings as served)."""
    import gc

    from inlaid.engine import EngineConfig
    from inlaid.engine.memory import base_sizes, engine_memory
    from inlaid.engine.runner import ModelRunner
    from inlaid.engine.scoring import ScoreRequest, score_continuations

    tagged = quality_requests(model_dir, adapters)
    requests = [request for _, request in tagged]
    float_options = {k: v for k, v in options.items() if k != "weight_dtype"}
    runner = ModelRunner(EngineConfig(model_dir=str(model_dir), **float_options))
    float_scores = score_continuations(runner, requests)
    bare_scores = score_continuations(runner, [ScoreRequest(r.token_ids, r.first_scored) for r in requests])
    del runner
    gc.collect()
    runner = ModelRunner(EngineConfig(model_dir=str(model_dir), quantized_dir=str(checkpoint), **options))
    quantized_scores = score_continuations(runner, requests)
    memory, sizes = engine_memory(runner), base_sizes(runner)
    del runner
    gc.collect()
    rows = []
    for name in adapters:
        mine = [i for i, (task, _) in enumerate(tagged) if task == name]
        tokens = sum(float_scores[i].tokens for i in mine)
        rows.append(TaskQuality(name, len(mine), tokens, *(
            sum(scores[i].nll for i in mine) / tokens for scores in (bare_scores, float_scores, quantized_scores))))
    return rows, memory, sizes


def print_quality(rows: list[TaskQuality], served_label: str) -> None:
    print(f"\n== quality on the 4-bit base against the fp32 base: teacher-forced NLL per answer token, adapter on "
          f"({served_label}) ==")
    print(f"{'task':<14} {'examples':>8} {'tokens':>6} {'no adapter':>10} {'fp32 base':>10} {'4-bit base':>10} "
          f"{'increase':>9} {'ppl kept':>9} {'gain kept':>9}")
    for row in rows:
        print(f"{row.task:<14} {row.examples:>8} {row.tokens:>6} {row.nll_no_adapter:>10.3f} {row.nll_float:>10.3f} "
              f"{row.nll_quantized:>10.3f} {row.nll_quantized - row.nll_float:>+9.3f} "
              f"{100 * row.perplexity_kept:>8.1f}% {100 * row.gain_kept:>8.1f}%")
    worst = min(rows, key=lambda r: r.gain_kept)
    print(f"lowest here: {worst.task} keeps {100 * worst.gain_kept:.0f}% of its adapter's gain. no adapter: the fp32 "
          "base alone; ppl kept = exp(-increase); gain kept = the share of the adapter's NLL gain over the bare base "
          f"left on the 4-bit base. {QUALITY_MAX_EXAMPLES} examples or {QUALITY_ANSWER_TOKENS} answer tokens per task: "
          "a smoke test whose figures move by chance (above 100% is noise); every eval example with intervals: "
          "`make eval` (docs/quantization.md)")


# ---------------------------------------------------------------------- 3. memory
def checkpoint_projection_bytes(checkpoint: Path) -> int:
    """Bytes of the GPTQ tensors (qweight, qzeros, scales, g_idx) in the checkpoint."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                tensor = handle.get_slice(key)
                shape = tensor.get_shape()
                total += math.prod(shape) * (2 if tensor.get_dtype() == "F16" else 4)
    return total


_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors' names


def _stored_dtypes(adapters: dict[str, Path]) -> str:
    """The dtypes the adapters' files store their weights in ("float16"; several: "float16/float32")."""
    from safetensors import safe_open

    dtypes = set()
    for path in adapters.values():
        with safe_open(path / "adapter_model.safetensors", "pt") as weights:
            stored = {weights.get_slice(key).get_dtype() for key in weights.keys()}
        dtypes.update(_DTYPE_NAMES.get(name, name) for name in stored)
    return "/".join(sorted(dtypes)) or "no weights"


def print_memory(sizes, memory, checkpoint: Path, adapters: dict[str, Path], options: dict[str, Any]) -> None:
    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.engine.memory import MB

    projections = sizes.projection_params
    dense_rest = sizes.embedding_params + sizes.other_params
    quantized = checkpoint_projection_bytes(checkpoint)
    adapter_bytes = sum((path / "adapter_model.safetensors").stat().st_size for path in adapters.values())
    stored = _stored_dtypes(adapters)
    ranks = [read_adapter_spec(name, str(path)).rank for name, path in adapters.items()]
    print("\n== memory (MB = 10^6 bytes) ==")
    print(f"{'base weights':<44} {'fp32':>10} {'bf16':>10} {'4-bit':>10}")
    print(f"{'  projections (' + str(projections // 10**6) + 'M params)':<44} {4 * projections / MB:>7.0f} MB "
          f"{2 * projections / MB:>7.0f} MB {quantized / MB:>7.0f} MB")
    print(f"{'  embedding = tied head, norms (bf16 at 4-bit)':<44} {4 * dense_rest / MB:>7.0f} MB "
          f"{2 * dense_rest / MB:>7.0f} MB {2 * dense_rest / MB:>7.0f} MB")
    print(f"{'  total':<44} {4 * (projections + dense_rest) / MB:>7.0f} MB "
          f"{2 * (projections + dense_rest) / MB:>7.0f} MB {(quantized + 2 * dense_rest) / MB:>7.0f} MB")
    print(f"held by the 4-bit executor ({', '.join(f'{k}={v}' for k, v in options.items())}):")
    rows = [
        ("projections, int4 kernel layout", memory.projections),
        ("embedding + head (with its oneDNN-packed copy)", memory.embedding_and_head),
        ("norms", memory.other_weights),
        (f"LoRA pools: {options['max_lora_slots']} slots x rank {options['max_lora_rank']} (padded)",
         memory.lora_pools),
        *([("  (of which float16 copies the native LoRA kernel reads)", memory.lora_half_copies)]
          if memory.lora_half_copies else []),
        (f"  (the {len(adapters)} adapters themselves, {stored} on disk)", adapter_bytes),
        (f"KV cache: {options['num_kv_blocks']} blocks x 16 tokens", memory.kv_cache),
        ("total", memory.total),
    ]
    for label, value in rows:
        print(f"  {label:<58} {value / MB:>7.0f} MB")
    print(f"The pools give every slot the largest rank ({options['max_lora_rank']}): the adapters' ranks sum to "
          f"{sum(ranks)} of the {options['max_lora_slots'] * options['max_lora_rank']} rank rows they hold, the rest "
          "is padding, so that any slot takes any adapter up to that rank.")


# ------------------------------------------------------------------------ 4. served
def served_prompts(adapters: dict[str, Path]) -> dict[str, list]:
    from inlaid.serve.demo import BASE_TASK
    from inlaid.tasks import get_task

    prompts: dict[str, list] = {}
    for name in adapters:
        prompts[name] = [e["messages"] for e in get_task(name).load_split("eval")[-SERVED_EXAMPLES_PER_TASK:]]
    prompts[BASE_TASK] = list(BASE_PROMPTS)
    return prompts


def main() -> int:
    import torch

    from inlaid.models.prepare import prepare_default_model
    from inlaid.serve.demo import run_server_demo

    started = time.monotonic()
    model_dir = prepare_default_model(quiet=True)
    adapters = committed_adapters()
    if not adapters:
        print("no committed adapters under adapters/: run `inlaid train-adapter` first", file=sys.stderr)
        return 1
    options = executor_options(adapters)
    print(f"== the shared base: MLGPTQ 4-bit g128 over {len(adapters)} tasks ({', '.join(adapters)}) ==")
    checkpoint, seconds, cached = shared_base(model_dir)
    if cached:
        built_in = json.loads((checkpoint / "suite.json").read_text()).get("seconds")
        print(f"cached: {checkpoint} (found in {seconds:.1f} s; building it took {built_in} s)")
    else:
        print(f"built: {checkpoint} in {seconds:.1f} s")

    quality_started, quality_cpu = time.monotonic(), time.process_time()
    print(f"scoring up to {QUALITY_MAX_EXAMPLES} eval answers per task on the fp32 base (adapter off and on), then "
          "on the 4-bit base (a minute or two) ...", flush=True)
    rows, memory, sizes = measure_quality(model_dir, checkpoint, adapters, options)
    served_label = "int4 kernel" + (", bf16 embedding/head" if options.get("weight_dtype") == "bfloat16" else "")
    print_quality(rows, served_label)
    print(f"({time.monotonic() - quality_started:.0f} s, {time.process_time() - quality_cpu:.0f} s of CPU on "
          f"{torch.get_num_threads()} threads; machine load {os.getloadavg()[0]:.1f})")
    print_memory(sizes, memory, checkpoint, adapters, options)

    print(f"\n== served: {len(adapters)} tasks + the bare base from the 4-bit base, through `inlaid serve` ==")
    summary = run_server_demo(model_dir, {n: str(p) for n, p in adapters.items()}, served_prompts(adapters),
                              max_tokens=SERVED_MAX_TOKENS, quantized_dir=checkpoint, executor=options,
                              samples_per_task=1)
    print(f"\nmake run finished in {time.monotonic() - started:.0f} s after the set-up (machine load "
          f"{os.getloadavg()[0]:.1f}; {machine_name()})")
    return 0 if summary["exit_code"] == 0 and summary["ok"] == summary["requests"] else 1


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The demo takes no options; `--help` says what it does (it started the whole run,
    minutes of it, as any unknown argument did)."""
    parser = argparse.ArgumentParser(prog="python -m inlaid.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`make run` runs it after the set-up; it takes no options.")
    return parser.parse_args(argv)


# What a cache the base cannot be written into raises: read-only, full, over quota, no
# permission, a file where a folder goes.
_CACHE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EEXIST,
                           errno.ENOTDIR, errno.EFBIG})


def _cache_full(error: BaseException) -> bool:
    """Whether a build failed for want of room or rights in the cache: an OSError of those in
    its causes, or the words of one (safetensors reports a full disk as text: "os error 28")."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _CACHE_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return any(words in str(error) for words in ("No space left on device", "Disk quota exceeded", "os error 28",
                                                 "Read-only file system"))


class DemoError(Exception):
    """What stops `make run` for a reason of the machine's, said in one line."""


def machine_name() -> str:
    """The CPU's model name (/proc/cpuinfo) and core count, for the figures' context."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or 'unknown CPU'}, {os.cpu_count()} cores"


def run_main(argv: list[str] | None = None) -> int:
    """`main`, ending quietly (141, as `inlaid` commands do) when stdout's reader has gone
    (`make run | head`) rather than with a BrokenPipeError traceback; Ctrl-C and a cache it
    cannot write end in one line (they ended in tracebacks: an outside probe)."""
    from inlaid.cli import end_on_closed_stdout, stdout_closed
    from inlaid.interrupts import EXIT_TERMINATED, terminate_as_interrupt, was_terminated

    parse_arguments(sys.argv[1:] if argv is None else argv)  # --help, or a usage error (exit 2)
    # SIGTERM as Ctrl-C: it ended the demo at once, leaving its `inlaid serve` running (an outside probe)
    terminate_as_interrupt()
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at the exit's flush
        return code
    except BrokenPipeError:
        if stdout_closed():
            return end_on_closed_stdout()
        raise
    except DemoError as error:
        print(f"make run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        terminated = was_terminated(interrupt)
        print(f"make run: {'terminated (SIGTERM)' if terminated else 'interrupted'}{_kept_note()}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else 130


def _kept_layers(directory: Path) -> int:
    """The finished layers an interrupted build of the 4-bit base in `directory` kept (0 once built)."""
    from inlaid.quant.run_support import finished_layers
    from inlaid.quant.suite import is_complete

    return 0 if is_complete(directory) else finished_layers(directory)


def _kept_note() -> str:
    """What an interrupted build of the 4-bit base kept (`make run` again resumes from it)."""
    try:  # the imports too: an interrupt while torch imported left a half-imported torch behind
        from inlaid.models.prepare import default_model_dir
        from inlaid.quant.suite import suite_checkpoint_dir

        directory = suite_checkpoint_dir(default_model_dir())
        done = _kept_layers(directory)
    except Exception:  # noqa: BLE001 (the note is a courtesy; the interrupt is what is reported)
        return ""
    return f"; {done} finished layers of the 4-bit base kept in {directory}: `make run` again resumes" if done else ""


if __name__ == "__main__":
    sys.exit(run_main())
