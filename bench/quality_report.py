"""Tables and plots of bench/quality.py's report: answer NLL (per task, its increase over the
unquantized base with paired bootstrap 95 % intervals, the worst task per method and which
method's worst task is significantly lower), task metrics with intervals, and the per-linear
reconstruction errors. No main(): `make bench` skips it; bench/quality.py calls save_report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

METHOD_LABELS = {
    "unquantized": "unquantized", "mlgptq": "MLGPTQ", "minimax": "minimax (unbounded)",
    "gptq-mixed": "GPTQ-tweaked", "gptq-mean-lora": "mean-LoRA", "rtn": "RTN", "per-task": "per-task GPTQ",
    "max": "elementwise max",
}
SHAREABLE = ("mlgptq", "minimax", "gptq-mixed", "gptq-mean-lora", "rtn", "max")  # one base for every task
RESAMPLES = 1000


def _shareable(method: str) -> bool:
    return method in SHAREABLE or method.startswith("mlgptq[")


def _draws(task: str, count: int) -> np.ndarray:
    """The same example draws for every method of a task (paired comparisons)."""
    seed = int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).integers(0, count, size=(RESAMPLES, count))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def nll_analysis(block: dict, tasks: list[str], methods: list[str]) -> dict:
    """Per method: per task NLL and Δ vs unquantized with paired intervals; the worst task's
    Δ with its interval; for shareable methods, MLGPTQ's worst Δ minus theirs, paired."""
    nll = block.get("nll", {})
    base = nll.get("unquantized", {})
    tasks = [t for t in tasks if t in base]
    draws = {t: _draws(t, len(base[t])) for t in tasks}

    def per_token(rows: np.ndarray, draw: np.ndarray | None = None) -> np.ndarray | float:
        if draw is None:
            return float(rows[:, 0].sum() / rows[:, 1].sum())
        picked = rows[draw]
        return picked[..., 0].sum(axis=1) / picked[..., 1].sum(axis=1)

    analysis: dict = {"tasks": tasks, "unquantized": {t: per_token(np.array(base[t])) for t in tasks}, "methods": {}}
    boot_deltas: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        held = nll.get(method, {})
        if method == "unquantized" or not held:
            continue
        entry: dict = {"tasks": {}}
        boot_deltas[method] = {}
        for task in tasks:
            if task not in held:
                continue
            rows, base_rows = np.array(held[task]), np.array(base[task])
            delta = per_token(rows) - per_token(base_rows)
            samples = per_token(rows, draws[task]) - per_token(base_rows, draws[task])
            boot_deltas[method][task] = samples
            low, high = _percentiles(samples)
            entry["tasks"][task] = {"nll": per_token(rows), "delta": delta, "low": low, "high": high,
                                    "significant": low > 0 or high < 0}
        if set(entry["tasks"]) == set(tasks):
            deltas = {t: entry["tasks"][t]["delta"] for t in tasks}
            worst_task = max(deltas, key=deltas.get)
            worst_samples = np.max(np.stack([boot_deltas[method][t] for t in tasks]), axis=0)
            low, high = _percentiles(worst_samples)
            entry["worst"] = {"task": worst_task, "delta": deltas[worst_task], "low": low, "high": high}
            entry["mean_delta"] = float(np.mean(list(deltas.values())))
            boot_deltas[method]["__worst__"] = worst_samples
        analysis["methods"][method] = entry
    reference = boot_deltas.get("mlgptq", {}).get("__worst__")
    for method, entry in analysis["methods"].items():
        if _shareable(method) and method != "mlgptq" and reference is not None and "worst" in entry:
            samples = reference - boot_deltas[method]["__worst__"]
            low, high = _percentiles(samples)
            value = analysis["methods"]["mlgptq"]["worst"]["delta"] - entry["worst"]["delta"]
            entry["mlgptq_minus_this_worst"] = {"value": value, "low": low, "high": high,
                                                "significant": low > 0 or high < 0}
    return analysis


