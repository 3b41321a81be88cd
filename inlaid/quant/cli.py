"""`inlaid quantize`: quantize a base model jointly for a set of tasks (MLGPTQ or a baseline).

    inlaid quantize --model DIR --task name=ADAPTER_DIR:CALIB.jsonl ... \
        --method mlgptq --bits 4 --group-size 128 --out DIR
    inlaid quantize --suite [--tasks a,b]     # every adapter of adapters/MANIFEST.json,
                                              # cached under $XDG_CACHE_HOME/inlaid/quantized/

Shows a progress bar per layer (with ETA), reports time and peak memory, and resumes an
interrupted run in the same --out directory (per-layer checkpoints) unless --restart.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from inlaid.quant.calibration import CALIBRATION_BATCH_TOKENS, DEFAULT_MAX_TOKENS
from inlaid.cli_args import non_negative_float, positive_float, positive_int, writable_dir_problem
from inlaid.quant.errors import QuantizationError

if TYPE_CHECKING:
    from inlaid.quant.driver import QuantizationReport
    from inlaid.quant.methods import MlgptqOptions
    from inlaid.quant.spec import QuantSpec


def _slack(text: str) -> float:
    """--mlgptq-slack: a number >= 0, or inf (no bound: MlgptqOptions.mean_slack None). NaN
    is refused: it compares false to every cost, and started the run."""
    return math.inf if text.strip().lower() in ("inf", "infinity") else non_negative_float(text)


# `minimax` is the unbounded worst-task search docs/quantization.md measured: 4 rounds. Its
# rounds default apart from mlgptq's, which is 1 (no search) since the NLL table.
MINIMAX_ROUNDS = 4


def default_rounds(method_kind: str) -> int:
    """The worst-task search's rounds of a method when none are given (`inlaid quantize`, `make eval`)."""
    from inlaid.quant.methods import MlgptqOptions

    return MINIMAX_ROUNDS if method_kind == "minimax" else MlgptqOptions().rounds


