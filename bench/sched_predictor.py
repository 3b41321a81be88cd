"""The output-length predictor on held-out task-suite requests, against the per-task mean.

Train on the suite's calib split, score on the eval split (real prompts through the chat
template; targets: the greedy output length of each task's adapter, and the reference
answer's length). Also: a task never seen in training (leave one task out), online
learning from a cold start (each eval request predicted, then learned), the prediction
latency. Writes sched_predictor.{json,md,png} under --out-dir (default bench/results).

    .venv/bin/python bench/sched_predictor.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    # argv was ignored: `--help` ran the whole benchmark and rewrote the committed results
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    out_dir = parser.parse_args(argv).out_dir
    import sched_sim  # beside this file (bench/ is no package)

    sched_sim.check_out_dir(parser, out_dir)  # (mkdir's traceback, found at once: a probe)
    out_dir.mkdir(parents=True, exist_ok=True)
    from inlaid.predictor import LengthPredictor, LengthSample, OnlineLengthPredictor, TaskMeanPredictor, evaluate_predictions
    from inlaid.scheduling.suite import load_suite_lengths, suite_prompts

    load_before = os.getloadavg()
    records = load_suite_lengths()
    prompts = suite_prompts()
    report: dict = {"machine_loadavg": load_before, "targets": {}}
    for target in ("output_tokens", "reference_tokens"):
        split = {s: [LengthSample(r.task, prompts[r.record_id], getattr(r, target)) for r in records if r.split == s]
                 for s in ("calib", "eval")}
        model = LengthPredictor().fit(split["calib"])
        baseline = TaskMeanPredictor().fit(split["calib"])
        test = split["eval"]
        report["targets"][target] = evaluate_predictions(
            [s.task for s in test], [s.output_tokens for s in test],
            {"predictor": [model.predict(s.task, s.prompt_token_ids) for s in test],
             "task_mean": [baseline.predict(s.task) for s in test]})
    samples = {s: [LengthSample(r.task, prompts[r.record_id], r.output_tokens) for r in records if r.split == s]
               for s in ("calib", "eval")}
    report["unseen_task"] = _leave_one_task_out(samples, LengthPredictor, TaskMeanPredictor, evaluate_predictions)
    report["online"] = _online_curve(samples["eval"], OnlineLengthPredictor, TaskMeanPredictor)
    model = LengthPredictor().fit(samples["calib"])
    timings = []
    for sample in samples["eval"] * 2:
        started = time.perf_counter()
        model.predict(sample.task, sample.prompt_token_ids)
        timings.append(time.perf_counter() - started)
    timings.sort()
    report["predict_us"] = {"p50": timings[len(timings) // 2] * 1e6, "p99": timings[int(0.99 * len(timings))] * 1e6,
                            "prompt_tokens_mean": statistics.mean(len(s.prompt_token_ids) for s in samples["eval"])}
    (out_dir / "sched_predictor.json").write_text(json.dumps(report, indent=1) + "\n")
    _markdown(report, out_dir)
    _plot(report, out_dir)
    print(json.dumps(report["targets"]["output_tokens"]["all"], indent=1))
    return report


def _leave_one_task_out(samples, predictor_cls, baseline_cls, evaluate) -> dict:
    """Per task: trained on the other tasks' calib requests only, scored on its eval requests."""
    result = {}
    for task in sorted({s.task for s in samples["calib"]}):
        train = [s for s in samples["calib"] if s.task != task]
        test = [s for s in samples["eval"] if s.task == task]
        model, baseline = predictor_cls().fit(train), baseline_cls().fit(train)
        scores = evaluate([s.task for s in test], [s.output_tokens for s in test], {
            "predictor": [model.predict(s.task, s.prompt_token_ids) for s in test],
            "task_mean": [baseline.predict(s.task) for s in test]})
        result[task] = {name: scores["all"][name]["mae"] for name in ("predictor", "task_mean")}
    return result


def _online_curve(stream, online_cls, baseline_cls, window: int = 100) -> dict:
    """Cold start: each request is predicted, then learned (online steps, refits every 64)."""
    order = list(stream)
    random.Random(0).shuffle(order)
    online, baseline = online_cls(background=False, refit_every=64), baseline_cls()
    errors: dict[str, list[float]] = {"predictor": [], "task_mean": []}
    for sample in order:
        errors["predictor"].append(abs(online.predict(sample.task, sample.prompt_token_ids) - sample.output_tokens))
        errors["task_mean"].append(abs(baseline.predict(sample.task) - sample.output_tokens))
        online.observe(sample.task, sample.prompt_token_ids, sample.output_tokens)
        baseline.observe(sample.task, sample.prompt_token_ids, sample.output_tokens)
    return {name: [statistics.mean(values[i:i + window]) for i in range(0, len(values), window)]
            for name, values in errors.items()} | {"window": window}


