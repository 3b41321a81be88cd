"""`inlaid quantize-add`: add a task to a quantized checkpoint incrementally (offline).

    inlaid quantize-add --checkpoint quantized/smollm2-mlgptq-4b \
        --task code=adapters/code:inlaid/tasks/data/code/calib.jsonl --out quantized/smollm2-plus-code

Only the new task's calibration samples run through the model; the existing tasks' Hessians
come from the checkpoint's stored state. The result is a complete checkpoint (GPTQ tensors,
the merged Hessian state, metadata listing every task and what happened to each linear),
so additions chain. A running server does the same work online (docs/dynamic-tasks.md).

Each finished layer goes to `<out>/.partial/` (its tensors and decisions; its merged Hessians
to `<out>/hessian_state/`), and `<out>` is marked unfinished until the checkpoint is complete:
an interrupted run resumes at its first missing layer when the same command runs again (the
inputs' fingerprint must match), or starts over with --restart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from inlaid.build_lock import exclusive_run
from inlaid.cli_args import non_negative_float, positive_int, writable_dir_problem
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, METADATA_FILE, WEIGHTS_FILE, CheckpointMetadata, write_checkpoint
from inlaid.quant.errors import QuantizationError
from inlaid.quant.incremental import IncrementalQuantizer, LayerOutcome
from inlaid.quant.job_effect import LinearEffect, effect_lines, job_effect
from inlaid.quant.layer_decisions import LinearDecision
from inlaid.quant.inputs import (
    check_tasks, model_dir_problem, out_overlaps_model_problem, output_removed_unless_kept,
)
from inlaid.quant.model_io import LINEAR_NAMES
from inlaid.quant.partial import (
    PARTIAL_DIR, load_partial_layer, partial_path, prepare_partial_dir, read_run_record, save_partial_layer,
)
from inlaid.quant.run_support import out_overlaps_adapter_problem, resume_hint, settings_differences
from inlaid.quant.task_costs import COSTS_FILE
from inlaid.quant.unfinished import UNFINISHED_FILE, mark_finished, unfinished_problem


def _is_quantized_key(key: str, num_layers: int) -> bool:
    return any(key.startswith(f"model.layers.{i}.{name}.") for i in range(num_layers) for name in LINEAR_NAMES)


def addition_record(quantizer: IncrementalQuantizer, outcomes: list[LayerOutcome]) -> dict:
    """What one addition did, per layer and linear (kept in the checkpoint's metadata)."""
    return {
        "task": quantizer.task.name,
        "exact": quantizer.settings.exact,
        "change_threshold": quantizer.settings.change_threshold,
        "quality_tolerance": quantizer.settings.quality_tolerance,
        "forward_seconds": round(sum(o.forward_seconds for o in outcomes), 2),
        "quantize_seconds": round(sum(o.quantize_seconds for o in outcomes), 2),
        "layers": [{"layer": o.layer, "changed": o.changed,
                    "linears": [{"linear": d.linear, "action": d.action, "change": d.change, "reason": d.reason}
                                for d in o.decisions]} for o in outcomes],
    }


def write_incremental_checkpoint(quantizer: IncrementalQuantizer, outcomes: list[LayerOutcome], out_dir: Path) -> None:
    """The base checkpoint with the outcomes' layers replaced, the merged Hessian state and
    metadata that lists the new task."""
    out_dir = Path(out_dir)
    if {o.layer for o in outcomes} != set(range(quantizer.num_layers)):
        raise QuantizationError("an incremental checkpoint needs the outcome of every layer")
    base = quantizer.checkpoint_dir
    quantized: dict[str, torch.Tensor] = {}
    for outcome in outcomes:
        quantized.update(outcome.tensors if outcome.changed else quantizer.served_tensors(outcome.layer))
    with safe_open(str(base / WEIGHTS_FILE), framework="pt") as handle:
        floats = {key: handle.get_tensor(key) for key in handle.keys()
                  if not _is_quantized_key(key, quantizer.num_layers)}
    state_dir = out_dir / HESSIAN_STATE_DIR
    if quantizer.state_out.resolve() != state_dir.resolve():
        state_dir.mkdir(parents=True, exist_ok=True)
        for index in range(quantizer.num_layers):
            name = f"layer_{index:03d}.safetensors"
            shutil.copyfile(quantizer.state_out / name, state_dir / name)
        if (quantizer.state_out / COSTS_FILE).is_file():
            shutil.copyfile(quantizer.state_out / COSTS_FILE, state_dir / COSTS_FILE)
    previous = quantizer.metadata
    tasks = [t for t in previous.get("tasks", []) if t["name"] not in quantizer.drop_tasks]
    layer_errors, task_weights = [], dict(previous.get("task_weights", {}))
    for outcome in outcomes:
        for decision in outcome.decisions:
            errors = decision.errors_new if decision.swapped else decision.errors_served
            layer_errors.append({"layer": outcome.layer, "linear": decision.linear, "errors": errors})
            if decision.swapped and decision.task_weights:
                task_weights[f"model.layers.{outcome.layer}.{decision.linear}"] = decision.task_weights
    config = json.loads((base / "config.json").read_text())
    metadata = CheckpointMetadata(
        method=previous["method"], tasks=[*tasks, quantizer.calibration[quantizer.task.name]], spec=previous["spec"],
        base_model=previous.get("base_model", ""),
        # Not the base's fingerprint: `inlaid quantize` with the base's inputs took this checkpoint
        # for its own and rewrote it, the added task lost (inputs.finished_checkpoint_problem).
        calibration={**{key: value for key, value in previous.get("calibration", {}).items() if key != "fingerprint"},
                     "task_costs": quantizer.task_costs},
        layer_errors=layer_errors, task_weights=task_weights, hessian_state=HESSIAN_STATE_DIR,
        timing={"seconds": round(sum(o.forward_seconds + o.quantize_seconds for o in outcomes), 1)},
    )
    write_checkpoint(out_dir, base, config, quantized, floats, quantizer.spec, metadata)
    written = json.loads((out_dir / METADATA_FILE).read_text())
    written["incremental"] = [*previous.get("incremental", []), addition_record(quantizer, outcomes)]
    (out_dir / METADATA_FILE).write_text(json.dumps(written, indent=2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by `inlaid quantize`")
    # appended, then refused past one (run): argparse kept the last of several, dropping the others unsaid
    parser.add_argument("--task", required=True, action="append", metavar="NAME=ADAPTER_DIR:CALIB.jsonl",
                        help="the task to add (one per run)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--model", type=Path, default=None,
                        help="the full-precision base (default: the checkpoint's base_model)")
    parser.add_argument("--threshold", type=non_negative_float, default=0.01,  # IncrementalSettings' (torch-free here)
                        help="relative aggregate change at or below which a linear keeps its weight (default 0.01; "
                             "0: re-quantize whatever moved)")
    parser.add_argument("--tolerance", type=tolerance_value, default=1.0,
                        help="relative error an existing task may gain on a linear, or 'none' (default 1.0: at most double)")
    parser.add_argument("--exact", action="store_true",
                        help="recompute every existing task's Hessians too (bit-exact with a full run; full cost)")
    parser.add_argument("--drop-task", action="append", default=[],
                        help="a task of the checkpoint whose Hessians leave the state (repeat)")
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="calibration samples (default: the checkpoint's)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--restart", action="store_true",
                        help="start over: discard an interrupted run (or a checkpoint) in --out instead of resuming it")
    parser.add_argument("--verbose", action="store_true",
                        help="print every linear the quality gate kept (default: a count per layer)")


COMMAND = "quantize-add"
_OWN_ENTRIES = (PARTIAL_DIR, HESSIAN_STATE_DIR, METADATA_FILE, UNFINISHED_FILE)


def tolerance_value(text: str) -> float | None:
    """argparse type of --tolerance: a number >= 0 or 'none' (float('abc') failed later with a
    message that did not name the option)."""
    if text.strip().lower() == "none":
        return None
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or 'none', got '{text}'") from None


def output_dir_problem(out: Path, checkpoint: Path) -> str | None:
    """Why `out` cannot take the new checkpoint, or None. It must not overlap the checkpoint
    (the checkpoint itself, a directory inside it, or around it): a run writes its output
    layer by layer, and would half overwrite the checkpoint it reads. It must be new, empty,
    or hold what this command (or `inlaid quantize`) writes: an unfinished run, resumed or
    restarted (`start_problem` decides), or a checkpoint, overwritten only with --restart."""
    out, checkpoint = out.expanduser().resolve(), checkpoint.expanduser().resolve()
    if out == checkpoint or checkpoint in out.parents or out in checkpoint.parents:
        return f"--out {out} overlaps the checkpoint {checkpoint}: write the new checkpoint to a new directory"
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                               and not any((out / name).exists() for name in _OWN_ENTRIES))):
        return (f"--out {out} already exists and is not an empty directory (nor a checkpoint or an unfinished run "
                "of `inlaid quantize-add`): give a new one")
    # under a file, read-only or not creatable (/proc): found before the model loads
    return writable_dir_problem(out, "--out")