def mlgptq_options(args: argparse.Namespace, method_kind: str) -> "MlgptqOptions":
    """The --mlgptq-* options, each absent one at the method's default."""
    from inlaid.quant.methods import MlgptqOptions

    defaults = MlgptqOptions()
    return MlgptqOptions(rounds=args.mlgptq_rounds or default_rounds(method_kind),
                         start=args.mlgptq_start or defaults.start,
                         step=args.mlgptq_step if args.mlgptq_step is not None else defaults.step,
                         mean_slack=(defaults.mean_slack if args.mlgptq_slack is None
                                     else None if math.isinf(args.mlgptq_slack) else args.mlgptq_slack))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="base model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=ADAPTER_DIR:CALIB.jsonl",
                        help="a task to calibrate for (repeat); leave ADAPTER_DIR empty for the base forward")
    parser.add_argument("--suite", action="store_true",
                        help="the tasks of adapters/MANIFEST.json with their calibration splits; without --out the "
                             "checkpoint is cached by its inputs and reused (32 samples/task unless --max-samples)")
    parser.add_argument("--tasks", default=None, metavar="A,B", help="with --suite: only these tasks of the manifest")
    parser.add_argument("--adapters-dir", type=Path, default=None, help="with --suite: where MANIFEST.json is")
    parser.add_argument("--method", default="mlgptq",
                        help="mlgptq (default) | minimax | max | gptq-mixed | gptq-mean-lora | gptq-task:<name> | rtn")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="bits per weight (default 4)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="-1 (per row) or a power of two from 32: 32, 64, 128 (default), 256 ...")
    parser.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    parser.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    parser.add_argument("--dynamic-groups", action="store_true",
                        help="with --act-order: groups in processing order (g_idx permuted) instead of static")
    parser.add_argument("--mse-clip", action="store_true", help="search a clipped range per group")
    parser.add_argument("--damp", type=float, default=0.01,
                        help="dampening, fraction of the mean diagonal (default 0.01)")
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="calibration samples per task (128; --suite: 32)")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                        help="tokens per sample, longer ones truncated (default %(default)s)")
    parser.add_argument("--batch-tokens", type=positive_int, default=CALIBRATION_BATCH_TOKENS,
                        help="padded tokens per forward batch (1024: 6%% padding on the task suite, 4096: 21%%)")
    parser.add_argument("--mlgptq-start", default=None,
                        help="mlgptq's aggregate of the per-task Hessians: task-mean (default: every task the same weight, scaled by what noise costs its answers, docs/quantization.md), token-mean, trace-norm, error-norm")
    parser.add_argument("--mlgptq-rounds", type=positive_int, default=None,
                        help="mlgptq / minimax rounds; above 1 the aggregate is reweighted toward the worst task "
                             f"(default: mlgptq 1, none; minimax {MINIMAX_ROUNDS})")
    parser.add_argument("--mlgptq-step", type=positive_float, default=None, help="reweighting exponent of mlgptq")
    parser.add_argument("--mlgptq-slack", type=_slack, default=None,
                        help="task-mean error a reweighting round may add, as a fraction (default 0; inf: no bound)")
    parser.add_argument("--no-errors", action="store_true", help="skip the per-task reconstruction errors")
    parser.add_argument("--no-hessian-state", action="store_true", help="do not store per-task Hessians")
    parser.add_argument("--restart", action="store_true",
                        help="start over: discard a partial run or checkpoint in --out (marked unfinished first)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="output checkpoint directory (required without --suite)")


def quantize_out_problem(out: Path) -> str | None:
    """Why `out` cannot take this run's checkpoint, or None. A new or empty directory is
    fine, and so is one this command wrote before: a partial run (`.partial/`, resumed
    unless --restart; `hessian_state/` is written first) or a finished checkpoint (rewritten).
    Any other non-empty directory is refused: the checkpoint's files would land among
    someone else's (it was accepted and written into)."""
    from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, METADATA_FILE
    from inlaid.quant.unfinished import UNFINISHED_FILE
    from inlaid.quant.partial import PARTIAL_DIR

    problem = writable_dir_problem(out, "--out")
    if problem:
        return problem
    out = Path(out).expanduser()
    if out.is_dir() and any(out.iterdir()) and not any(
            (out / name).exists() for name in (PARTIAL_DIR, HESSIAN_STATE_DIR, METADATA_FILE, UNFINISHED_FILE)):
        return (f"--out {out} already exists and holds files that are not an `inlaid quantize` checkpoint or "
                "partial run: give a new or empty directory")
    return None


MIN_GROUP_SIZE = 32


def group_size_supported(group_size: int) -> bool:
    """-1 or a power of two >= 32: what the low-bit kernels' fast paths take (torch's CPU int4
    kernel: groups of 32..256 rows that divide the checkpoint's group; the Triton kernel: a
    K tile of 16..128 inside one group). Any other size is valid GPTQ but falls back to
    dequantizing the whole weight on every call (7 was measured ~7x slower). The last group
    may be shorter (K = 576 with 128: four of 128 and one of 64), which the kernels handle."""
    return group_size == -1 or (group_size >= MIN_GROUP_SIZE and group_size & (group_size - 1) == 0)


def _quant_spec(args: argparse.Namespace) -> QuantSpec:
    """The QuantSpec of the flags, each refusal naming its flag (QuantSpec's own messages name
    its fields: damp_percent, group_size)."""
    from inlaid.quant.spec import QuantSpec

    if not group_size_supported(args.group_size):
        raise QuantizationError(f"--group-size must be -1 (one group per row) or a power of two from "
                                f"{MIN_GROUP_SIZE} (32, 64, 128, 256, ...): the serving kernels' fast paths need "
                                f"whole 32-row tiles per group; got {args.group_size}")
    if not 0.0 <= args.damp < 10.0:
        raise QuantizationError(f"--damp is a fraction of the mean Hessian diagonal: give a number in [0, 10) "
                                f"(default 0.01, 1 %), got {args.damp}")
    if args.dynamic_groups and not args.act_order:
        raise QuantizationError("--dynamic-groups goes with --act-order (without it the groups are in the original "
                                "column order either way): add --act-order or drop --dynamic-groups")
    return QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.sym, act_order=args.act_order,
                     static_groups=not args.dynamic_groups, mse_clip=args.mse_clip, damp_percent=args.damp)


