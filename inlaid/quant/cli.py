"""`inlaid quantize`: quantize a base model jointly for a set of tasks (MLGPTQ or a baseline).

    inlaid quantize --model DIR --task name=ADAPTER_DIR:CALIB.jsonl ... \
        --method mlgptq --bits 4 --group-size 128 --out DIR

Shows a progress bar per layer (with ETA), reports time and peak memory, and resumes an
interrupted run in the same --out directory (per-layer checkpoints) unless --restart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inlaid.quant.errors import QuantizationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="base model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=ADAPTER_DIR:CALIB.jsonl",
                        help="a task to calibrate for (repeat); leave ADAPTER_DIR empty for the base forward")
    parser.add_argument("--method", default="mlgptq",
                        help="mlgptq | minimax | max | gptq-mixed | gptq-mean-lora | gptq-task:<name> | rtn")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=128, help="-1, 32, 64, 128 ...")
    parser.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    parser.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    parser.add_argument("--dynamic-groups", action="store_true",
                        help="with --act-order: groups in processing order (g_idx permuted) instead of static")
    parser.add_argument("--mse-clip", action="store_true", help="search a clipped range per group")
    parser.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of the mean diagonal")
    parser.add_argument("--max-samples", type=int, default=128, help="calibration samples per task")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per sample (truncated)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward batch")
    parser.add_argument("--mlgptq-rounds", type=int, default=None, help="reweighting rounds of mlgptq")
    parser.add_argument("--mlgptq-step", type=float, default=None, help="reweighting exponent of mlgptq")
    parser.add_argument("--mlgptq-slack", type=float, default=None,
                        help="task-mean error a reweighting round may add, as a fraction (default 0.05)")
    parser.add_argument("--no-errors", action="store_true", help="skip the per-task reconstruction errors")
    parser.add_argument("--no-hessian-state", action="store_true", help="do not store per-task Hessians")
    parser.add_argument("--restart", action="store_true", help="discard a partial run in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from inlaid.models.prepare import default_model_dir
    from inlaid.quant.calibration import parse_task_argument
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.methods import MlgptqOptions, parse_method
    from inlaid.quant.spec import QuantSpec

    try:
        if not args.task and args.method != "rtn":
            raise QuantizationError(
                f"--method {args.method} needs calibration data: give at least one --task name=ADAPTER_DIR:CALIB.jsonl "
                "(only rtn runs without)"
            )
        tasks = [parse_task_argument(text) for text in args.task]
        method = parse_method(args.method, [task.name for task in tasks])
        spec = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.sym, act_order=args.act_order,
                         static_groups=not args.dynamic_groups, mse_clip=args.mse_clip, damp_percent=args.damp)
        defaults = MlgptqOptions()
        if args.mlgptq_slack is not None and args.mlgptq_slack < 0:
            raise QuantizationError(f"--mlgptq-slack must be >= 0, got {args.mlgptq_slack}")
        options = MlgptqOptions(rounds=args.mlgptq_rounds or defaults.rounds,
                                step=args.mlgptq_step if args.mlgptq_step is not None else defaults.step,
                                mean_slack=args.mlgptq_slack if args.mlgptq_slack is not None else defaults.mean_slack)
        if args.threads:
            torch.set_num_threads(args.threads)
        config = DriverConfig(
            model_dir=args.model or default_model_dir(), tasks=tasks, method=method, spec=spec, out_dir=args.out,
            max_samples=args.max_samples, max_tokens=args.max_tokens, max_batch_tokens=args.batch_tokens,
            measure_errors=not args.no_errors, save_hessian_state=not args.no_hessian_state, mlgptq=options,
            resume=not args.restart,
        )
        report = quantize_model(config)
    except QuantizationError as error:
        print(f"inlaid quantize: error: {error}", file=sys.stderr)
        return 2
    print(f"{report.method}: {spec.bits}-bit g{spec.group_size} -> {report.out_dir}")
    if report.layers_resumed:
        print(f"resumed after {report.layers_resumed} finished layers")
    for name, counts in report.calibration.items():
        print(f"  task {name}: {counts['samples']} samples, {counts['tokens']} tokens")
    if report.layer_errors:
        task_names = list(report.layer_errors[0]["errors"])
        print("  mean relative reconstruction error ||(W-Q)X||²/||WX||² over linears:")
        for name in task_names:
            values = [entry["errors"][name] for entry in report.layer_errors]
            print(f"    {name}: {sum(values) / len(values):.3e}")
    print(f"time {report.seconds:.1f} s, peak memory (RSS) {report.peak_rss_mb:.0f} MB")
    return 0
