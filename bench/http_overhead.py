"""HTTP front overhead: the same requests through the OpenAI-compatible front and through
the SDK, against one `inlaid serve`.

    .venv/bin/python bench/http_overhead.py [--rounds 6] [--quick]

A. The demo load (`make run`'s server part): the committed task adapters, two chat
   requests per task plus one for the base model, all sent at once, greedy, each task's
   own token budget. Rounds alternate SDK (`AsyncClient.generate`) and HTTP (the official
   `openai.AsyncOpenAI` client, `chat.completions.create`) so that machine load drifts
   over both alike. Per request: the client's wall-clock latency. The figure: p50 latency
   through HTTP against p50 through the SDK (target: at most 5% more). Both answer with
   the same text (greedy), so both rounds do the same work.
   On a loaded machine round-to-round noise can exceed the effect: the rounds alternate
   and pair up, and the CPU each process used per round is recorded too, since the
   front's cost on a CPU server is mostly the CPU it takes from the executor.
B. The fixed cost per request: one request at a time, one token, alternating SDK/HTTP;
   the difference of medians is what the front adds to any request (HTTP parsing, JSON,
   one more process hop).

Writes bench/results/http_overhead.{json,md,png}; states the machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import openai

from inlaid.client import AsyncClient
from inlaid.demo import SERVED_MAX_TOKENS, committed_adapters, served_prompts
from inlaid.serve.demo import BASE_TASK
from inlaid.serve.launcher import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_PERCENT = 5.0
TINY_PROMPT = [{"role": "user", "content": "Say yes."}]


def _p50(values: list[float]) -> float:
    return statistics.median(values)


async def _sdk_round(client: AsyncClient, jobs: list[tuple[str | None, list, int]]) -> list[tuple[float, str]]:
    async def one(task: str | None, messages: list, max_tokens: int) -> tuple[float, str]:
        started = time.perf_counter()
        done = await client.generate(messages=messages, task=task, max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - started, done.text

    return list(await asyncio.gather(*(one(*job) for job in jobs)))


async def _http_round(api: openai.AsyncOpenAI, base: str, jobs: list[tuple[str | None, list, int]]
                      ) -> list[tuple[float, str]]:
    async def one(task: str | None, messages: list, max_tokens: int) -> tuple[float, str]:
        started = time.perf_counter()
        answer = await api.chat.completions.create(model=task or base, messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
        return time.perf_counter() - started, answer.choices[0].message.content or ""

    return list(await asyncio.gather(*(one(*job) for job in jobs)))


def _children(server: ServerProcess) -> dict[str, int]:
    """The server's processes by role: coordinator, executor, front."""
    roles = {"coordinator": server.pid}
    for entry in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.pid:
            roles["front" if b"inlaid.http" in command else "executor"] = int(entry)
    return roles


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cpu(roles: dict[str, int]) -> dict[str, float]:
    usage = {role: _cpu_seconds(pid) for role, pid in roles.items()}
    usage["clients"] = time.process_time()  # this process: the SDK and the openai client
    return usage