def run(args: argparse.Namespace) -> int:
    import torch

    from inlaid.models.prepare import default_model_dir
    from inlaid.quant.calibration import CalibrationTask, parse_task_argument
    from inlaid.quant.checkpoint_files import read_inlaid_metadata
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.inputs import check_tasks, model_dir_problem, out_overlaps_model_problem
    from inlaid.quant.methods import parse_method
    from inlaid.quant.run_support import out_overlaps_adapter_problem, resume_hint
    from inlaid.quant.suite import (
        DEFAULT_ADAPTERS_DIR, SUITE_CALIB_SAMPLES, ensure_suite_checkpoint, is_complete, read_manifest,
        suite_checkpoint_dir,
    )

    try:
        if args.suite and args.task:
            raise QuantizationError("--suite takes its tasks from adapters/MANIFEST.json: drop the --task flags "
                                    "(or --suite, to list the tasks yourself)")
        if not args.suite and (args.tasks or args.adapters_dir):
            raise QuantizationError("--tasks and --adapters-dir go with --suite")
        if not args.suite and args.out is None:
            raise QuantizationError("--out is required (or --suite, which caches the checkpoint by its inputs)")
        if not args.suite and not args.task and args.method != "rtn":
            raise QuantizationError(
                f"--method {args.method} needs calibration data: give at least one --task name=ADAPTER_DIR:CALIB.jsonl "
                "(only rtn runs without), or --suite for the committed adapters"
            )
        # Paths before anything loads: a missing --model came back from Hugging Face as a bad
        # repo id, and an --out under a file failed only once the model had loaded.
        # --model must be the float model (a quantized checkpoint failed in transformers after
        # --out was marked unfinished), and --out must lie outside it (nor hold it).
        problem = model_dir_problem(args.model) or (
            out_overlaps_model_problem(args.out, args.model or default_model_dir()) if args.out is not None else None
        ) or (quantize_out_problem(args.out) if args.out is not None else None)
        if problem:
            raise QuantizationError(problem)
        spec = _quant_spec(args)
        adapters_dir = args.adapters_dir or DEFAULT_ADAPTERS_DIR
        selected = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
        if args.suite:
            tasks = [CalibrationTask(t.name, t.adapter_dir, t.calib_path) for t in read_manifest(adapters_dir, selected)]
        else:
            tasks = [parse_task_argument(text) for text in args.task]
        # --out inside an adapter was written into as --out inside --model was
        if args.out is not None and (problem := out_overlaps_adapter_problem(args.out, tasks)):
            raise QuantizationError(problem)
        # Names, adapters and every calibration line before the model loads (a '.' in a name,
        # a NaN adapter or a bad line past --max-samples failed only after it had).
        check_tasks(tasks, args.model or default_model_dir())
        method = parse_method(args.method, [task.name for task in tasks])
        options = mlgptq_options(args, method.kind)
        if args.threads:
            torch.set_num_threads(args.threads)
        max_samples = args.max_samples or (SUITE_CALIB_SAMPLES if args.suite else 128)
        if args.suite and args.out is None:
            if args.no_errors or args.restart:
                raise QuantizationError("the cached suite checkpoint always measures errors and resumes; "
                                        "give --out for --no-errors or --restart")
            started = time.time()
            cached = is_complete(suite_checkpoint_dir(
                args.model, method=method.name, spec=spec, calib_samples=max_samples, tasks=selected,
                adapters_dir=adapters_dir, max_tokens=args.max_tokens, max_batch_tokens=args.batch_tokens, mlgptq=options))
            out_dir = ensure_suite_checkpoint(
                args.model, method=method.name, spec=spec, calib_samples=max_samples, tasks=selected,
                adapters_dir=adapters_dir, max_tokens=args.max_tokens, max_batch_tokens=args.batch_tokens,
                mlgptq=options, save_hessian_state=not args.no_hessian_state,
            )
            metadata = read_inlaid_metadata(out_dir) or {}  # a corrupt cached one: named, not a JSONDecodeError
            print(f"{method.name}: {spec.bits}-bit g{spec.group_size}, tasks {', '.join(t.name for t in tasks)}")
            _print_errors(metadata.get("layer_errors") or [])
            how = "cached" if cached else f"built in {time.time() - started:.1f} s"
            print(f"suite checkpoint ({how}): {out_dir}")
            return 0
        config = DriverConfig(
            model_dir=args.model or default_model_dir(), tasks=tasks, method=method, spec=spec, out_dir=args.out,
            max_samples=max_samples, max_tokens=args.max_tokens, max_batch_tokens=args.batch_tokens,
            measure_errors=not args.no_errors, save_hessian_state=not args.no_hessian_state, mlgptq=options,
            resume=not args.restart,
        )
        try:
            report = quantize_model(config)
        except KeyboardInterrupt:
            if hint := resume_hint(args.out, "quantize"):  # before inlaid/cli.py's bare "interrupted"
                print(hint, file=sys.stderr)
            raise
    except QuantizationError as error:
        print(f"inlaid quantize: {error}", file=sys.stderr)
        return 2
    _print_report(report, spec)
    return 0


def _print_report(report: QuantizationReport, spec: QuantSpec) -> None:
    print(f"{report.method}: {spec.bits}-bit g{spec.group_size} -> {report.out_dir}")
    if report.layers_resumed:
        print(f"resumed after {report.layers_resumed} finished layers")
    for name, counts in report.calibration.items():
        print(f"  task {name}: {counts['samples']} samples, {counts['tokens']} tokens")
    _print_errors(report.layer_errors)
    print(f"time {report.seconds:.1f} s, peak memory (RSS) {report.peak_rss_mb:.0f} MB; phases, wall (CPU) s: "
          + ", ".join(f"{name} {wall:.1f} ({report.cpu_phases.get(name, 0.0):.1f})" for name, wall in report.phases.items()))


def _print_errors(layer_errors: list[dict]) -> None:
    if not layer_errors:
        return
    print("  mean relative reconstruction error ||(W-Q)X||²/||WX||² over linears:")
    for name in layer_errors[0]["errors"]:
        values = [entry["errors"][name] for entry in layer_errors]
        print(f"    {name}: {sum(values) / len(values):.3e}")
