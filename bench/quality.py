"""`make eval`: quality of the quantized shared base, every task x every method (like Table 2
of the LoRA-Inlaid paper), measured two ways, with bootstrap 95 % intervals:

- answer NLL: the teacher-forced NLL per token of each task's reference answers, the task's
  adapter on, over ALL its eval examples (inlaid.quant.nll): the low-noise measure;
- the task metrics of greedy generations (BLEU, ROUGE-L, accuracy, exact match) on the
  first --limit eval examples.

    python bench/quality.py                                   # 4-bit and 3-bit g128, every method
    python bench/quality.py --configs 4:32 --methods mlgptq rtn --metrics nll
    python bench/quality.py --errors-only                     # quantize + reconstruction errors
    python bench/quality.py --aggregation-study               # per-layer aggregation study

Methods: unquantized | mlgptq | minimax | gptq-mixed (the paper's "GPTQ-tweaked": mixed calibration,
adapters off) | gptq-mean-lora | rtn | per-task GPTQ (gptq-task:<t>, one model per task, scored
on its own task only) | max. Checkpoints are cached under --work-dir (keyed by every input,
the quantizer's code included) and resumed. Tables: bench/quality_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_checkpoints import quantized_checkpoint, servable_dir  # noqa: E402
from quality_inputs import data_inputs, report_terms, unquantized_key  # noqa: E402
from quality_merge import merge_from, missing, previous_report  # noqa: E402
from quality_report import METHOD_LABELS, save_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ("mlgptq", "minimax", "gptq-mixed", "gptq-mean-lora", "rtn", "per-task")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every task with adapters/<task>/")
    parser.add_argument("--adapters-dir", type=Path, default=REPO / "adapters")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS),
                        help=f"{', '.join(list(METHOD_LABELS)[1:])}, or mlgptq[NAME] for a --variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE,...",
                        help="mlgptq with other options (inlaid.quant.methods.MlgptqOptions), reported as mlgptq[NAME]; "
                             "e.g. --variant static=sensitivity:impurity,rounds:1")
    parser.add_argument("--configs", nargs="*", default=["4:128", "3:128"], help="BITS:GROUP_SIZE ...")
    parser.add_argument("--metrics", nargs="*", default=["nll", "generate"], choices=["nll", "generate"],
                        help="answer NLL on every eval example, and/or greedy generation scored by the task metric")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=50, help="eval examples per task for generation (NLL: all)")
    parser.add_argument("--nll-limit", type=int, default=None, help="eval examples per task for NLL (default: all)")
    parser.add_argument("--backend", default="auto", choices=["auto", "engine", "peft"])
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="engine dense weights for generation (float32 activations)")
    parser.add_argument("--serve", default="dequantized", choices=["kernels", "dequantized"],
                        help="generate from the GPTQ checkpoint through the low-bit kernels, or from its dequantized "
                             "weights stored as a float model (the same codes; on the CPU a dense matmul is faster "
                             "than the int4 kernel at eval batch sizes)")
    parser.add_argument("--errors-only", action="store_true", help="quantize and report reconstruction errors only")
    parser.add_argument("--aggregation-study", action="store_true",
                        help="only the per-layer study of Hessian aggregations (inlaid.quant.study)")
    parser.add_argument("--study-layers", type=int, nargs="*", default=[0, 10, 20, 29])
    parser.add_argument("--study-bits", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoint cache (default ~/.cache/inlaid/quality)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--score-tasks", nargs="*", default=None,
                        help="score only these tasks (calibration still uses every task)")
    parser.add_argument("--merge", action="store_true",
                        help="extend the report at --out: keep its finished results, run only the missing ones")
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[],
                        help="reports measured on the same terms (e.g. by concurrent runs): their results join --out's")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "bench" / "results" / "quality.md")
    args = parser.parse_args(argv)
    if problem := _argument_problem(args):  # before any work: --limit -1 meant all but one example
        parser.error(problem)
    return args


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What of the arguments cannot run, or None; checked before anything is quantized."""
    from inlaid.cli_args import writable_file_problem
    from inlaid.quant.cli import group_size_supported
    from inlaid.quant.errors import InvalidQuantSpecError
    from inlaid.quant.spec import SUPPORTED_BITS, QuantSpec

    for option, value in (("--calib-samples", args.calib_samples), ("--max-tokens", args.max_tokens),
                          ("--limit", args.limit), ("--nll-limit", args.nll_limit)):
        if value is not None and value < 1:
            return f"{option} must be a positive integer, got {value}"
    if args.threads is not None and args.threads < 0:
        return f"--threads must be 0 (torch's default) or more, got {args.threads}"
    for config in args.configs:
        bits, _, group = config.partition(":")
        try:  # the quantizer's own rule (bits 2, 3, 4 or 8; group -1 or positive), not hours later
            QuantSpec(bits=int(bits), group_size=int(group))
        except (ValueError, InvalidQuantSpecError) as error:
            return f"--configs takes BITS:GROUP_SIZE (e.g. 4:128, 3:-1), got {config!r}: {error}"
        if not group_size_supported(int(group)):  # `inlaid quantize`'s rule: the kernels' groups
            return f"--configs {config!r}: the group size must be -1 or a power of two >= 32"
    try:  # every variant's options now, not when its method's turn comes after hours of others
        args.variants = _variants(args)
    except ValueError as error:
        return str(error)
    if any(layer < 0 for layer in args.study_layers) or any(bits not in SUPPORTED_BITS for bits in args.study_bits):
        return f"--study-layers must be >= 0 and --study-bits among {SUPPORTED_BITS}"
    if os.path.realpath(args.out.expanduser()) == os.path.realpath(args.markdown.expanduser()):
        # The table was written over the JSON results, and the next --merge run failed to read them.
        return f"--out and --markdown are the same file ({args.out}); give two paths"
    for option, path in (("--out", args.out), ("--markdown", args.markdown)):
        if problem := writable_file_problem(path, option):
            return problem
    return None


