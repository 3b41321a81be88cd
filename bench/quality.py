"""`make eval`: quality of the quantized shared base, every task x every method (like Table 2
of the LoRA-Inlaid paper), plus each task's per-layer reconstruction error.

    python bench/quality.py                        # all tasks with adapters, 4-bit and 3-bit g128
    python bench/quality.py --limit 32 --calib-samples 32 --tasks math sentiment
    python bench/quality.py --errors-only          # quantize + reconstruction errors, no generation
    python bench/quality.py --aggregation-study --study-bits 3 4   # per-layer aggregation study

Methods: unquantized | mlgptq | minimax | gptq-mixed (the paper's "GPTQ-tweaked": mixed calibration,
adapters off) | gptq-mean-lora | rtn | per-task GPTQ (gptq-task:<t>, one model per task,
scored on its own task only). Quantized checkpoints are cached under --work-dir and resumed.

Generation goes through Inlaid's engine when present (else transformers+PEFT); the output
says which. When the kernels accept the checkpoint's group layout the engine serves the GPTQ
checkpoint itself; otherwise the dequantized weights are served in float (same numbers,
no low-bit kernel), and the output says that too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ("mlgptq", "gptq-mixed", "gptq-mean-lora", "rtn", "per-task")
METHOD_LABELS = {
    "unquantized": "unquantized", "mlgptq": "MLGPTQ", "gptq-mixed": "GPTQ-tweaked (mixed, base fwd)",
    "gptq-mean-lora": "GPTQ mean-LoRA", "rtn": "RTN", "per-task": "per-task GPTQ", "max": "elementwise max",
    "minimax": "unbounded minimax (error-norm start)",
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every task with adapters/<task>/")
    parser.add_argument("--adapters-dir", type=Path, default=REPO / "adapters")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--configs", nargs="*", default=["4:128", "3:128"], help="BITS:GROUP_SIZE ...")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="eval examples per task (default: the whole split)")
    parser.add_argument("--backend", default="auto", choices=["auto", "engine", "peft"])
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="engine dense weights (float32 activations); bf16 rounding (~0.4%% per weight) is "
                             "far below 3/4-bit quantization error; ~1.5x faster generation on CPUs with AVX512-BF16, several times slower on AVX2-only CPUs")
    parser.add_argument("--serve", default="kernels", choices=["kernels", "dequantized"],
                        help="generate from the GPTQ checkpoint through the low-bit kernels, or from its dequantized "
                             "weights stored as a float model (same codes; on the CPU a dense matmul is faster "
                             "than the int4 kernel at eval batch sizes)")
    parser.add_argument("--errors-only", action="store_true", help="skip generation; reconstruction errors only")
    parser.add_argument("--aggregation-study", action="store_true",
                        help="only the per-layer study of Hessian aggregations (inlaid.quant.study)")
    parser.add_argument("--study-layers", type=int, nargs="*", default=[0, 10, 20, 29])
    parser.add_argument("--study-bits", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoint cache (default ~/.cache/inlaid/quality)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--score-tasks", nargs="*", default=None,
                        help="generate and score only these tasks (calibration still uses every task)")
    parser.add_argument("--merge", action="store_true",
                        help="extend the report at --out: keep its methods' results, run only the missing ones")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "bench" / "results" / "quality.md")
    return parser.parse_args(argv)


def _tasks(args: argparse.Namespace) -> list[str]:
    from inlaid.tasks import TASK_NAMES

    names = args.tasks or [n for n in TASK_NAMES if (args.adapters_dir / n / "adapter_config.json").is_file()]
    missing = [n for n in names if not (args.adapters_dir / n / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"no adapter for {missing} under {args.adapters_dir}")
    if not names:
        raise SystemExit(f"no adapters under {args.adapters_dir}: train them first (inlaid train-adapter)")
    return names


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _quantize(args, model_dir: Path, tasks: list[str], method: str, bits: int, group: int,
              error_tasks: list[str] | None = None):
    """Quantize (or reuse the cached checkpoint); returns its directory."""
    from inlaid.quant.calibration import CalibrationTask
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.methods import MlgptqOptions, parse_method
    from inlaid.quant.spec import QuantSpec
    from inlaid.tasks import get_task

    calibration = [CalibrationTask(t, args.adapters_dir / t, get_task(t).split_path("calib")) for t in tasks]
    # The key covers the adapters' and calibration files' contents: a retrained adapter never
    # reuses a checkpoint calibrated with its predecessor.
    contents = [_file_digest(args.adapters_dir / t / "adapter_model.safetensors") + _file_digest(c.calib_path)
                for t, c in zip(tasks, calibration)]
    keyed: list = [tasks, contents, args.calib_samples, args.max_tokens]
    if parse_method(method).kind in ("mlgptq", "minimax"):  # their search options changed over time
        keyed.append(dataclasses.asdict(MlgptqOptions()))
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:8]
    out_dir = args.work_dir / f"{bits}b-g{group}" / f"{method.replace(':', '_')}-{key}"
    if (out_dir / "inlaid_quant.json").is_file():
        return out_dir
    config = DriverConfig(
        model_dir=model_dir, tasks=calibration, method=parse_method(method, tasks),
        spec=QuantSpec(bits=bits, group_size=group), out_dir=out_dir, max_samples=args.calib_samples,
        max_tokens=args.max_tokens, save_hessian_state=False, progress=sys.stderr.isatty(), error_tasks=error_tasks,
    )
    report = quantize_model(config)
    print(f"   quantized in {report.seconds:.0f} s, peak RSS {report.peak_rss_mb:.0f} MB", flush=True)
    return out_dir


def _servable_dir(checkpoint_dir: Path, serve: str = "kernels") -> tuple[Path, str]:
    """The directory to generate from: the GPTQ checkpoint if the kernels take it (and `serve`
    is "kernels"), else a float copy of its dequantized weights."""
    from safetensors.torch import save_file

    from inlaid.kernels.dispatch import prepare_quant_linear
    from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint

    checkpoint = load_gptq_checkpoint(checkpoint_dir)
    if serve == "dequantized":
        reason = "on request: --serve dequantized"
    else:
        try:
            import torch

            for weights in checkpoint.linears.values():
                prepare_quant_linear(weights, "cpu", torch.float32, mode="dequant")
            return checkpoint_dir, "gptq checkpoint (low-bit kernels)"
        except Exception as error:  # the kernels reject this layout: serve the same weights in float
            reason = "kernels: " + str(error).split(";")[0]
    float_dir = checkpoint_dir / "dequantized"
    if not (float_dir / "model.safetensors").is_file():
        float_dir.mkdir(exist_ok=True)
        config = dict(checkpoint.config)
        config.pop("quantization_config", None)
        (float_dir / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                     "special_tokens_map.json"):
            if (checkpoint_dir / name).is_file():
                (float_dir / name).write_bytes((checkpoint_dir / name).read_bytes())
        state = {k: v.contiguous() for k, v in dequantized_state_dict(checkpoint).items()}
        save_file(state, str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    return float_dir, f"dequantized float weights ({reason})"


def _evaluate(args, model_dir: Path, tasks: list[str]) -> dict:
    from inlaid.tasks.evaluate import EvalRun, evaluate_runs

    runs = [EvalRun(t, t, args.adapters_dir / t) for t in tasks]
    return evaluate_runs(model_dir, runs, limit=args.limit, backend=args.backend, weight_dtype=args.weight_dtype)


def _score(results: dict, task: str) -> float:
    entry = results["tasks"][task][task]
    return float(entry["scores"][entry["primary_metric"]])


def _error_summary(checkpoint_dir: Path, tasks: list[str]) -> dict:
    """Per task: mean over every linear of ||(W-Q)X_t||²/||WX_t||², and per layer the worst task."""
    meta = json.loads((checkpoint_dir / "inlaid_quant.json").read_text())
    entries = meta["layer_errors"]
    tasks = [t for t in tasks if entries and t in entries[0]["errors"]]
    per_task = {t: sum(e["errors"][t] for e in entries) / len(entries) for t in tasks}
    layers = sorted({e["layer"] for e in entries})
    per_layer = {}
    for layer in layers:
        rows = [e for e in entries if e["layer"] == layer]
        per_layer[layer] = {t: sum(e["errors"][t] for e in rows) / len(rows) for t in tasks}
    worst_per_linear = sum(max(e["errors"].values()) for e in entries) / len(entries)
    return {"per_task": per_task, "per_layer": per_layer, "worst_task_per_linear": worst_per_linear,
            "seconds": meta.get("timing", {}).get("seconds")}


def _markdown(report: dict) -> str:
    tasks = report.get("scored_tasks", report["tasks"])
    lines = [f"Tasks: {', '.join(report['tasks'])}; scored: {', '.join(tasks)}. Calibration: {report['calib_samples']} samples/task. "
             f"Eval: {report['limit'] or 'full'} examples/task. Generation backend: {report.get('backend', '-')}, "
             f"float32 activations, {report.get('weight_dtype', 'auto')} weights (`--weight-dtype`).", ""]
    for config, block in report["configs"].items():
        methods = [m for m in ["unquantized", *report["methods"]] if m in block["scores"]]
        if block["scores"]:
            lines += [f"### Task quality, {config} (primary metric per task; higher is better)", "",
                      "| task | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
                      "|---|" + "---|" * len(methods)]
            for task in tasks:
                cells = [f"{block['scores'][m][task]:.1f}" if task in block["scores"].get(m, {}) else "–"
                         for m in methods]
                lines.append(f"| {task} | " + " | ".join(cells) + " |")
            lines.append("")
            served = {m: s for m, s in block.get("served", {}).items()}
            if served:
                lines += ["Served as: " + "; ".join(f"{m}: {s}" for m, s in served.items()), ""]
        errors = block["errors"]
        if errors:
            methods = [m for m in report["methods"] if m in errors]
            lines += [f"### Reconstruction error, {config}: mean over all linears of ‖(W−Q)X_t‖²/‖WX_t‖² (×1e-3)", "",
                      "| task | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
                      "|---|" + "---|" * len(methods)]
            for task in tasks:
                cells = []
                for m in methods:
                    value = errors[m]["per_task"].get(task) if m != "per-task" else errors[m].get(task, {}).get("per_task", {}).get(task)
                    cells.append(f"{1e3 * value:.2f}" if value is not None else "–")
                lines.append(f"| {task} | " + " | ".join(cells) + " |")
            worst_cells = [f"{1e3 * errors[m]['worst_task_per_linear']:.2f}" if m != "per-task" else "–" for m in methods]
            lines += ["| **worst task, per linear** | " + " | ".join(worst_cells) + " |", ""]
    return "\n".join(lines) + "\n"


def _aggregation_study(args, model_dir: Path, tasks: list[str]) -> int:
    from inlaid.quant.calibration import CalibrationTask
    from inlaid.quant.spec import QuantSpec
    from inlaid.quant.study import VARIANTS, collect_layer_hessians, markdown, run_study
    from inlaid.tasks import get_task

    calibration = [CalibrationTask(t, args.adapters_dir / t, get_task(t).split_path("calib")) for t in tasks]
    started = time.time()
    hessians = collect_layer_hessians(model_dir, calibration, args.study_layers, args.calib_samples, args.max_tokens)
    texts = [f"Tasks: {', '.join(tasks)}; {args.calib_samples} calibration samples per task; "
             f"unquantized forward (collected in {time.time() - started:.0f} s)", ""]
    for bits in args.study_bits:
        spec = QuantSpec(bits=bits, group_size=128)
        texts.append(markdown(run_study(model_dir, hessians, spec, list(VARIANTS)), spec, args.study_layers))
        print(texts[-1], flush=True)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(texts))
    return 0


def _previous_report(args: argparse.Namespace, tasks: list[str]) -> dict | None:
    """The report at --out when --merge asks to extend it; refuses one measured on other terms."""
    if not args.merge or not args.out.is_file():
        return None
    previous = json.loads(args.out.read_text())
    terms = {"tasks": tasks, "calib_samples": args.calib_samples, "limit": args.limit, "weight_dtype": args.weight_dtype,
             "scored_tasks": _scored(args, tasks)}
    # Reports from before --score-tasks scored every task.
    theirs = {k: previous.get(k, tasks if k == "scored_tasks" else None) for k in terms}
    differing = {k: (theirs[k], v) for k, v in terms.items() if theirs[k] != v}
    if differing:
        raise SystemExit(f"--merge: {args.out} was measured with other settings (theirs, ours): {differing}")
    return previous


def _scored(args: argparse.Namespace, tasks: list[str]) -> list[str]:
    scored = args.score_tasks or tasks
    unknown = [t for t in scored if t not in tasks]
    if unknown:
        raise SystemExit(f"--score-tasks {unknown}: not among the calibrated tasks {tasks}")
    return scored


def _complete(block: dict, method: str, tasks: list[str], errors_only: bool) -> bool:
    """Whether `block` already holds `method`'s results for every task."""
    if method not in block.get("errors", {}):
        return False
    if method == "per-task" and set(block["errors"][method]) != set(tasks):
        return False
    return errors_only or set(block.get("scores", {}).get(method, {})) == set(tasks)


