"""The dynamic-task benchmark's report: the markdown tables and the serving plot
(bench/dynamic_tasks.py runs the benchmark and writes what these render)."""

from __future__ import annotations

import statistics
from pathlib import Path

# The benchmark's fixed setup: dynamic_tasks.py runs it, the report names it.
BASE_TASKS = ("sentiment", "math", "trans-fr")
NEW_TASK = "code"
BITS, GROUP = 4, 128
MAX_TOKENS = 256  # per calibration sample


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    differences = [x - y for x, y in zip(a, b)]
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def markdown(report: dict) -> str:
    full, offline = report["full"], report["offline"]
    lines = [
        "# Dynamic task addition (bench/dynamic_tasks.py)", "",
        f"Machine: {report['machine']}; load average (1, 5, 15 min) at the start of the last run "
        f"{_loads(report['loadavg_start'])}, at its end {_loads(report['loadavg_end'])}; each online row says its own "
        "(a load near 1 is this benchmark's own server: the machine was otherwise quiet).",
        f"Base: MLGPTQ {BITS}-bit g{GROUP} over {', '.join(BASE_TASKS)}; added: {NEW_TASK}; "
        f"{report['samples']} calibration samples per task (<= {MAX_TOKENS} tokens), 1 thread everywhere.", "",
        "## Table 4: full vs incremental", "",
        "| | forward + Hessian (s) | aggregation + quantization (s) | total (s) | peak memory (GB) |", "|---|---|---|---|---|",
        f"| full MLGPTQ, 4 tasks | {full['forward_s']:.0f} | {full['quantize_s']:.0f} | {full['total_s']:.0f} | "
        f"{full['peak_rss_gb']:.2f} |",
        f"| incremental, offline | {offline['forward_s']:.0f} | {offline['quantize_s']:.0f} | {offline['total_s']:.0f} | "
        f"{offline['peak_rss_gb']:.2f} |",
    ]
    for label, online in report.get("online", {}).items():
        lines.append(f"| incremental, online ({label}) | {online['forward_s']:.0f} (in the requantizer) | "
                     f"{online['quantize_s']:.0f} | {online['running_s']:.0f} running (add -> ready "
                     f"{online['requantize_wall_s']:.0f}, half of it stopped for the pairing) | "
                     f"{online['requantizer_peak_rss_gb']:.2f} (requantizer) |")
    lines += ["", "## Serving while re-quantizing", "",
              "Paired: served tokens/s while the requantizer runs / while it is stopped, in alternating "
              "windows during the job (the target is >= 0.90). Before / during / after: the same load in "
              "three consecutive periods, which other jobs on the machine move as much.", "",
              "| requantizer | paired ratio (median of pairs) | running / stopped (s) | steady tok/s | during tok/s "
              "| after tok/s | add -> ready (s) | layers swapped | failed requests | swap (ms, median) "
              "| load avg before / during |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, online in report.get("online", {}).items():
        settings = online["requantizer"] or "defaults"
        swap_ms = 1e3 * statistics.median(online["swap_seconds"]) if online["swap_seconds"] else float("nan")
        pairs = statistics.median(online["pair_ratios"]) if online["pair_ratios"] else float("nan")
        lines.append(f"| {label}: {settings} | **{online['paired_ratio']:.3f}** ({pairs:.3f}, "
                     f"{len(online['pair_ratios'])} pairs) | {online['running_s']:.0f} / {online['stopped_s']:.0f} | "
                     f"{online['steady_tok_s']:.1f} | {online['during_tok_s']:.1f} | {online['after_tok_s']:.1f} | "
                     f"{online['requantize_wall_s']:.0f} | {online['layers_swapped']} | {len(online['failures'])} | "
                     f"{swap_ms:.1f} | {online['loadavg_before'][0]:.1f} / {online['loadavg_during'][0]:.1f} |")
    if "online_equals_offline" in report:
        lines += ["", f"Online result equals the offline one, tensor for tensor: {report['online_equals_offline']}."]
    else:
        lines += ["", "Online vs offline result: not compared in this run (offline was not rerun); "
                      "`tests/test_dynamic_incremental.py` checks it in `make test`."]
    lines += ["", "## Decisions of the incremental run", "",
              f"Layers changed: {offline['layers_changed']} of 30; linears: {offline['actions']}.",
              f"Aggregate change δ per linear: {_fmt(offline['change'])}.",
              f"Existing tasks' error ratio (re-quantized / served) per linear: {_fmt(offline['existing_error_ratio'])}.",
              f"New task's error ratio: {_fmt(offline['new_error_ratio'])}."]
    quality = report.get("quality")
    if quality:
        nll = quality["per_sample_nll"]
        lines += ["", "## Quality: teacher-forced NLL per token (nats), eval examples", "",
                  "| task | examples | float | 3-task base | incremental | full 4-task | incremental - full (± 2 SE) |",
                  "|---|---|---|---|---|---|---|"]
        for name in (*BASE_TASKS, NEW_TASK):
            mean_difference, error = _paired(nll["incremental"][name], nll["full 4-task"][name])
            cells = " | ".join(f"{statistics.fmean(nll[label][name]):.4f}" for label in nll)
            lines.append(f"| {name} | {quality['examples'][name]} | {cells} | {mean_difference:+.4f} ± {2 * error:.4f} |")
    return "\n".join(lines) + "\n"


def _loads(loads: list[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in loads)


def _fmt(quantiles: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in quantiles.items())


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    online = report.get("online", {})
    if not online:
        return
    figure, axes = plt.subplots(len(online), 1, figsize=(9, 3.2 * len(online)), squeeze=False)
    for axis, (label, run) in zip(axes[:, 0], online.items()):
        bucket = 2.5
        end = max(t for t, _ in run["timeline"])
        counts = [0.0] * (int(end // bucket) + 1)
        for t, n in run["timeline"]:
            counts[int(t // bucket)] += n / bucket
        axis.plot([bucket * (i + 0.5) for i in range(len(counts))], counts, label="served tokens/s")
        for index, (start, end, running) in enumerate(run["windows"]):
            axis.axvspan(start, end, alpha=0.25 if running else 0.08, color="tab:red" if running else "tab:gray",
                         label=("requantizer running" if running else "requantizer stopped") if index < 2 else None)
        axis.axhline(run["steady_tok_s"], linestyle="--", linewidth=1, label="steady mean (before the job)")
        axis.set_title(f"{label}: running / stopped = {run['paired_ratio']:.3f} (paired windows)")
        axis.set_xlabel("seconds")
        axis.set_ylabel("tokens/s")
        axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