def addition_fingerprint(args: argparse.Namespace, model_dir: Path, task) -> str:
    """What a run of `quantize-add` computes, by content: the base model's and the
    checkpoint's files, the new task's adapter and calibration, every setting. A rerun with
    the same fingerprint resumes an interrupted one."""
    from inlaid.quant.run_support import adapter_digest, file_digest

    checkpoint, model_dir = Path(args.checkpoint), Path(model_dir)
    state_dir = checkpoint / HESSIAN_STATE_DIR
    described = {
        "model": {p.name: file_digest(p) for p in sorted(model_dir.glob("*.safetensors"))}
        | {"config.json": file_digest(model_dir / "config.json")},
        "checkpoint": {name: file_digest(checkpoint / name) for name in (WEIGHTS_FILE, METADATA_FILE)},
        # the state is large (GBs on a real model): its files' sizes and times identify it
        "state": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(state_dir.glob("*"))
                  if p.is_file()},
        "task": [task.name, adapter_digest(task.adapter_dir), file_digest(task.calib_path)],
        "settings": [args.threshold, args.tolerance, args.exact, args.max_samples, sorted(args.drop_task)],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def addition_settings(args: argparse.Namespace, model_dir: Path, task) -> dict[str, object]:
    """What addition_fingerprint hashes, in the flags' words (run.json keeps it: a refused
    resume names what differs)."""
    from inlaid.quant.run_support import adapter_digest, file_digest
    from inlaid.quant.run_support import DIGEST_PREFIX, digest_of, files_identity

    checkpoint = Path(args.checkpoint)
    return {
        "--model": files_identity(sorted(Path(model_dir).glob("*.safetensors"))),
        "--checkpoint": files_identity([checkpoint / name for name in (WEIGHTS_FILE, METADATA_FILE)]),
        "--task": task.name, "adapter": digest_of(adapter_digest(task.adapter_dir)),
        "calibration": DIGEST_PREFIX + file_digest(task.calib_path), "--threshold": args.threshold,
        "--tolerance": args.tolerance, "--exact": args.exact, "--max-samples": args.max_samples,
        "--drop-task": ",".join(sorted(args.drop_task)),
    }


