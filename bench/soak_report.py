"""The soak's report: the JSON summary, the markdown table and the RSS-over-time plot
(bench/soak.py runs the soak)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from soak import Soak


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def build_report(soak: Soak, args: argparse.Namespace, exit_code: int, load_before: tuple, wall_s: float) -> dict:
    workload = [o for o in soak.outcomes if o.kind == "workload"]
    done = [o.latency_s for o in workload if o.result.startswith("done")]
    final = soak.samples[-1]
    rss_c = [s["coordinator_rss"] for s in soak.samples]
    rss_e = [s["executor_rss"] for s in soak.samples if s.get("executor_rss")]
    tenth = max(1, len(rss_c) // 10)
    return {
        "requests": args.requests, "concurrency": args.concurrency, "seed": args.seed, "wall_seconds": round(wall_s, 1),
        "requests_sent": len(soak.outcomes),
        "lost": sum(o.result == "lost" for o in soak.outcomes),
        "accepted": sum(o.accepted for o in soak.outcomes),
        "refused_up_front": sum(not o.accepted for o in soak.outcomes),
        "wrongly_accepted": sum("should have been refused" in o.result for o in soak.outcomes),
        "driver_errors": sum(o.result.startswith("driver error") for o in soak.outcomes),
        "streams_inconsistent": sum(not o.stream_consistent for o in soak.outcomes),
        "outcomes_workload": dict(Counter(o.result for o in workload).most_common()),
        "outcomes_fault_requests": dict(Counter(f"{o.kind} {o.result}" for o in soak.outcomes
                                                if o.kind != "workload").most_common()),
        "latency_completed_p50_s": round(percentile(done, 0.5), 3),
        "latency_completed_p99_s": round(percentile(done, 0.99), 3),
        "latency_completed_max_s": round(max(done, default=0.0), 3),
        "faults": dict(Counter(kind for _, kind, _ in soak.faults).most_common()),
        "fault_log": [{"t": round(t, 2), "kind": k, "note": n} for t, k, n in soak.faults],
        "executor_restarts": final.get("restarts"),
        "executor_sockets_closed_before_exit": soak.server.logs().count("injected fault: socket closed"),
        "kv_blocks_free_at_end": f"{final.get('kv_free')}/{final.get('kv_total')}",
        "coordinator_rss_mb": {"first_tenth_max": round(max(rss_c[:tenth]) / 2**20, 1),
                               "last_tenth_max": round(max(rss_c[-tenth:]) / 2**20, 1),
                               "max": round(max(rss_c) / 2**20, 1)},
        "executor_rss_mb": {"first_tenth_max": round(max(rss_e[:tenth], default=0) / 2**20, 1),
                            "last_tenth_max": round(max(rss_e[-tenth:], default=0) / 2**20, 1),
                            "max": round(max(rss_e, default=0) / 2**20, 1)},
        "server_exit_code_after_sigterm": exit_code,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
    }


def plot(soak: Soak, path: Path, fault_kinds: list[str], close_socket_after_plan: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in soak.samples]
    fig, (coordinator, executor, progress) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                                                          gridspec_kw={"height_ratios": [2, 2, 2]})
    coordinator.plot(t, [s["coordinator_rss"] / 2**20 for s in soak.samples], color="black")
    coordinator.set_ylabel("coordinator RSS, MiB")
    coordinator.set_ylim(bottom=0)
    executor.plot(t, [s.get("executor_rss", 0) / 2**20 or float("nan") for s in soak.samples], color="dimgray")
    executor.set_ylabel("executor RSS, MiB")
    executor.set_ylim(bottom=0)
    colours = dict(zip(fault_kinds, ["tab:red", "tab:orange", "tab:olive", "tab:purple", "tab:brown", "tab:cyan",
                                "tab:pink"]))
    for axis in (coordinator, executor):
        for at, kind, _ in soak.faults:
            axis.axvline(at / 60, color=colours.get(kind, "tab:gray"), alpha=0.5, lw=1)
    for kind in fault_kinds:
        coordinator.plot([], [], color=colours[kind], label=kind)
    coordinator.legend(fontsize=7, ncol=4, loc="lower right", title="faults injected", title_fontsize=7)
    coordinator.set_title(f"soak: {len(soak.outcomes)} requests, {len(soak.faults)} faults injected "
                          f"(+ every 3rd executor closes its socket after {close_socket_after_plan} plans)")
    progress.plot(t, [s["completed"] for s in soak.samples], color="black", label="workload requests answered")
    progress.set_ylabel("requests answered")
    progress.set_xlabel("minutes")
    restarts = progress.twinx()
    restarts.plot(t, [s.get("restarts", float("nan")) for s in soak.samples], color="tab:red")
    restarts.set_ylabel("executor restarts", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    rows = [
        ("requests sent (workload + fault-driven)", report["requests_sent"]),
        ("**lost** (no final answer)", f"**{report['lost']}**"),
        ("accepted / refused up front", f"{report['accepted']} / {report['refused_up_front']}"),
        ("invalid requests wrongly accepted", report["wrongly_accepted"]),
        ("streams whose chunks differ from the final text", report["streams_inconsistent"]),
        ("latency of completed requests p50 / p99 / max", f"{report['latency_completed_p50_s']} s / "
         f"{report['latency_completed_p99_s']} s / {report['latency_completed_max_s']} s"),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in report["faults"].items())),
        ("executor restarts", report["executor_restarts"]),
        ("of them: executor closed its socket before exiting", report["executor_sockets_closed_before_exit"]),
        ("KV blocks free at the end", report["kv_blocks_free_at_end"]),
        ("coordinator RSS, max of first / last tenth", f"{report['coordinator_rss_mb']['first_tenth_max']} / "
         f"{report['coordinator_rss_mb']['last_tenth_max']} MiB"),
        ("executor RSS, max of first / last tenth", f"{report['executor_rss_mb']['first_tenth_max']} / "
         f"{report['executor_rss_mb']['last_tenth_max']} MiB"),
        ("exit code after SIGTERM", report["server_exit_code_after_sigterm"]),
        ("wall time", f"{report['wall_seconds']} s"),
        ("load average before / after", f"{report['machine']['load_average_before']} / "
         f"{report['machine']['load_average_after']} ({report['machine']['cpus']} CPUs)"),
    ]
    lines = [f"# Soak: `{report['command']}`", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Workload outcomes:", "", "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["outcomes_workload"].items()]
    lines += ["", "Requests sent by the faults:", "", "| fault and outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["outcomes_fault_requests"].items()]
    lines += ["", "![RSS over time](soak.png)", ""]
    return "\n".join(lines)
