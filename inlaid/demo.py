"""`make run`: the default model with the committed task adapters, served in one batch.

1. In-process: a mixed batch (several adapters + the bare base) through `Engine`, printing
   each completion and the tokens/s.
2. Served: the same tasks through `inlaid serve` + the client SDK, printing per-task
   latency and throughput, then a clean shutdown.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADAPTER_ROOT = REPO / "adapters"
EXAMPLES_PER_TASK = 2


def committed_adapters() -> dict[str, Path]:
    return {
        path.name: path
        for path in sorted(ADAPTER_ROOT.iterdir())
        if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    } if ADAPTER_ROOT.is_dir() else {}


def demo_requests(adapters: dict[str, Path]) -> list[tuple[str | None, list[dict[str, str]], int, str]]:
    """(adapter, chat messages, max_tokens, reference) per demo request."""
    from inlaid.tasks import get_task

    requests = []
    for name in adapters:
        task = get_task(name)
        for example in task.load_split("eval")[:EXAMPLES_PER_TASK]:
            requests.append((name, example["messages"], task.max_new_tokens, example["reference"]))
    requests.append((None, [{"role": "user", "content": "Name three primary colours."}], 32, ""))
    return requests


def run_in_process(model_dir: Path, adapters: dict[str, Path]) -> None:
    from inlaid.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.local(EngineConfig(model_dir=str(model_dir)))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    requests = demo_requests(adapters)
    started = time.perf_counter()
    outputs = engine.generate(
        messages=[messages for _, messages, _, _ in requests],
        sampling=[SamplingParams(max_tokens=max_tokens) for _, _, max_tokens, _ in requests],
        adapters=[adapter for adapter, _, _, _ in requests],
        use_tqdm=True,
    )
    elapsed = time.perf_counter() - started
    generated = sum(len(o.token_ids) for o in outputs)
    print(f"\n== one batch, {len(requests)} requests over {len(adapters)} adapters + base ==")
    for (adapter, messages, _, reference), output in zip(requests, outputs):
        prompt = messages[-1]["content"].replace("\n", " ")
        print(f"\n[{adapter or 'base'}] {prompt[:90]}{'...' if len(prompt) > 90 else ''}")
        print(f"  -> {output.text.strip()[:200]!r}")
        if reference:
            print(f"  reference: {reference[:120]!r}")
    print(f"\n{generated} tokens in {elapsed:.1f}s = {generated / elapsed:.1f} tokens/s (CPU, fp32, batch {len(requests)})")


def main() -> int:
    from inlaid.models.prepare import prepare_default_model

    model_dir = prepare_default_model(quiet=True)
    adapters = committed_adapters()
    if not adapters:
        print("no committed adapters under adapters/: run `inlaid train-adapter` first", file=sys.stderr)
        return 1
    run_in_process(model_dir, adapters)

    from inlaid.serve.demo import BASE_TASK, run_server_demo

    prompts_by_task: dict[str, list] = {}
    for adapter, messages, _, _ in demo_requests(adapters):
        prompts_by_task.setdefault(adapter or BASE_TASK, []).append(messages)
    print("\n== the same tasks through `inlaid serve` and the client SDK ==")
    run_server_demo(model_dir, {name: str(path) for name, path in adapters.items()}, prompts_by_task)
    return 0


if __name__ == "__main__":
    sys.exit(main())