def start_problem(out: Path, fingerprint: str, restart: bool, settings: dict | None = None) -> str | None:
    """Why this run may not start in `out` (nothing is written then), or None. Without
    --restart, only a new or empty `out` or an unfinished run of the same inputs (resumed) is
    taken; with it, anything `output_dir_problem` accepted is started over."""
    out = Path(out)
    if restart or not out.exists() or not any(out.iterdir()):
        return None
    run = read_run_record(out) if (out / PARTIAL_DIR / "run.json").is_file() else {}
    recorded = run.get("fingerprint")
    if unfinished_problem(out):
        if recorded == fingerprint:
            return None  # resumed
        if recorded is None:
            return (f"--out {out} holds an interrupted run that cannot be resumed: add --restart to start over, "
                    "or choose another --out")
        differing = settings_differences(run.get("settings"), settings or {}) if settings else []
        what = "; ".join(differing) or "checkpoint, task, adapter, calibration or flags"
        return (f"--out {out} holds an unfinished run with other inputs or settings ({what}): rerun that command "
                "to resume it, add --restart to discard it, or choose another --out")
    if (out / METADATA_FILE).is_file():
        return f"--out {out} already holds a finished checkpoint: add --restart to overwrite it, or choose another --out"
    return (f"--out {out} holds the leftovers of an interrupted run that cannot be resumed: add --restart to start "
            "over, or choose another --out")


def _resumed_outcome(out: Path, layer: int) -> LayerOutcome:
    """A finished layer of an interrupted run, as `_save_layer` wrote it."""
    tensors, meta = load_partial_layer(out, layer)
    decisions = [LinearDecision(**decision) for decision in meta["decisions"]]
    return LayerOutcome(layer, decisions, tensors if meta["changed"] else None, meta["forward_seconds"],
                        meta["quantize_seconds"])


