"""Tables and plots of the scheduling benchmarks (imported by sched_sim.py and sched_real.py)."""

from __future__ import annotations

import math
from pathlib import Path

from inlaid.scheduling.autotune import slo_target_out_of_reach

POLICY_COLORS = {"fifo": "#555555", "mlfq": "#1f77b4", "vtc": "#2ca02c", "inlaid": "#d62728", "inlaid+fair": "#ff7f0e"}


def _config_key(run: dict) -> tuple:
    return (run["tasks"], run["cv"], run["popularity"])


def _config_label(key: tuple) -> str:
    tasks, cv, popularity = key
    return f"{tasks} tasks, CV {cv:g}, {popularity}"


def _ratio(value: float, reference: float) -> str:
    if not reference or math.isnan(reference) or math.isnan(value):
        return "-"
    return f"{value / reference:.2f}x"


def _index(runs: list[dict]) -> dict:
    return {(_config_key(r), r["load"], r["policy"]): r for r in runs}


def criteria_rows(report: dict, load: float) -> list[str]:
    """The issue's targets at one load, per configuration: inlaid vs FIFO and vs MLFQ."""
    scale = report["slo_scale"]
    runs = _index(report["runs"])
    configs = sorted({_config_key(r) for r in report["runs"]})
    lines = [f"| configuration | SLO {scale}: inlaid / FIFO (>= 2x) | mean JCT: inlaid / FIFO (<= 0.7x) | "
             "p99 TTFT: inlaid / FIFO (<= 1x) | inlaid ahead of MLFQ (SLO, JCT) | max wait s: FIFO / inlaid | "
             "service gap: VTC / inlaid+fair |", "|---|---|---|---|---|---|---|"]
    for key in configs:
        fifo, inlaid, mlfq = (runs.get((key, load, p)) for p in ("fifo", "inlaid", "mlfq"))
        vtc, fair = runs.get((key, load, "vtc")), runs.get((key, load, "inlaid+fair"))
        if not (fifo and inlaid and mlfq):
            continue
        fifo_slo = fifo["slo_attainment"][scale]
        slo = inlaid["slo_attainment"][scale] / fifo_slo if fifo_slo >= 0.01 else math.inf
        jct = inlaid["latency_s"]["mean"] / fifo["latency_s"]["mean"]
        ttft = inlaid["ttft_s"]["p99"] / fifo["ttft_s"]["p99"]
        ahead = (inlaid["slo_attainment"][scale] >= mlfq["slo_attainment"][scale],
                 inlaid["latency_s"]["mean"] <= mlfq["latency_s"]["mean"])
        gaps = f"{vtc['fairness_max_service_gap']:.0f} / {fair['fairness_max_service_gap']:.0f}" if vtc and fair else "-"
        out_of_reach = "; 2x FIFO is over 100 %" if slo_target_out_of_reach(fifo_slo) else ""
        lines.append(
            f"| {_config_label(key)} | {_mark(slo >= 2)} {'>100' if slo == math.inf else f'{slo:.2f}'}x "
            f"({fifo['slo_attainment'][scale]:.0%} -> {inlaid['slo_attainment'][scale]:.0%}{out_of_reach}) | "
            f"{_mark(jct <= 0.7)} {jct:.2f}x | {_mark(ttft <= 1.0)} {ttft:.2f}x "
            f"| {_mark(all(ahead))} {'yes' if ahead[0] else 'no'}, {'yes' if ahead[1] else 'no'} | "
            f"{fifo['max_wait_s']:.0f} / {inlaid['max_wait_s']:.0f} | {gaps} |")
    return lines