def _tasks(args: argparse.Namespace) -> list[str]:
    from inlaid.tasks import TASK_NAMES

    names = args.tasks or [n for n in TASK_NAMES if (args.adapters_dir / n / "adapter_config.json").is_file()]
    missing = [n for n in names if not (args.adapters_dir / n / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"no adapter for {missing} under {args.adapters_dir}")
    if not names:
        raise SystemExit(f"no adapters under {args.adapters_dir}: train them first (inlaid train-adapter)")
    return names


def _variants(args: argparse.Namespace) -> dict[str, dict]:
    """--variant NAME=KEY:VALUE,... -> {"mlgptq[NAME]": {KEY: VALUE}} (values parsed as JSON when
    they are); ValueError naming the variant whose options MlgptqOptions refuses."""
    import msgspec

    from inlaid.quant.methods import MlgptqOptions

    variants: dict[str, dict] = {}
    for text in args.variant:
        name, _, settings = text.partition("=")
        options = {}
        for item in filter(None, settings.split(",")):
            key, _, value = item.partition(":")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        names = [field.name for field in dataclasses.fields(MlgptqOptions)]
        if unknown := sorted(set(options) - set(names)):
            raise ValueError(f"--variant {text!r}: unknown option {', '.join(unknown)}; the options are "
                             f"{', '.join(names)}")
        try:  # each value's type (rounds:abc) and MlgptqOptions' own checks, named
            converted = msgspec.convert(options, MlgptqOptions)
        except msgspec.ValidationError as error:
            raise ValueError(f"--variant {text!r}: {error}") from None
        options = {key: getattr(converted, key) for key in options}  # mean_slack:1 and :1.0: one checkpoint
        variants[f"mlgptq[{name}]"] = options
    for method in args.methods:
        if method not in METHOD_LABELS and method not in variants:
            raise ValueError(f"--methods: unknown method '{method}': {', '.join(list(METHOD_LABELS)[1:])} or a "
                             "--variant name")
    return variants


def _generate(args, model_dir: Path, tasks: list[str]) -> dict[str, dict]:
    """task -> {"score", "statistic", "rows"}: the primary metric on the first --limit eval
    examples and the per-example rows its bootstrap resamples."""
    from inlaid.quant.bootstrap import bleu_rows, bleu_statistic, mean_statistic
    from inlaid.tasks import get_task
    from inlaid.tasks.evaluate import EvalRun, evaluate_runs
    from inlaid.tasks.metrics import first_line

    runs = [EvalRun(t, t, args.adapters_dir / t) for t in tasks]
    results = evaluate_runs(model_dir, runs, limit=args.limit, backend=args.backend, weight_dtype=args.weight_dtype)
    if partial := results.get("partial"):  # Ctrl-C / SIGTERM: scores of some examples are no row of the table
        raise _Interrupted(f"{partial['finished']} of {partial['requests']} generations finished",
                           terminated=partial.get("stopped_by") == "SIGTERM")
    scored: dict[str, dict] = {}
    for name in tasks:
        task = get_task(name)
        entry = results["tasks"][name][name]
        examples = task.load_split("eval")[: args.limit]
        if [p["id"] for p in entry["predictions"]] != [e["id"] for e in examples]:
            raise RuntimeError(f"{name}: the predictions are not one per eval example, in order")
        predictions = [p["text"] for p in entry["predictions"]]
        if task.primary_metric == "bleu":
            # the task's BLEU is corpus BLEU of first lines: resample the sentence statistics
            rows, statistic, kind = bleu_rows([first_line(p) for p in predictions],
                                              [e["reference"] for e in examples]).tolist(), bleu_statistic, "bleu"
        else:  # a mean over examples: each example scored alone
            rows = [[task.metric([p], [e])[task.primary_metric]] for p, e in zip(predictions, examples)]
            statistic, kind = mean_statistic, "mean"
        score = float(entry["scores"][task.primary_metric])
        import numpy as np

        if abs(statistic(np.array(rows)) - score) > 1e-6 * max(1.0, abs(score)):
            raise RuntimeError(f"{name}: per-example rows do not reproduce the task metric ({score})")
        scored[name] = {"score": score, "statistic": kind, "rows": rows, "backend": results["backend"]}
    return scored


def _nll(args, model_dir: Path, tasks: list[str], quantized_dir: Path | None) -> dict[str, list[list[float]]]:
    """task -> [[answer NLL (nats), answer tokens], ...] over every eval example."""
    from inlaid.quant.nll import suite_answer_nll
    from inlaid.tasks import get_task

    examples = {t: get_task(t).load_split("eval")[: args.nll_limit] for t in tasks}
    scored = suite_answer_nll(model_dir, {t: args.adapters_dir / t for t in tasks}, examples, quantized_dir,
                              progress=True)  # a log of `make eval > log 2>&1` shows it too
    return {t: [[v.nll, v.tokens] for v in values] for t, values in scored.items()}


def _error_summary(checkpoint_dir: Path, tasks: list[str]) -> dict:
    """Per task: mean over every linear of ||(W-Q)X_t||²/||WX_t||², and per layer the worst task."""
    meta = json.loads((checkpoint_dir / "inlaid_quant.json").read_text())
    entries = meta["layer_errors"]
    tasks = [t for t in tasks if entries and t in entries[0]["errors"]]
    per_task = {t: sum(e["errors"][t] for e in entries) / len(entries) for t in tasks}
    per_layer = {}
    for layer in sorted({e["layer"] for e in entries}):
        rows = [e for e in entries if e["layer"] == layer]
        per_layer[layer] = {t: sum(e["errors"][t] for e in rows) / len(rows) for t in tasks}
    worst_per_linear = sum(max(e["errors"].values()) for e in entries) / len(entries)
    return {"per_task": per_task, "per_layer": per_layer, "worst_task_per_linear": worst_per_linear,
            "seconds": meta.get("timing", {}).get("seconds")}


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


def _unquantized_cached(args, kind: str, scored: list[str], compute) -> dict:
    """The float base's results (the same for every config): computed once, kept in --work-dir
    under a key of everything they depend on (quality_inputs.unquantized_key)."""
    from inlaid.tasks.base import write_text_atomic

    path = args.work_dir / f"unquantized-{kind}-{unquantized_key(args, kind, scored, args.inputs)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result))  # a kill mid-write leaves no truncated entry
    return result


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM while generating: the report keeps what was measured before."""

    def __init__(self, message: str, terminated: bool) -> None:
        super().__init__(message)
        self.exit_code = 143 if terminated else 130  # the shell's codes for SIGTERM and SIGINT (interrupts.py)


def _measure(args, model_dir: Path, tasks: list[str], scored: list[str], checkpoint: Path | None,
             block: dict, method: str, lacking: list[str], only: str | None = None) -> None:
    """Fill `block` with what is lacking for `method` measured on `checkpoint` (None: the float
    base); `only`: the one task a per-task checkpoint is scored on."""
    targets = [only] if only else scored
    if checkpoint is None:
        if "nll" in lacking:
            block["nll"][method] = _unquantized_cached(args, "nll", scored, lambda: _nll(args, model_dir, scored, None))
        if "generate" in lacking:
            block["generation"][method] = _unquantized_cached(args, "generate", scored,
                                                              lambda: _generate(args, model_dir, scored))
        return
    if "errors" in lacking and checkpoint is not None:
        summary = _error_summary(checkpoint, tasks)
        if only:
            block["errors"].setdefault(method, {})[only] = summary
        else:
            block["errors"][method] = summary
    if "nll" in lacking:
        block["nll"].setdefault(method, {}).update(_nll(args, model_dir, targets, checkpoint))
    if "generate" in lacking:
        serve_dir = model_dir
        if checkpoint is not None:
            serve_dir, block["served"][method] = servable_dir(checkpoint, args.serve)
        block["generation"].setdefault(method, {}).update(_generate(args, serve_dir, targets))


def _run_configs(args: argparse.Namespace, model_dir: Path, tasks: list[str], scored: list[str],
                 report: dict) -> None:
    """Every lacking (config, method) measured, the report saved after each."""
    for config in args.configs:
        bits, group = (int(part) for part in config.split(":"))
        label = f"{bits}-bit g{group}"
        block = report["configs"].setdefault(label, {})
        for key in ("errors", "nll", "generation", "served"):
            block.setdefault(key, {})
        lacking = [] if args.errors_only else missing(block, "unquantized", scored, args)
        if lacking:
            print(f"== {label} unquantized: {', '.join(lacking)}", flush=True)
            _measure(args, model_dir, tasks, scored, None, block, "unquantized", lacking)
            save_report(report, args.out, args.markdown)
        for method in args.methods:
            lacking = missing(block, method, scored, args)
            if not lacking:
                print(f"== {label} {method}: complete", flush=True)
                continue
            print(f"== {label} {method}: {', '.join(lacking)}", flush=True)
            if method == "per-task":
                for task in scored:
                    checkpoint = quantized_checkpoint(args, model_dir, tasks, f"gptq-task:{task}", bits, group,
                                                      error_tasks=[task])
                    _measure(args, model_dir, tasks, scored, checkpoint, block, method, lacking, only=task)
                    save_report(report, args.out, args.markdown)
                continue
            checkpoint = quantized_checkpoint(args, model_dir, tasks, method, bits, group)
            _measure(args, model_dir, tasks, scored, checkpoint, block, method, lacking)
            save_report(report, args.out, args.markdown)  # after every method: a killed run keeps its results


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    from inlaid.interrupts import EXIT_TERMINATED, terminate_as_interrupt, was_terminated

    terminate_as_interrupt()  # SIGTERM as Ctrl-C: the run ends in its words, the report as it stood

    from inlaid.models.prepare import cache_root, default_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir = args.work_dir or cache_root() / "quality"
    model_dir = default_model_dir()
    tasks = _tasks(args)
    if args.aggregation_study:
        return _aggregation_study(args, model_dir, tasks)
    scored = args.score_tasks or tasks
    unknown = [t for t in scored if t not in tasks]
    if unknown:
        raise SystemExit(f"--score-tasks {unknown}: not among the calibrated tasks {tasks}")
    args.inputs = data_inputs(args, model_dir, scored)
    terms = report_terms(args, tasks, scored, args.inputs)
    report = previous_report(args.out, args.merge, terms) or {**terms, "methods": [], "configs": {}}
    report["methods"] = [*report["methods"], *[m for m in args.methods if m not in report["methods"]]]
    report.setdefault("variants", {}).update({m: args.variants[m] for m in args.methods if m in args.variants})
    merge_from(report, args.merge_from, terms)
    report["machine"] = f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    started = time.time()
    try:
        _run_configs(args, model_dir, tasks, scored, report)
    except _Interrupted as interrupted:
        print(f"quality.py: interrupted: {interrupted}; {args.out} keeps the results measured before",
              file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM while quantizing or scoring NLL
        terminated = was_terminated(interrupt)
        print(f"quality.py: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {args.out} keeps the "
              "results measured before; checkpoints resume where they stopped", file=sys.stderr)
        return EXIT_TERMINATED if terminated else 130
    report["seconds"] = round(time.time() - started, 1)
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(save_report(report, args.out, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