def _save_layer(out: Path, quantizer: IncrementalQuantizer, outcome: LayerOutcome) -> None:
    """One finished layer to `<out>/.partial/`: the layer's tensors as they will be served (the
    re-quantized ones, or the checkpoint's) and its decisions."""
    tensors = outcome.tensors if outcome.changed else quantizer.served_tensors(outcome.layer)
    meta = {"changed": outcome.changed, "decisions": [asdict(decision) for decision in outcome.decisions],
            "forward_seconds": outcome.forward_seconds, "quantize_seconds": outcome.quantize_seconds}
    save_partial_layer(out, outcome.layer, {key: value.contiguous() for key, value in tensors.items()}, meta)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inlaid.models.prepare import default_model_dir
    from inlaid.quant.calibration import parse_task_argument
    from inlaid.quant.incremental import IncrementalSettings, read_checkpoint_metadata

    if len(args.task) > 1:  # argparse kept the last --task and dropped the others without a word
        print(f"inlaid quantize-add: quantize-add takes one --task (got {len(args.task)}); run it once per "
              "task, each on the checkpoint the previous one wrote", file=sys.stderr)
        return 2
    args.task = args.task[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    problem = output_dir_problem(args.out, args.checkpoint)
    if problem:
        print(f"inlaid quantize-add: {problem}", file=sys.stderr)
        return 2
    try:
        settings = IncrementalSettings(change_threshold=args.threshold, quality_tolerance=args.tolerance,
                                       exact=args.exact, max_samples=args.max_samples)
        metadata = read_checkpoint_metadata(args.checkpoint)
        # Checked on the metadata alone, before the model loads: a task the checkpoint does not
        # hold was silently "dropped" (nothing left the state, and the typo went unnoticed).
        held = [task["name"] for task in metadata.get("tasks", [])]
        unknown = [name for name in args.drop_task if name not in held]
        if unknown:
            raise QuantizationError(f"--drop-task {', '.join(unknown)}: not a task of {args.checkpoint} "
                                    f"(it holds {', '.join(held) or 'none'})")
        problem = model_dir_problem(args.model)
        if problem:
            raise QuantizationError(problem)
        model_dir = args.model or Path(metadata.get("base_model") or default_model_dir())
        problem = out_overlaps_model_problem(args.out, model_dir)  # as --checkpoint: not written into
        if problem:
            raise QuantizationError(problem)
        task = parse_task_argument(args.task)
        problem = out_overlaps_adapter_problem(args.out, [task])  # as `quantize` refuses it
        if problem:
            raise QuantizationError(problem)
        check_tasks([task], model_dir)  # name, adapter, every calibration line: before the model loads
        replaced = task.name in held and task.name not in args.drop_task
        fingerprint = addition_fingerprint(args, model_dir, task)
        settings_record = addition_settings(args, model_dir, task)
        # One run an --out at a time: two deleted and wrote each other's layers (build_lock.py).
        with exclusive_run(args.out, QuantizationError):
            problem = start_problem(args.out, fingerprint, args.restart, settings_record)
            if problem:
                raise QuantizationError(problem)
            # The checkpoint itself is checked only once the quantizer opens it (rtn, no Hessian
            # state, a truncated weights file...), after --out is prepared: a refusal before the
            # first layer removes what this run created of --out, or a later correct command there
            # was sent to "resume" this one.
            # An interrupt before the first layer is kept removes it too (output_removed_unless_kept).
            with output_removed_unless_kept(args.out) as created:
                # Marks --out unfinished before anything in it changes; a fresh start (--restart, or
                # nothing to resume) drops the earlier run's layers, state and checkpoint first.
                done = prepare_partial_dir(args.out, fingerprint, resume=not args.restart, command=COMMAND,
                                           discard=(HESSIAN_STATE_DIR, WEIGHTS_FILE, METADATA_FILE),
                                           settings=settings_record)
                created.kept = done > 0  # resumed: what is there is an earlier run's
                quantizer = IncrementalQuantizer(model_dir, args.checkpoint, task, settings,
                                                 args.out / HESSIAN_STATE_DIR, drop_tasks=args.drop_task,
                                                 served_layers={layer: partial_path(args.out, layer)
                                                                for layer in range(done)})
                done = min(done, quantizer.num_layers)
                for name, why in quantizer.left_out.items():  # (logged too, where logging is configured)
                    print(f"warning: task {name!r} is left out of the aggregate: {why}", file=sys.stderr)
                if replaced:  # said before the run, not only at its end (an outside probe)
                    print(f"note: {args.checkpoint} already holds a task {task.name!r}: in {args.out}, this adapter "
                          "replaces it (its earlier adapter and Hessians leave the aggregate; the checkpoint "
                          "itself is not changed)", file=sys.stderr)
                if done:
                    print(f"resuming the interrupted run in {args.out} after {done} finished layers")
                outcomes = []
                bar = tqdm(quantizer.layers(start=done), total=quantizer.num_layers, desc=f"add {quantizer.task.name}",
                           unit="layer")
                for outcome in bar:
                    if outcome.layer < done:
                        outcome = _resumed_outcome(args.out, outcome.layer)
                    else:
                        _save_layer(args.out, quantizer, outcome)
                        created.kept = True  # a layer done: kept for a resume whatever happens next
                    outcomes.append(outcome)
                    bar.set_postfix(swapped=sum(d.swapped for o in outcomes for d in o.decisions))
                write_incremental_checkpoint(quantizer, outcomes, args.out)
                mark_finished(args.out)
                # The checkpoint holds it all now; removed only once marked finished: a kill between
                # the two left an UNFINISHED checkpoint with nothing to resume from.
                shutil.rmtree(args.out / PARTIAL_DIR, ignore_errors=True)
    except (QuantizationError, ValueError) as error:
        print(f"inlaid quantize-add: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if hint := resume_hint(args.out, COMMAND):  # before inlaid/cli.py's "interrupted"
            print(hint, file=sys.stderr)
        raise
    record = addition_record(quantizer, outcomes)
    actions = [d.action for o in outcomes for d in o.decisions]
    how = ("replaced (its earlier adapter and Hessians are gone) in a copy of" if replaced
           else "added to a copy of")
    print(f"{quantizer.task.name} {how} {args.checkpoint} -> {args.out}")
    for action in sorted(set(actions)):
        print(f"  {action}: {actions.count(action)} of {len(actions)} linears")
    threshold = quantizer.settings.change_threshold
    for line in [*decision_lines(outcomes, args.verbose), *addition_effect_lines(outcomes, threshold)]:
        print(line)
    # The parts count every layer, the resumed ones as the interrupted run timed them; the
    # total is this run's wall time (a resumed run's total read as less than its parts).
    total = f"total {time.time() - started:.1f} s" + (
        f" in this run (the parts include the {done} layer{'s' if done != 1 else ''} the interrupted run finished)"
        if done else "")
    print(f"forward + Hessian {record['forward_seconds']:.1f} s, aggregation + quantization "
          f"{record['quantize_seconds']:.1f} s, {total}, "
          f"peak memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


def decision_lines(outcomes: list[LayerOutcome], verbose: bool) -> list[str]:
    """Why linears kept their weight: every one with --verbose, else a line per layer (one line
    per linear was ~30 lines of "would lose N%" on a 30-layer model)."""
    lines, total = [], 0
    for outcome in outcomes:
        explained = [d for d in outcome.decisions if d.reason and d.action != "kept-unchanged"]
        total += len(explained)
        if verbose:
            lines += [f"  layer {outcome.layer} {d.linear}: {d.reason}" for d in explained]
        elif explained:
            actions = "/".join(sorted({d.action for d in explained}))
            lines.append(f"  layer {outcome.layer}: {len(explained)} linear{'s' if len(explained) != 1 else ''} "
                         f"{actions} (first, {explained[0].linear}: {explained[0].reason})")
    if total and not verbose:
        lines.append(f"  ({total} linears in all; --verbose lists each)")
    return lines


def addition_effect_lines(outcomes: list[LayerOutcome], threshold: float) -> list[str]:
    """How far the aggregate moved, and each task's mean relative error over the linears on
    the weights served before and on those written now: the summary said only how many
    linears were re-quantized, not what that did to the tasks already in (an outside probe)."""
    return effect_lines(job_effect(LinearEffect(d.change, d.errors_served, d.errors_new, d.swapped)
                                   for outcome in outcomes for d in outcome.decisions), threshold)