def oracle_rows(report: dict, load: float) -> list[str]:
    """Mean JCT over FIFO's: inlaid, inlaid with exact lengths, and the best clairvoyant
    oracle (which β, and the longest wait it leaves, since it has no starvation guard)."""
    runs = _index(report["runs"])
    configs = sorted({_config_key(r) for r in report["runs"]})
    lines = ["| configuration | FIFO mean JCT s (max wait s) | inlaid / FIFO | inlaid exact / FIFO | best oracle / FIFO "
             "(<= 0.7x reachable?) | oracle's max wait s |", "|---|---|---|---|---|---|"]
    for key in configs:
        fifo, inlaid, exact = (runs.get((key, load, p)) for p in ("fifo", "inlaid", "inlaid exact"))
        oracles = [runs[(key, load, p)] for p in report.get("oracles", []) if (key, load, p) in runs]
        if not (fifo and inlaid and exact and oracles):
            continue
        best = min(oracles, key=lambda r: r["latency_s"]["mean"])
        reference = fifo["latency_s"]["mean"]
        ratio = best["latency_s"]["mean"] / reference
        lines.append(f"| {_config_label(key)} | {reference:.1f} ({fifo['max_wait_s']:.0f}) | "
                     f"{_ratio(inlaid['latency_s']['mean'], reference)} | {_ratio(exact['latency_s']['mean'], reference)} | "
                     f"{_mark(ratio <= 0.7)} {ratio:.2f}x ({best['policy']}) | {best['max_wait_s']:.0f} |")
    return lines


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def policy_table(runs: list[dict], scale: str, loads: tuple | None = None) -> list[str]:
    lines = [f"| configuration | load | policy | SLO {scale} | TTFT SLO | mean JCT s | p50 / p99 latency s | p99 TTFT s "
             "| mean TPOT s | max wait s | max stall s | service gap | tasks / step | loads / s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (_config_key(r), r["load"])):
        if loads is not None and run["load"] not in loads:
            continue
        lines.append(
            f"| {_config_label(_config_key(run))} | {run['load']:.0%} | {run['policy']} | "
            f"{run['slo_attainment'][scale]:.1%} | {run['ttft_slo_attainment']:.1%} | {run['latency_s']['mean']:.1f} | "
            f"{run['latency_s']['p50']:.1f} / {run['latency_s']['p99']:.1f} | {run['ttft_s']['p99']:.1f} | "
            f"{run['tpot_s']['mean']:.2f} | {run['max_wait_s']:.0f} | {run['max_stall_s']:.0f} | "
            f"{run['fairness_max_service_gap']:.0f} | {run['tasks_per_step']['mean']:.1f} | {run['adapter_loads_per_s']:.2f} |")
    return lines


def _fairness_bound(report: dict) -> float:
    """inlaid+fair's bound in this sweep: as it recorded it, else (sweeps before they did, all
    since the bound became 500 on 2026-12-02) the code's."""
    from inlaid.scheduling.experiment import MAIN_VARIANTS

    recorded = report.get("variant_options", {}).get("inlaid+fair", {}).get("fairness_bound")
    if recorded is not None:
        return recorded
    return next(v.options["fairness_bound"] for v in MAIN_VARIANTS if v.label == "inlaid+fair")


def write_sim_markdown(report: dict, path: Path) -> None:
    scale = report["slo_scale"]
    shape = report["engine_shape"]
    load = ", ".join(f"{x:.2f}" for x in report["machine_loadavg_before"])
    lines = [
        "# Scheduling policies in the simulator", "",
        f"The real `Scheduler` and policies, executor replaced by the fitted step-time cost model "
        f"({report['cost_model']}). Engine: {shape['max_num_seqs']} sequences and {shape['max_num_batched_tokens']} "
        f"tokens per step, {shape['num_kv_blocks']} KV blocks of {shape['block_size']}, {shape['max_lora_slots']} adapter "
        f"slots. {report['requests_per_run']} requests per run from the task suite's held-out eval split (real prompt "
        f"and greedy output lengths; each of N tasks draws from one suite task), Gamma arrivals, the first 5% left out "
        f"of latency figures. Load = request rate / FIFO's saturation throughput on the same trace. "
        f"SLO: latency <= {scale} the request's isolated latency (alone on the server); TTFT SLO: first token "
        f"within 5 s. inlaid: its {'GPU ' if report.get('device') == 'cuda' else ''}defaults (" + ", ".join(f"{k} {v}" for k, v in report["inlaid_defaults"].items()
                                                   if not k.startswith("predictor") and k != "prefill_weight")
        + f"), prefill_weight {report['prefill_weight']:.4f} (from the cost model). Sweep wall time "
        f"{report['wall_s']:.0f} s; machine load before: {load}.", "",
        "Saturation throughput (FIFO, requests/s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in report["capacity_rps"].items()), "",
        # (the fair variant read as the least fair of all, its bound and its meter unsaid: a probe)
        f"inlaid+fair: inlaid with `fairness_bound = {_fairness_bound(report):g}` (tokens of VTC's cost: input + 2 x "
        "output). Its bound holds on the policy's own counters; the service gap below is the sweep's meter, "
        "which counts pauses as backlog, and can read higher (docs/scheduling.md, Limits).", "",
    ]
    for headline in (0.8, 0.9):
        if any(r["load"] == headline for r in report["runs"]):
            lines += [f"## The targets at {headline:.0%} of saturation", ""] + criteria_rows(report, headline) + [""]
    for headline in (0.8, 0.9):
        rows = oracle_rows(report, headline)
        if len(rows) > 2:
            lines += [f"## The clairvoyant oracle at {headline:.0%} of saturation", "",
                      "Oracle: exact output lengths, shortest remaining work first, adapter grouping, no aging and no "
                      "first-token rule, the best of fixed β 2 / 4 / 8 / inf and row targets 8 / 16 / 32 (β 8). "
                      "inlaid exact: inlaid's defaults with exact lengths.", ""] + rows + [""]
    ablations = [r for r in report["runs"] if r["policy"] in report["ablations"] or
                 (r["load"] == 0.9 and r["policy"] in ("inlaid", "fifo"))]
    lines += ["## Ablations (90% load)", "", "Without prediction: the per-task mean as the length estimate. Without "
              "grouping: no β bound (only the device slots), no adapter ranking. Without aging: no overdue bound. "
              "Without first-token-first: new requests ranked with the decodes by predicted work.", ""]
    lines += policy_table([r for r in ablations if r["load"] == 0.9], scale)
    if report.get("long_runs"):
        simulated = max(run["simulated_s"] for run in report["long_runs"])
        title = "One simulated hour" if simulated >= 3000 else f"A long run ({simulated / 60:.0f} simulated minutes)"
        lines += ["", f"## {title}, 1,000 tasks", "", "| policy | requests | simulated s | wall s | "
                  "mean JCT s | SLO |", "|---|---|---|---|---|---|"]
        for run in report["long_runs"]:
            lines.append(f"| {run['policy']} | {run['requests']} | {run['simulated_s']:.0f} | {run['wall_s']:.1f} | "
                         f"{run['latency_s']['mean']:.1f} | {run['slo_attainment'][scale]:.1%} |")
    lines += ["", "## Every run", ""] + policy_table([r for r in report["runs"] if r["policy"] not in report["ablations"]],
                                                    scale)
    lines += ["", "Reproduce: `.venv/bin/python bench/sched_sim.py` (also run by `make bench`).", ""]
    path.write_text("\n".join(lines))


def plot_sweep(report: dict, prefix: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["policy"] in report["variants"]]
    configs = sorted({_config_key(r) for r in runs})
    scale = report["slo_scale"]
    for metric, ylabel, name in ((lambda r: r["latency_s"]["mean"], "mean JCT (s)", "jct"),
                                 (lambda r: r["slo_attainment"][scale], f"SLO attainment ({scale} isolated)", "slo")):
        columns = min(4, len(configs))
        rows = math.ceil(len(configs) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
        for axis, key in zip(axes.flat, configs):
            for policy in report["variants"]:
                points = sorted((r["load"], metric(r)) for r in runs if _config_key(r) == key and r["policy"] == policy)
                if points:
                    axis.plot(*zip(*points), marker="o", label=policy, color=POLICY_COLORS.get(policy))
            axis.set_title(_config_label(key), fontsize=9)
            axis.set_xlabel("load (x FIFO saturation)")
            axis.set_ylabel(ylabel)
            if name == "jct":
                axis.set_yscale("log")
        for axis in list(axes.flat)[len(configs):]:
            axis.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{prefix}_{name}.png", dpi=110)
        plt.close(fig)


_RANKED_METRICS = (("mean JCT", lambda r: r["latency_s"]["mean"]), ("p99 TTFT", lambda r: r["ttft_s"]["p99"]),
                   ("SLO 10x", lambda r: r["slo_attainment"]["10x"]))


def _rank_agreement(runs: dict, labels: list[str], sim_key: str, metrics: tuple) -> list[tuple[str, float | None]]:
    """Per metric, Spearman between the real runs and the simulations under `sim_key`
    across the policies; None where one side gives every policy the same value."""
    from scipy.stats import spearmanr

    agreement = []
    for name, pick in metrics:
        real_values = [pick(runs[x]["real"]) for x in labels]
        sim_values = [pick(runs[x][sim_key]) for x in labels]
        if len(set(real_values)) < 2 or len(set(sim_values)) < 2:
            agreement.append((name, None))
        else:
            agreement.append((name, float(spearmanr(real_values, sim_values).statistic)))
    return agreement


def write_real_markdown(report: dict, path: Path) -> None:
    runs = report["runs"]
    labels = list(runs)
    trace = report["trace"]
    load = ", ".join(f"{x:.2f}" for x in report["machine_loadavg_before"])
    lines = [
        "# Scheduling policies on the real server vs the simulator", "",
        f"`inlaid serve`, default model {report.get('base', 'fp32')}, executor threads {report['threads']}, the nine "
        "suite adapters. Trace: "
        f"{trace['requests']} requests over {trace['duration_s']:.0f} s (measured rate {trace['rate']:.2f}/s, CV "
        f"{trace['cv']:.1f}), {report['load']:.0%} of the simulated FIFO saturation ({report['simulated_capacity_rps']:.2f} "
        f"requests/s). Open-loop replay through the SDK, streaming; one fresh server per policy. Cost model: "
        f"{report['cost_model']}. Output lengths drawn from `{report.get('suite_lengths', 'suite_lengths.jsonl')}`. "
        f"Machine load before: {load}; total wall time {report['wall_s'] / 60:.0f} min.", "",
        "| policy | mean JCT s real / sim | p99 latency s real / sim | p99 TTFT s real / sim | SLO 10x real / sim | "
        "throughput req/s real / sim | max wait s real / sim | outputs as recorded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        real, sim = runs[label]["real"], runs[label]["sim"]
        lines.append(
            f"| {label} | {real['latency_s']['mean']:.1f} / {sim['latency_s']['mean']:.1f} | "
            f"{real['latency_s']['p99']:.1f} / {sim['latency_s']['p99']:.1f} | {real['ttft_s']['p99']:.1f} / "
            f"{sim['ttft_s']['p99']:.1f} | {real['slo_attainment']['10x']:.0%} / {sim['slo_attainment']['10x']:.0%} | "
            f"{real['throughput_rps']:.2f} / {sim['throughput_rps']:.2f} | {real['max_wait_s']:.0f} / "
            f"{sim['max_wait_s']:.0f} | {runs[label]['outputs_as_recorded']:.0%} |")
    if len(labels) >= 3:
        lines += ["", "Does the simulator's ranking hold? Spearman correlation between real and simulated values across "
                  "the policies:", "", "| metric | Spearman |", "|---|---|"]
        for name, value in _rank_agreement(runs, labels, "sim", _RANKED_METRICS):
            lines.append(f"| {name} | undefined (one side gives every policy the same value) |" if value is None
                         else f"| {name} | {value:.2f} |")
    if all("sim_own_calibration" in runs[x] for x in labels):
        lines += ["", "The same simulations at each run's own machine speed (the model scaled by that run's real "
                  "steps, not by the burst before the runs):", "",
                  "| policy | factor | mean JCT s real / sim | p99 TTFT s real / sim | steps real / sim |",
                  "|---|---|---|---|---|"]
        for label in labels:
            real, own = runs[label]["real"], runs[label]["sim_own_calibration"]
            lines.append(f"| {label} | {runs[label]['own_calibration_factor']:.2f} | {real['latency_s']['mean']:.1f} / "
                         f"{own['latency_s']['mean']:.1f} | {real['ttft_s']['p99']:.1f} / {own['ttft_s']['p99']:.1f} | "
                         f"{runs[label]['cost_model_on_real_steps']['steps']} / {own['steps']} |")
        if len(labels) >= 3:
            lines += [f"\nSpearman real vs these simulations, {name}: {value:.2f}"
                      for name, value in _rank_agreement(runs, labels, "sim_own_calibration", _RANKED_METRICS[:2])
                      if value is not None]
    calibration = report["calibration"]
    lines += ["", f"The cost model against the real executor's step times (each server's step log). The model fits "
              f"the executor's CPU time; on this machine a FIFO burst of {calibration['requests']} requests measured "
              f"wall-clock steps {calibration['slowdown']:.2f}x longer (the machine's load), and the simulation of "
              f"the comparison ran with the model scaled by that factor. Raw: the fitted model; calibrated: scaled.", "",
              "| policy | steps | mean step s | raw: mean abs rel error | raw: total bias | calibrated: mean abs rel "
              "error | calibrated: median | calibrated: total bias | plan-to-result overhead s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        e, c = runs[label]["cost_model_on_real_steps"], runs[label]["calibrated_cost_model_on_real_steps"]
        lines.append(f"| {label} | {e['steps']} | {e['mean_step_s']:.3f} | {e['mean_abs_rel_error']:.1%} | "
                     f"{e['total_bias']:+.1%} | {c['mean_abs_rel_error']:.1%} | {c['median_abs_rel_error']:.1%} | "
                     f"{c['total_bias']:+.1%} | {e['mean_round_trip_overhead_s']:.4f} |")
    if report.get("tuned_options") is not None:
        lines += ["", f"`inlaid-tuned`: `inlaid` with the options start-up tuning chose on "
                  f"`{report.get('cost_model_file', 'the cost model')}` (inlaid/scheduling/autotune.py): "
                  f"`{report['tuned_options']}`."]
    tag = report.get("cost_model_file", "sched_cost_model.json")[len("sched_cost_model"):-len(".json")].lstrip("_")
    command = report.get("command", f"--tag {tag}" if tag else "")  # older reports did not record their arguments
    lines += ["", f"Reproduce: `{' '.join(['.venv/bin/python bench/sched_real.py', command]).strip()}` (one command, "
              "5-40 min; `--requests`, `--load`, `--threads`, `--policies`).", ""]
    path.write_text("\n".join(lines))


def plot_real(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(report["runs"])
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, (title, pick) in zip(axes, (("mean JCT (s)", lambda r: r["latency_s"]["mean"]),
                                          ("p99 TTFT (s)", lambda r: r["ttft_s"]["p99"]))):
        axis.bar(x - 0.2, [pick(report["runs"][l]["real"]) for l in labels], 0.4, label="real server")
        axis.bar(x + 0.2, [pick(report["runs"][l]["sim"]) for l in labels], 0.4, label="simulator")
        axis.set_xticks(x, labels, rotation=20)
        axis.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # a library of sched_sim.py and sched_real.py: run as a script, it said nothing
    import sys

    sys.exit("sched_report.py is a library of tables and plots: run bench/sched_sim.py --render or "
             "bench/sched_real.py --render to rewrite a report")
