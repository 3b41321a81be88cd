"""The end-to-end report (bench/e2e.py): the markdown table and the plots, from e2e.json and
records.jsonl, so `bench/e2e.py --render --out DIR` redraws them without rerunning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SLO_PLOTTED = "10s"


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    settings = report["settings"]
    load = ", ".join(f"{x:.1f}" for x in report["machine_loadavg_before"])
    load_after = ", ".join(f"{x:.1f}" for x in report["machine_loadavg_after"])
    lines = [
        "# End-to-end: the same trace on transformers + PEFT and three Inlaid setups", "",
        f"{report['machine']}; every server {settings['threads']} torch thread(s), batch cap {settings['max_num_seqs']}, "
        f"device {settings['device']}; {settings['min_requests']}-{settings['requests']} requests per replay (about "
        f"{settings['duration_s']:g} s of Poisson arrivals, suite eval prompts"
        f"{', budgets capped at ' + str(settings['max_tokens']) + ' tokens' if settings['max_tokens'] else ''}); "
        f"Inlaid: {settings['max_lora_slots']} adapter slots at most. Machine load average before: {load}; after: "
        f"{load_after}. Wall time {report['wall_s'] / 60:.1f} min.", "",
        "Systems: " + "; ".join(f"`{k}` = {v}" for k, v in report["systems"].items()) + ".", "",
        "## Headline: Inlaid 4-bit + inlaid policy vs transformers + PEFT", "",
        "The baseline's best throughput over the sweep and its p50 latency there; Inlaid's best throughput "
        "among its runs with a p50 latency at least as good.", "",
        "| tasks | popularity | baseline req/s | baseline p50 s | Inlaid req/s | Inlaid p50 s | **ratio at equal or better p50** | ratio of peaks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in report["headline"]:
        ratio = h["ratio_at_equal_or_better_p50"]
        lines.append(f"| {h['tasks']} | {h['popularity']} | {h['baseline_rps']:.3f} | {h['baseline_p50_s']:.1f} | "
                     f"{_fmt(h['inlaid_rps'], 3)} | {_fmt(h['inlaid_p50_s'], 1)} | **{_fmt(ratio)}x** | "
                     f"{h['ratio_of_peaks']:.2f}x |")
    lines += ["", "## Calibration (saturation, a burst of every request at once)", "",
              "| tasks | system | req/s |", "|---|---|---|"]
    for tasks, server in report["servers"].items():
        for label, rps in server["calibration_rps"].items():
            lines.append(f"| {tasks} | {label} | {rps:.3f} |")
    lines += ["", "## Every replay", "",
              f"Throughput: finished requests over first arrival to last answer. Latency: arrival to last token "
              f"(the baseline does not stream: its first token arrives with the last). SLO: answered within "
              f"{SLO_PLOTTED[:-1]} s. Tasks per step: distinct adapters per executor step (the baseline: per "
              f"`generate` batch).", "",
              "| tasks | popularity | rate req/s | system | done | req/s | tokens/s | p50 latency s | p99 latency s | "
              "p50 TTFT s | SLO 10 s | tasks/step | batch |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(report["workloads"], key=lambda r: (r["tasks"], r["popularity"], r["rate"], r["system"])):
        tasks_per_step = row.get("tasks_per_step", {}).get("mean")
        lines.append(
            f"| {row['tasks']} | {row['popularity']} | {row['rate']:.3f} | {row['system']} | {row['finished']}/{row['requests']} | "
            f"{row['throughput_rps']:.3f} | {row['throughput_tokens_s']:.1f} | {row['latency_s']['p50']:.1f} | "
            f"{row['latency_s']['p99']:.1f} | {row['ttft_s']['p50']:.1f} | {100 * row['latency_slo'][SLO_PLOTTED]:.0f}% | "
            f"{_fmt(tasks_per_step, 1)} | {_fmt(row.get('mean_batch_seqs'), 1)} |")
    lines += ["", "## Same answers", "", "Greedy answers of the same request on two systems.", "",
              "| systems | compared | identical | first token identical | mean tokens generated |",
              "|---|---|---|---|---|"]
    for a in report["agreement"]:
        tokens = " / ".join(f"{n:.1f}" for n in a["mean_tokens"]) if "mean_tokens" in a else "–"
        lines.append(f"| {' vs '.join(a['systems'])} | {a['compared']} | {a['identical']} | "
                     f"{a['first_token_identical']} | {tokens} |")
    lines += ["", "fp32 vs 4-bit: the 4-bit base answers otherwise (each task's quality on it: docs/quantization.md); "
              "requests/s favours the side whose answers are shorter (tokens/s in the table above does not)."]
    lines += ["", "## Memory", "", "Measured: resident memory of each server's model process at the end of its "
              "task count's replays.", "", "| tasks | system | RSS MiB | requests finished | tokens |", "|---|---|---|---|---|"]
    for tasks, server in report["servers"].items():
        for label, counts in server["counts"].items():
            lines.append(f"| {tasks} | {label} | {counts['rss_bytes'] / 2**20:.0f} | {counts['finished']} | "
                         f"{counts['tokens_generated']} |")
    memory = report.get("memory_computed") or {}
    if memory.get("measured"):
        lines += ["", f"Engine tensors for {memory['adapters']} adapters of rank {memory['rank']} and "
                      f"{memory['kv_tokens']} KV tokens ({memory['source']}, bench/memory.py):", "",
                  "| base | base MiB | adapters MiB | KV MiB | total MiB |", "|---|---|---|---|---|"]
        for m in memory["measured"]:
            lines.append(f"| {m['base']} | {m['base_bytes'] / 2**20:.0f} | {m['adapters_bytes'] / 2**20:.0f} | "
                         f"{m['kv_bytes'] / 2**20:.0f} | {m['total_bytes'] / 2**20:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def plot_all(report: dict[str, Any], records: list[dict[str, Any]], out: Path) -> list[Path]:
    """throughput_vs_rate, latency_cdf, slo_vs_rate, tasks_per_step, memory (.png); none
    without matplotlib (a GPU image may lack it)."""
    try:
        import matplotlib
    except ImportError:
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = report["workloads"]
    workloads = sorted({(r["tasks"], r["popularity"]) for r in rows})
    systems = list(report["systems"])
    written = []

    def per_workload(name: str, draw, ylabel: str, xlabel: str = "offered rate (requests/s)", log_x: bool = True) -> None:
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.6), squeeze=False)
        for axis, (tasks, popularity) in zip(axes[0], workloads):
            for system in systems:
                draw(axis, system, tasks, popularity)
            axis.set(title=f"{tasks} tasks, {popularity}", xlabel=xlabel, ylabel=ylabel)
            if log_x:  # a tick at every offered rate: one decade had one tick, the lowest rate unlabelled
                rates = sorted({r["rate"] for r in rows if (r["tasks"], r["popularity"]) == (tasks, popularity)})
                axis.set_xscale("log")
                axis.set_xticks(rates, [f"{rate:.2g}" for rate in rates])
                axis.xaxis.set_minor_formatter(NullFormatter())
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{name}.png")

    def series(system: str, tasks: int, popularity: str) -> list[dict[str, Any]]:
        return sorted((r for r in rows if (r["system"], r["tasks"], r["popularity"]) == (system, tasks, popularity)),
                      key=lambda r: r["rate"])

    def line(key):  # noqa: ANN001, ANN202
        def draw(axis, system, tasks, popularity):  # noqa: ANN001, ANN202
            # each system its own marker, dash and size: equal values (every SLO at 100 %) hid
            # all lines but the last one drawn
            index = systems.index(system)
            points = series(system, tasks, popularity)
            axis.plot([p["rate"] for p in points], [key(p) for p in points], label=system, color=f"C{index}",
                      marker="osD^v"[index % 5], markersize=9 - 1.5 * (index % 4), markerfacecolor="none",
                      linestyle=("-", "--", "-.", ":")[index % 4])
        return draw

    def offered(axis, system, tasks, popularity):  # noqa: ANN001, ANN202
        line(lambda p: p["throughput_rps"])(axis, system, tasks, popularity)
        if system == systems[0]:
            rates = sorted({r["rate"] for r in rows if (r["tasks"], r["popularity"]) == (tasks, popularity)})
            axis.plot(rates, rates, linestyle="--", color="grey", linewidth=1, label="offered")

    per_workload("throughput_vs_rate", offered, "throughput (requests/s)")
    per_workload("slo_vs_rate", line(lambda p: 100 * p["latency_slo"][SLO_PLOTTED]), f"% answered within {SLO_PLOTTED}")
    per_workload("tasks_per_step", line(lambda p: p.get("tasks_per_step", {}).get("mean", np.nan)),
                 "distinct adapters per step\n(hf-peft: per generate batch)")

    def cdf(axis, system, tasks, popularity):  # noqa: ANN001, ANN202
        top = max((r["rate_index"] for r in records if (r["tasks"], r["popularity"]) == (tasks, popularity)
                   and r["phase"] == "sweep"), default=0)
        latencies = sorted(r["finish_s"] - r["arrival_s"] for r in records
                           if (r["system"], r["tasks"], r["popularity"], r["rate_index"]) == (system, tasks, popularity, top)
                           and r["finish_s"] is not None and not r["error"])
        if latencies:
            axis.step(latencies, np.arange(1, len(latencies) + 1) / len(latencies), where="post", label=system)

    per_workload("latency_cdf", cdf, "share of requests (highest rate)", xlabel="latency (s)", log_x=False)

    labels, values, colors = [], [], []
    for tasks, server in report["servers"].items():
        for system in systems:
            if system in server["counts"]:
                labels.append(f"{system}, {tasks} tasks")
                values.append(server["counts"][system]["rss_bytes"] / 2**20)
                colors.append(f"C{systems.index(system)}")
    fig, axis = plt.subplots(figsize=(7.0, 1.2 + 0.35 * len(values)))  # horizontal: labels readable
    axis.barh(range(len(values)), values, color=colors)
    axis.set_yticks(range(len(values)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.margins(x=0.1)
    for row, value in enumerate(values):
        axis.text(value, row, f" {value:.0f}", va="center", fontsize=7)
    axis.set(xlabel="server RSS (MiB): model, adapters, KV cache, runtime",
             title="memory of each server's model process")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    written.append(out / "memory.png")
    return written