def _plot(report: dict, path: Path) -> None:
    """Per config: each method's score as a share of unquantized, per task (left), and the
    worst task's reconstruction error per decoder layer (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(report["configs"].items())
    figure, axes = plt.subplots(len(configs), 2, figsize=(14, 4.2 * len(configs)), squeeze=False)
    tasks = report.get("scored_tasks", report["tasks"])
    for row, (config, block) in enumerate(configs):
        scores, errors = block["scores"], block["errors"]
        methods = [m for m in report["methods"] if m in scores]
        base = scores.get("unquantized", {})
        width = 0.8 / max(len(methods), 1)
        ax = axes[row][0]
        for index, method in enumerate(methods):
            shares = [100 * scores[method].get(t, float("nan")) / base[t] if base.get(t) else float("nan") for t in tasks]
            ax.bar([i + index * width for i in range(len(tasks))], shares, width, label=METHOD_LABELS.get(method, method))
        ax.axhline(100, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
        ax.set_ylabel("% of unquantized score")
        ax.set_title(f"{config}: task quality kept")
        ax.set_ylim(0, max(140, ax.get_ylim()[1] * 1.15))
        ax.legend(fontsize=7, loc="upper center", ncol=3)
        ax = axes[row][1]
        for method in [m for m in report["methods"] if m in errors and m != "per-task"]:
            per_layer = errors[method]["per_layer"]
            layers = sorted(per_layer, key=int)
            ax.plot([int(l) for l in layers], [1e3 * max(per_layer[l].values()) for l in layers],
                    marker=".", label=METHOD_LABELS.get(method, method))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("worst task's ‖(W−Q)X‖²/‖WX‖² (×1e-3)")
        ax.set_title(f"{config}: worst-task reconstruction error per layer")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _save(args: argparse.Namespace, report: dict) -> str:
    """Write the JSON, the Markdown table and the plot as they stand; returns the Markdown."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    text = _markdown(report)
    args.markdown.write_text(text)
    _plot(report, args.markdown.with_suffix(".png"))
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    from inlaid.models.prepare import default_model_dir, cache_root

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir = args.work_dir or cache_root() / "quality"
    model_dir = default_model_dir()
    tasks = _tasks(args)
    if args.aggregation_study:
        return _aggregation_study(args, model_dir, tasks)
    scored = _scored(args, tasks)
    report: dict = {"tasks": tasks, "scored_tasks": scored, "methods": args.methods, "calib_samples": args.calib_samples,
                    "limit": args.limit, "weight_dtype": args.weight_dtype, "configs": {},
                    "machine": f"{torch.get_num_threads()} torch threads, CPU"}
    previous = _previous_report(args, tasks)
    if previous:
        report["methods"] = [*previous["methods"], *[m for m in args.methods if m not in previous["methods"]]]
        report["configs"] = previous["configs"]
        report["backend"] = previous.get("backend")
    started = time.time()
    unquantized = None
    have_unquantized = all(
        "unquantized" in report["configs"].get(f"{b}-bit g{g}", {}).get("scores", {})
        for b, g in ((int(x) for x in c.split(":")) for c in args.configs))
    if not args.errors_only and not have_unquantized:
        adapter_digests = [_file_digest(args.adapters_dir / t / "adapter_model.safetensors") for t in scored]
        digest = hashlib.sha256(json.dumps([scored, adapter_digests, args.limit, args.weight_dtype]).encode()).hexdigest()[:8]
        cached = args.work_dir / f"unquantized-{digest}.json"
        if cached.is_file():
            unquantized = json.loads(cached.read_text())
        else:
            print("evaluating the unquantized base + adapters", flush=True)
            unquantized = _evaluate(args, model_dir, scored)
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(unquantized))
        report["backend"] = unquantized["backend"]
    for config in args.configs:
        bits, group = (int(part) for part in config.split(":"))
        label = f"{bits}-bit g{group}"
        block: dict = report["configs"].setdefault(label, {"scores": {}, "errors": {}, "served": {}})
        # saved after every method: a long run killed midway keeps its results
        if unquantized is not None:
            block["scores"]["unquantized"] = {t: _score(unquantized, t) for t in scored}
        for method in args.methods:
            if previous and _complete(block, method, scored, args.errors_only):
                print(f"== {label} {method}: kept from {args.out}", flush=True)
                continue
            print(f"== {label} {method}", flush=True)
            if method == "per-task":
                block["errors"][method] = {}
                block["scores"][method] = {}
                for task in scored:
                    checkpoint = _quantize(args, model_dir, tasks, f"gptq-task:{task}", bits, group, error_tasks=[task])
                    block["errors"][method][task] = _error_summary(checkpoint, tasks)
                    if not args.errors_only:
                        serve_dir, served = _servable_dir(checkpoint, args.serve)
                        block["served"][method] = served
                        block["scores"][method][task] = _score(_evaluate(args, serve_dir, [task]), task)
                    _save(args, report)
                continue
            checkpoint = _quantize(args, model_dir, tasks, method, bits, group)
            block["errors"][method] = _error_summary(checkpoint, tasks)
            if not args.errors_only:
                serve_dir, served = _servable_dir(checkpoint, args.serve)
                block["served"][method] = served
                results = _evaluate(args, serve_dir, scored)
                block["scores"][method] = {t: _score(results, t) for t in scored}
            _save(args, report)
    report["seconds"] = round(time.time() - started, 1)
    text = _save(args, report)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