def _markdown(report: dict, out_dir: Path) -> None:
    primary = report["targets"]["output_tokens"]
    reference = report["targets"]["reference_tokens"]
    lines = ["# Output-length predictor vs the per-task mean (held-out task-suite requests)", "",
             "Trained on the suite's calib split (128 requests per task), scored on the eval split (128 per task, "
             "100 for table-to-text). Target: the greedy output length of each task's adapter on the default model "
             "(end-of-turn token included). MAE in tokens; bucket = power-of-two length bucket; Kendall's tau and "
             "Spearman within each task (the per-task mean predicts one value per task: 0 there).", "",
             "| task | requests | MAE predictor | MAE task mean | bucket acc. predictor | bucket acc. task mean | "
             "Kendall tau | Spearman |", "|---|---|---|---|---|---|---|---|"]
    for task, scores in primary.items():
        p, m = scores["predictor"], scores["task_mean"]
        name = "**all (pooled)**" if task == "all" else task
        tau = f"{p['kendall_tau']:.2f}" + (f" (mean {m['kendall_tau']:.2f})" if task == "all" else "")
        rho = f"{p['spearman']:.2f}" + (f" (mean {m['spearman']:.2f})" if task == "all" else "")
        lines.append(f"| {name} | {p['requests']} | {p['mae']:.2f} | {m['mae']:.2f} | {p['bucket_accuracy']:.0%} | "
                     f"{m['bucket_accuracy']:.0%} | {tau} | {rho} |")
    all_ref = reference["all"]
    lines += ["", f"Reference-answer lengths as the target instead (pooled): MAE {all_ref['predictor']['mae']:.2f} vs "
              f"{all_ref['task_mean']['mae']:.2f}, Kendall tau {all_ref['predictor']['kendall_tau']:.2f} vs "
              f"{all_ref['task_mean']['kendall_tau']:.2f}.", "",
              "A task never seen in training (trained on the other eight; the per-task mean falls back to the mean "
              "of all tasks), MAE in tokens:", "", "| task | predictor | task mean (overall mean) |", "|---|---|---|"]
    for task, scores in report["unseen_task"].items():
        lines.append(f"| {task} | {scores['predictor']:.2f} | {scores['task_mean']:.2f} |")
    online = report["online"]
    lines += ["", f"Online from a cold start (eval requests in random order, each predicted then learned), MAE per "
              f"{online['window']} requests: predictor " + ", ".join(f"{x:.1f}" for x in online["predictor"]) +
              "; per-task mean " + ", ".join(f"{x:.1f}" for x in online["task_mean"]) + ".", "",
              f"Prediction time (features + dot product, prompts of {report['predict_us']['prompt_tokens_mean']:.0f} "
              f"tokens on average): p50 {report['predict_us']['p50']:.0f} us, p99 {report['predict_us']['p99']:.0f} us "
              f"(machine load {report['machine_loadavg'][0]:.1f}).", "",
              "Reproduce: `.venv/bin/python bench/sched_predictor.py` (also run by `make bench`).", ""]
    (out_dir / "sched_predictor.md").write_text("\n".join(lines))


def _plot(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scores = report["targets"]["output_tokens"]
    tasks = [t for t in scores if t != "all"]
    x = np.arange(len(tasks))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].bar(x - 0.2, [scores[t]["predictor"]["mae"] for t in tasks], 0.4, label="predictor")
    axes[0].bar(x + 0.2, [scores[t]["task_mean"]["mae"] for t in tasks], 0.4, label="per-task mean")
    axes[0].set_xticks(x, tasks, rotation=30, fontsize=8)
    axes[0].set_ylabel("MAE (tokens)")
    axes[0].set_title("Held-out MAE per task")
    axes[0].legend()
    online = report["online"]
    for name in ("predictor", "task_mean"):
        axes[1].plot(np.arange(len(online[name])) * online["window"], online[name], marker="o", label=name)
    axes[1].set_xlabel("requests seen")
    axes[1].set_ylabel(f"MAE over the next {online['window']}")
    axes[1].set_title("Online learning from a cold start")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sched_predictor.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