def generation_analysis(block: dict, tasks: list[str], methods: list[str]) -> dict:
    """Per method and task: the score with its 95 % interval and, paired, its difference to
    the unquantized score (significant when that interval excludes 0)."""
    from inlaid.quant.bootstrap import bleu_statistic, mean_statistic

    statistics = {"bleu": bleu_statistic, "mean": mean_statistic}
    generation = block.get("generation", {})
    base = generation.get("unquantized", {})
    analysis: dict = {}
    for method in ["unquantized", *methods]:
        for task, entry in generation.get(method, {}).items():
            rows = np.array(entry["rows"])
            statistic = statistics[entry["statistic"]]
            draws = _draws(task, len(rows))
            samples = np.array([statistic(rows[d]) for d in draws])
            result = {"score": entry["score"], "interval": _percentiles(samples)}
            if method != "unquantized" and task in base:
                base_rows = np.array(base[task]["rows"])
                differences = samples - np.array([statistic(base_rows[d]) for d in draws])
                low, high = _percentiles(differences)
                result["difference"] = {"value": entry["score"] - base[task]["score"], "low": low, "high": high,
                                        "significant": low > 0 or high < 0}
            analysis.setdefault(method, {})[task] = result
    return analysis


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}"


def _nll_markdown(label: str, analysis: dict, methods: list[str], counts: dict[str, int]) -> list[str]:
    shown = [m for m in methods if m in analysis["methods"]]
    if not shown:
        return []
    lines = [f"### Answer NLL, {label}: nats per answer token, every eval example, the task's adapter on", "",
             "Cells: increase over unquantized [paired bootstrap 95 % interval]; **bold** = significant "
             "(the interval excludes 0).", "",
             "| task | n | unquantized | " + " | ".join(METHOD_LABELS.get(m, m) for m in shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for task in analysis["tasks"]:
        cells = []
        for method in shown:
            cell = analysis["methods"][method]["tasks"].get(task)
            if cell is None:
                cells.append("–")
                continue
            text = f"{_signed(cell['delta'])} [{_signed(cell['low'])}, {_signed(cell['high'])}]"
            cells.append(f"**{text}**" if cell["significant"] else text)
        lines.append(f"| {task} | {counts.get(task, '')} | {analysis['unquantized'][task]:.3f} | " + " | ".join(cells) + " |")
    worst_cells, mean_cells, versus_cells = [], [], []
    for method in shown:
        entry = analysis["methods"][method]
        worst = entry.get("worst")
        worst_cells.append(f"{_signed(worst['delta'])} [{_signed(worst['low'])}, {_signed(worst['high'])}] "
                           f"({worst['task']})" if worst else "–")
        mean_cells.append(_signed(entry["mean_delta"]) if "mean_delta" in entry else "–")
        versus = entry.get("mlgptq_minus_this_worst")
        if versus:
            text = f"{_signed(versus['value'])} [{_signed(versus['low'])}, {_signed(versus['high'])}]"
            versus_cells.append(f"**{text}**" if versus["significant"] else text)
        else:
            versus_cells.append("–")
    lines += ["| **worst task** | | | " + " | ".join(worst_cells) + " |",
              "| mean over tasks | | | " + " | ".join(mean_cells) + " |",
              "| MLGPTQ's worst minus this worst | | | " + " | ".join(versus_cells) + " |", ""]
    return lines


def _generation_markdown(label: str, analysis: dict, methods: list[str], tasks: list[str], limit) -> list[str]:
    shown = [m for m in ["unquantized", *methods] if m in analysis]
    if not shown:
        return []
    lines = [f"### Task metrics, {label}: greedy generation, first {limit or 'all'} eval examples per task", "",
             "Cells: score [bootstrap 95 % interval]; **bold** = differs significantly from unquantized (paired).", "",
             "| task | " + " | ".join(METHOD_LABELS.get(m, m) for m in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for task in tasks:
        cells = []
        for method in shown:
            cell = analysis[method].get(task)
            if cell is None:
                cells.append("–")
                continue
            text = f"{cell['score']:.1f} [{cell['interval'][0]:.1f}, {cell['interval'][1]:.1f}]"
            cells.append(f"**{text}**" if cell.get("difference", {}).get("significant") else text)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    kept = []
    for method in shown[1:]:
        shares = {t: analysis[method][t]["score"] / analysis["unquantized"][t]["score"]
                  for t in tasks if t in analysis[method] and analysis["unquantized"].get(t, {}).get("score")}
        worst = min(shares, key=shares.get) if shares else None
        kept.append(f"{100 * shares[worst]:.0f} % ({worst})" if worst else "–")
    lines += ["| **worst task kept** | – | " + " | ".join(kept) + " |", ""]
    return lines


def _errors_markdown(label: str, errors: dict, methods: list[str], tasks: list[str]) -> list[str]:
    shown = [m for m in methods if m in errors]
    if not shown:
        return []
    lines = [f"### Reconstruction error, {label}: mean over all linears of ‖(W−Q)X_t‖²/‖WX_t‖² (×1e-3)", "",
             "| task | " + " | ".join(METHOD_LABELS.get(m, m) for m in shown) + " |", "|---|" + "---|" * len(shown)]
    for task in tasks:
        cells = []
        for m in shown:
            value = errors[m]["per_task"].get(task) if m != "per-task" else errors[m].get(task, {}).get("per_task", {}).get(task)
            cells.append(f"{1e3 * value:.2f}" if value is not None else "–")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    worst = [f"{1e3 * errors[m]['worst_task_per_linear']:.2f}" if m != "per-task" else "–" for m in shown]
    return lines + ["| **worst task, per linear** | " + " | ".join(worst) + " |", ""]


def markdown(report: dict) -> str:
    tasks = report.get("scored_tasks", report["tasks"])
    lines = [f"Tasks: {', '.join(report['tasks'])}; scored: {', '.join(tasks)}. Calibration: "
             f"{report['calib_samples']} samples/task. Answer NLL: {report.get('nll_limit') or 'every'} eval example(s) "
             f"per task; generation: the first {report.get('limit') or 'all'}. {report.get('machine', '')}; "
             f"load average at the end {report.get('load_average', '?')}. Bootstrap: {RESAMPLES} resamples of each "
             "task's examples, the same draws for every method.", ""]
    for name, options in report.get("variants", {}).items():
        lines += [f"{name}: mlgptq with " + ", ".join(f"{k}={v}" for k, v in options.items()) + ".", ""]
    for label, block in report["configs"].items():
        counts = {t: len(rows) for t, rows in block.get("nll", {}).get("unquantized", {}).items()}
        lines += _nll_markdown(label, nll_analysis(block, tasks, report["methods"]), report["methods"], counts)
        lines += _generation_markdown(label, generation_analysis(block, tasks, report["methods"]), report["methods"],
                                      tasks, report.get("limit"))
        if block.get("served"):
            lines += ["Generation served as: " + "; ".join(f"{m}: {s}" for m, s in block["served"].items()), ""]
        lines += _errors_markdown(label, block.get("errors", {}), report["methods"], tasks)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Per config: each method's answer-NLL increase per task with its interval (left), and
    the worst task's reconstruction error per decoder layer (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(report["configs"].items())
    tasks = report.get("scored_tasks", report["tasks"])
    figure, axes = plt.subplots(len(configs), 2, figsize=(15, 4.4 * len(configs)), squeeze=False)
    for row, (label, block) in enumerate(configs):
        analysis = nll_analysis(block, tasks, report["methods"])
        methods = [m for m in report["methods"] if m in analysis["methods"]]
        width = 0.8 / max(len(methods), 1)
        ax = axes[row][0]
        for index, method in enumerate(methods):
            cells = [analysis["methods"][method]["tasks"].get(t) for t in analysis["tasks"]]
            x = [i + index * width for i in range(len(analysis["tasks"]))]
            values = [c["delta"] if c else np.nan for c in cells]
            errors = [[c["delta"] - c["low"] if c else 0 for c in cells], [c["high"] - c["delta"] if c else 0 for c in cells]]
            ax.bar(x, values, width, yerr=errors, capsize=1.5, label=METHOD_LABELS.get(method, method))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(analysis["tasks"]))], analysis["tasks"], rotation=30, ha="right")
        ax.set_ylabel("answer NLL increase (nats/token)")
        ax.set_title(f"{label}: answer NLL increase over unquantized (95 % CI)")
        ax.legend(fontsize=7, ncol=3)
        ax = axes[row][1]
        errors = block.get("errors", {})
        for method in [m for m in report["methods"] if m in errors and m != "per-task"]:
            per_layer = errors[method]["per_layer"]
            layers = sorted(per_layer, key=int)
            ax.plot([int(layer) for layer in layers], [1e3 * max(per_layer[layer].values()) for layer in layers],
                    marker=".", label=METHOD_LABELS.get(method, method))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("worst task's ‖(W−Q)X‖²/‖WX‖² (×1e-3)")
        ax.set_title(f"{label}: worst-task reconstruction error per layer")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def save_report(report: dict, out: Path, markdown_path: Path) -> str:
    """Write the JSON, the Markdown tables and the plot as they stand; returns the Markdown."""
    from inlaid.tasks.base import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1))  # a kill mid-write leaves the last whole report
    text = markdown(report)
    write_text_atomic(markdown_path, text)
    if report["configs"]:
        plot(report, markdown_path.with_suffix(".png"))
    return text
