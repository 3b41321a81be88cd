"""The server demo: start `inlaid serve`, replay a mixed-task workload through the SDK,
print sample outputs and latency/throughput per task, shut down with SIGTERM."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inlaid.client import AsyncClient, InlaidError
from inlaid.serve.launcher import ServerProcess

BASE_TASK = "base"  # the key in prompts_by_task that runs the base model (no adapter)

Prompt = str | list[dict[str, str]]  # a user message text, or whole chat messages


@dataclass
class DemoResult:
    task: str
    prompt: Prompt
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    first_token_s: float = 0.0
    error: str = ""


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _short(text: Any, width: int = 70) -> str:
    if isinstance(text, list):
        text = text[-1]["content"] if text else ""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def _replay(address: str, jobs: list[tuple[str, Prompt]], max_tokens: int, chat: bool) -> list[DemoResult]:
    async with AsyncClient(address, timeout_s=900) as client:

        async def one(task: str, prompt: Prompt) -> DemoResult:
            result = DemoResult(task, prompt)
            if isinstance(prompt, list):
                kwargs: dict[str, Any] = {"messages": prompt}
            elif chat:
                kwargs = {"messages": [{"role": "user", "content": prompt}]}
            else:
                kwargs = {"prompt": prompt}
            try:
                done = await client.generate(task=None if task == BASE_TASK else task, max_tokens=max_tokens, **kwargs)
            except InlaidError as error:
                result.error = str(error)
                return result
            result.text, result.tokens = done.text, len(done.token_ids)
            result.latency_s, result.first_token_s = done.total_seconds, done.first_token_seconds
            return result

        return await asyncio.gather(*(one(task, prompt) for task, prompt in jobs))


def run_server_demo(
    model_dir: str | Path,
    adapters: Mapping[str, str | Path],
    prompts_by_task: Mapping[str, Sequence[Prompt]],
    *,
    max_tokens: int = 48,
    chat: bool = True,
    quantized_dir: str | Path | None = None,
    executor: Mapping[str, Any] | None = None,
    samples_per_task: int = 2,
) -> dict[str, Any]:
    """Serve `adapters` (task name -> PEFT dir) on `model_dir`; send every prompt of
    `prompts_by_task` (task name, or "base", -> prompts) at once, interleaved across tasks.
    String prompts go as one user chat message when `chat` (the tasks' format), else raw.
    Prints samples and latency/throughput; returns the same figures as a dict."""
    unknown = [t for t in prompts_by_task if t != BASE_TASK and t not in adapters]
    if unknown:
        raise ValueError(f"prompts for tasks without an adapter: {unknown}; known: {sorted(adapters)} + {BASE_TASK!r}")
    model: dict[str, Any] = {"dir": str(model_dir)}
    if quantized_dir:
        model["quantized_dir"] = str(quantized_dir)
    config = {
        "model": model,
        "executor": {"threads": 1, "max_lora_slots": max(1, len(adapters)), **(executor or {})},
        "server": {"admin_token": secrets.token_hex(16), "log_level": "WARNING", "log_format": "text"},
        "tasks": {name: str(path) for name, path in adapters.items()},
    }
    # Round-robin over tasks, so every step mixes adapters.
    queues = {task: list(prompts) for task, prompts in prompts_by_task.items()}
    jobs: list[tuple[str, Prompt]] = []
    while any(queues.values()):
        for task, queue in queues.items():
            if queue:
                jobs.append((task, queue.pop(0)))

    print(f"Inlaid server demo: {len(jobs)} requests over tasks {sorted(prompts_by_task)}; starting the server…")
    server = ServerProcess(config)
    interrupted = False
    try:
        started = time.monotonic()
        server.wait_ready(timeout_s=900)
        print(f"server ready in {time.monotonic() - started:.1f} s at {server.address}")
        wall = time.monotonic()
        results = asyncio.run(_replay(server.address, jobs, max_tokens, chat))
        wall = time.monotonic() - wall
        with server.client() as client:
            stats = client.stats()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the whole process group's too): nothing to look into later
        interrupted = True
        raise
    finally:
        try:
            exit_code = server.terminate()
        except KeyboardInterrupt:  # one while it stopped: stop_process killed it
            interrupted = True
            raise
        finally:
            if interrupted:
                server.remove_workdir()

    summary: dict[str, Any] = {"tasks": {}, "exit_code": exit_code}
    for task in prompts_by_task:
        mine = [r for r in results if r.task == task]
        ok = [r for r in mine if not r.error]
        print(f"\n== task {task}: {len(ok)}/{len(mine)} served (answers shown, not scored), p50 latency "
              f"{_percentile([r.latency_s for r in ok], 0.5):.2f} s, p50 first token "
              f"{_percentile([r.first_token_s for r in ok], 0.5):.2f} s")
        for r in ok[:samples_per_task]:
            print(f"  > {_short(r.prompt)}\n  < {_short(r.text, 110)}")
        for r in [r for r in mine if r.error][:2]:
            print(f"  ! {r.error}")
        summary["tasks"][task] = {
            "requests": len(mine), "ok": len(ok),
            "p50_latency_s": _percentile([r.latency_s for r in ok], 0.5),
            "p50_first_token_s": _percentile([r.first_token_s for r in ok], 0.5),
        }
    ok = [r for r in results if not r.error]
    tokens = sum(r.tokens for r in ok)
    overhead = 0.0
    if stats.mean_step_seconds:
        busy = stats.mean_step_seconds + stats.mean_step_gap_seconds
        overhead = 100 * (busy - stats.mean_compute_seconds) / busy
    summary.update({
        "requests": len(results), "ok": len(ok), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0, "requests_per_s": len(ok) / wall if wall else 0.0,
        "p50_latency_s": _percentile([r.latency_s for r in ok], 0.5),
        "p95_latency_s": _percentile([r.latency_s for r in ok], 0.95),
        "steps": stats.steps, "mean_step_ms": stats.mean_step_seconds * 1e3,
        "coordinator_overhead_percent": overhead,
    })
    print(f"\n{len(ok)}/{len(results)} requests, {tokens} tokens in {wall:.1f} s: "
          f"{summary['tokens_per_s']:.1f} tokens/s, {summary['requests_per_s']:.2f} requests/s; latency p50 "
          f"{summary['p50_latency_s']:.2f} s, p95 {summary['p95_latency_s']:.2f} s")
    print(f"{stats.steps} steps, mean step {stats.mean_step_seconds * 1e3:.1f} ms "
          f"(executor compute {stats.mean_compute_seconds * 1e3:.1f} ms; coordinator share {overhead:.2f}%)")
    print(f"server shut down (SIGTERM), exit code {exit_code}")
    if exit_code != 0:
        print(server.logs()[-3000:])
    return summary