async def _measure(server: ServerProcess, jobs: list, rounds: int, tiny: int) -> dict[str, Any]:
    roles = _children(server)
    api = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=1800)
    async with AsyncClient(server.address, timeout_s=1800) as client:
        base = (await client.handshake()).model
        # Warm-up: every adapter loaded, both paths' connections open.
        await _sdk_round(client, jobs)
        await _http_round(api, base, jobs[:2])
        per_round: list[dict[str, Any]] = []
        for index in range(2 * rounds):
            mode = "sdk" if index % 2 == 0 else "http"
            cpu_before = _cpu(roles)
            started = time.perf_counter()
            answers = await (_sdk_round(client, jobs) if mode == "sdk" else _http_round(api, base, jobs))
            wall = time.perf_counter() - started
            cpu = {role: used - cpu_before[role] for role, used in _cpu(roles).items()}
            latencies = [latency for latency, _ in answers]
            per_round.append({"mode": mode, "p50_s": _p50(latencies), "wall_s": wall, "latencies_s": latencies,
                              "cpu_s": cpu, "load_average": os.getloadavg()[0],
                              "texts": [text for _, text in answers]})
            print(f"  round {index // 2 + 1} {mode:4s}: p50 {_p50(latencies):.3f} s, wall {wall:.2f} s", flush=True)
        reference = per_round[0]["texts"]
        mismatches = sum(r["texts"] != reference for r in per_round)
        tiny_times: dict[str, list[float]] = {"sdk": [], "http": []}
        for _ in range(tiny):
            started = time.perf_counter()
            await client.generate(messages=TINY_PROMPT, max_tokens=1, temperature=0.0)
            tiny_times["sdk"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await api.chat.completions.create(model=base, messages=TINY_PROMPT, max_tokens=1, temperature=0)
            tiny_times["http"].append(time.perf_counter() - started)
    await api.close()
    for record in per_round:
        del record["texts"]
    return {"rounds": per_round, "tiny": tiny_times, "text_mismatch_rounds": mismatches}


def _summarize(measured: dict[str, Any]) -> dict[str, Any]:
    rounds = measured["rounds"]
    by_mode = {mode: [r for r in rounds if r["mode"] == mode] for mode in ("sdk", "http")}
    median_round_p50 = {mode: _p50([r["p50_s"] for r in rs]) for mode, rs in by_mode.items()}
    pooled_p50 = {mode: _p50([x for r in rs for x in r["latencies_s"]]) for mode, rs in by_mode.items()}
    # Paired: each HTTP round against the SDK round just before it (the nearest load).
    paired = [100 * (h["p50_s"] / s["p50_s"] - 1) for s, h in zip(by_mode["sdk"], by_mode["http"])]
    tiny = {mode: _p50(values) for mode, values in measured["tiny"].items()}
    cpu = {mode: {role: statistics.mean(r["cpu_s"][role] for r in rs) for role in rs[0]["cpu_s"]}
           for mode, rs in by_mode.items()}
    requests = len(rounds[0]["latencies_s"])
    # Load-robust bound: the fixed latency the front adds, as a share of the p50, plus the
    # CPU the HTTP path (front and openai client) spends beyond the SDK path's, as a share of
    # the executor's (what it could take from the executor when every core is busy).
    extra_cpu = (cpu["http"]["front"] + cpu["http"]["clients"]) - (cpu["sdk"]["front"] + cpu["sdk"]["clients"])
    fixed_share = 100 * max(0.0, tiny["http"] - tiny["sdk"]) / median_round_p50["sdk"]
    cpu_share = 100 * max(0.0, extra_cpu) / cpu["http"]["executor"]
    return {
        "bound_percent": fixed_share + cpu_share,
        "bound_fixed_latency_percent": fixed_share,
        "bound_cpu_percent": cpu_share,
        "paired_stdev_percent": statistics.stdev(paired) if len(paired) > 1 else 0.0,
        "cpu_s_per_round": cpu,
        # What HTTP requests cost the front beyond its idle timers (the SDK rounds' figure).
        "front_cpu_ms_per_request": 1e3 * (cpu["http"]["front"] - cpu["sdk"]["front"]) / requests,
        "front_cpu_percent_of_executor": 100 * cpu["http"]["front"] / cpu["http"]["executor"],
        "openai_client_cpu_ms_per_request": 1e3 * (cpu["http"]["clients"] - cpu["sdk"]["clients"]) / requests,
        "median_round_p50_s": median_round_p50,
        "pooled_p50_s": pooled_p50,
        "overhead_percent_median_rounds": 100 * (median_round_p50["http"] / median_round_p50["sdk"] - 1),
        "overhead_percent_pooled": 100 * (pooled_p50["http"] / pooled_p50["sdk"] - 1),
        "overhead_percent_paired_rounds": paired,
        "overhead_percent_paired_median": _p50(paired),
        "tiny_p50_s": tiny,
        "tiny_added_ms": 1e3 * (tiny["http"] - tiny["sdk"]),
    }


def _plot(measured: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, colour in (("sdk", "tab:blue"), ("http", "tab:orange")):
        latencies = sorted(x for r in measured["rounds"] if r["mode"] == mode for x in r["latencies_s"])
        share = [(i + 1) / len(latencies) for i in range(len(latencies))]
        label = f"{mode.upper()} (p50 {summary['pooled_p50_s'][mode]:.2f} s)"
        left.step(latencies, share, where="post", color=colour, label=label)
        p50s = [r["p50_s"] for r in measured["rounds"] if r["mode"] == mode]
        right.plot(range(1, len(p50s) + 1), p50s, "o-", color=colour, label=mode.upper())
    left.set(xlabel="request latency (s)", ylabel="share of requests", title="Demo load: latency CDF, all rounds")
    left.legend()
    right.set(xlabel="round", ylabel="p50 latency (s)", title="p50 per round (SDK and HTTP alternate)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per path at the demo load")
    parser.add_argument("--tiny", type=int, default=40, help="one-token requests per path")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 10 one-token requests")
    parser.add_argument("--render", action="store_true", help="only rewrite the report from the saved JSON")
    args = parser.parse_args(argv if argv is not None else [])
    if args.render:
        _write_report(json.loads((RESULTS / "http_overhead.json").read_text()))
        return 0
    if args.quick:
        args.rounds, args.tiny = 2, 10
    adapters = committed_adapters()
    if not adapters:
        print("no committed adapters under adapters/", file=sys.stderr)
        return 1
    # make run's served workload: its prompts per task (the bare base included), its length
    jobs = [(None if task == BASE_TASK else task,
             [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt, SERVED_MAX_TOKENS)
            for task, prompts in served_prompts(adapters).items() for prompt in prompts]
    config = {
        "model": {},
        "executor": {"threads": 1, "max_lora_slots": len(adapters)},
        "server": {"admin_token": secrets.token_hex(16), "log_level": "WARNING", "log_format": "text"},
        "tasks": {name: str(path) for name, path in adapters.items()},
        "http": {},
    }
    load_before = os.getloadavg()
    print(f"HTTP front overhead: {len(jobs)} requests per round over {len(adapters)} tasks + base, "
          f"{args.rounds} rounds per path; load average {load_before[0]:.2f}", flush=True)
    server = ServerProcess(config)
    try:
        server.wait_ready(timeout_s=900)
        measured = asyncio.run(_measure(server, jobs, args.rounds, args.tiny))
    finally:
        exit_code = server.terminate()
    _write_report({
        "benchmark": "http_overhead",
        "requests_per_round": len(jobs),
        "tasks": sorted(adapters),
        "max_tokens": [m for _, _, m in jobs],
        "rounds_per_path": args.rounds,
        "target_percent": TARGET_PERCENT,
        "text_mismatch_rounds": measured["text_mismatch_rounds"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server_exit_code": exit_code,
        "measured": measured,
    })
    return 0


def _write_report(report: dict[str, Any]) -> None:
    """The JSON (with its summary), the markdown table and the plot, from the measurements."""
    measured = report["measured"]
    summary = report["summary"] = _summarize(measured)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_overhead.json").write_text(json.dumps(report, indent=1))
    _plot(measured, summary, RESULTS / "http_overhead.png")
    noisy = summary["paired_stdev_percent"] > TARGET_PERCENT
    verdict = ("inconclusive: round-to-round noise is larger than the target" if noisy else
               "within" if summary["overhead_percent_median_rounds"] <= TARGET_PERCENT else "OVER")
    before, after = report["load_average_before"][0], report["load_average_after"][0]
    lines = [
        "# HTTP front overhead (demo load, SmolLM2-135M fp32, CPU, executor threads 1)",
        "",
        f"{report['requests_per_round']} chat requests per round ({len(report['tasks'])} task adapters and the bare "
        "base, make run's served prompts), "
        f"sent at once, greedy; {report['rounds_per_path']} rounds per path, SDK and HTTP rounds alternating. Load "
        f"average {before:.2f} before, {after:.2f} after ({report['machine']['cpus']} CPUs).",
        "",
        "| measure | SDK | HTTP (openai client) | HTTP - SDK |",
        "|---|---|---|---|",
        f"| p50 latency, median over rounds | {summary['median_round_p50_s']['sdk']:.3f} s | "
        f"{summary['median_round_p50_s']['http']:.3f} s | **{summary['overhead_percent_median_rounds']:+.2f}%** "
        f"({verdict}{'' if noisy else f' the {TARGET_PERCENT:.0f}% target'}) |",
        f"| p50 latency, all requests pooled | {summary['pooled_p50_s']['sdk']:.3f} s | "
        f"{summary['pooled_p50_s']['http']:.3f} s | {summary['overhead_percent_pooled']:+.2f}% |",
        f"| paired rounds (HTTP vs the SDK round before it), median | | | "
        f"{summary['overhead_percent_paired_median']:+.2f}% (each: "
        + ", ".join(f"{x:+.1f}%" for x in summary["overhead_percent_paired_rounds"])
        + f"; stdev {summary['paired_stdev_percent']:.1f}%) |",
        f"| one request alone, 1 token, p50 | {1e3 * summary['tiny_p50_s']['sdk']:.1f} ms | "
        f"{1e3 * summary['tiny_p50_s']['http']:.1f} ms | {summary['tiny_added_ms']:+.1f} ms |",
        "",
        "CPU seconds per round (mean), by process:",
        "",
        "| path | executor | coordinator | HTTP front | clients (this process) |",
        "|---|---|---|---|---|",
        *(f"| {mode.upper()} | {c['executor']:.2f} | {c['coordinator']:.2f} | {c['front']:.2f} | {c['clients']:.2f} |"
          for mode, c in summary["cpu_s_per_round"].items()),
        "",
        f"HTTP requests cost the front {summary['front_cpu_ms_per_request']:.2f} ms of CPU each beyond its idle "
        f"timers (the SDK rounds' front figure); all of the front's CPU was "
        f"{summary['front_cpu_percent_of_executor']:.2f}% of the executor's in the HTTP rounds. The openai client "
        f"itself took {summary['openai_client_cpu_ms_per_request']:.2f} ms of CPU per request more than the SDK.",
        "",
        f"**Load-robust bound: {summary['bound_percent']:.2f}%** of the p50 = the fixed latency the front adds "
        f"({summary['bound_fixed_latency_percent']:.2f}%: the one-token difference over the SDK's p50, 0 when "
        f"negative) + the extra CPU of the HTTP path, front and openai client, over the executor's CPU in the same "
        f"rounds ({summary['bound_cpu_percent']:.2f}%: what it could take from the executor when every core is busy).",
        "",
        f"Rounds whose answers differed from the first round's: {report['text_mismatch_rounds']} "
        "(greedy: both paths do the same work).",
        "",
        "![latency CDF and p50 per round](http_overhead.png)",
        "",
        "Reproduce: `.venv/bin/python bench/http_overhead.py` (`--quick` for 2 rounds).",
    ]
    (RESULTS / "http_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
