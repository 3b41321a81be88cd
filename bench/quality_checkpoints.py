"""bench/quality.py's quantized checkpoints: each quantized once (or resumed) under --work-dir,
keyed by every input `inlaid quantize --suite` keys its own by, and the float copy of a
checkpoint's dequantized weights that generation runs from where the kernels are not asked for."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
from pathlib import Path


def checkpoint_key(args: argparse.Namespace, model_dir: Path, calibration: list, method: str, options,
                   bits: int, group: int) -> str:
    """The key of a quantized checkpoint: every input `inlaid quantize --suite` keys its own by
    (the model's files, each adapter's config and weights, each calibration file, the method
    and its options, the quantizer's code)."""
    from inlaid.quant.calibration import CALIBRATION_BATCH_TOKENS
    from inlaid.quant.spec import QuantSpec
    from inlaid.quant.suite import suite_inputs, suite_key

    inputs = suite_inputs(model_dir, calibration, method, QuantSpec(bits=bits, group_size=group), args.calib_samples,
                          args.max_tokens, CALIBRATION_BATCH_TOKENS, options)
    return suite_key(inputs)[:10]


def quantized_checkpoint(args: argparse.Namespace, model_dir: Path, tasks: list[str], method: str, bits: int,
                         group: int, error_tasks: list[str] | None = None) -> Path:
    """Quantize (or reuse the cached checkpoint); returns its directory. `method` may be a
    --variant of mlgptq."""
    from inlaid.quant.calibration import CalibrationTask
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.cli import default_rounds
    from inlaid.quant.methods import MlgptqOptions, parse_method
    from inlaid.quant.spec import QuantSpec
    from inlaid.quant.unfinished import unfinished_problem
    from inlaid.tasks import get_task

    calibration = [CalibrationTask(t, args.adapters_dir / t, get_task(t).split_path("calib")) for t in tasks]
    # each method runs the search `inlaid quantize --method` runs (minimax's rounds are not mlgptq's)
    options = MlgptqOptions(**args.variants.get(method, {"rounds": default_rounds(method)}))
    method_name = "mlgptq" if method in args.variants else method
    # Keyed by every input: a retrained adapter or changed code never reuses a predecessor's checkpoint.
    key = checkpoint_key(args, model_dir, calibration, method_name, options, bits, group)
    label = method.replace(":", "_").replace("[", "_").replace("]", "")
    out_dir = args.work_dir / f"{bits}b-g{group}" / f"{label}-{key}"

    def finished() -> bool:  # a run killed after its metadata, before its end, is resumed
        return (out_dir / "inlaid_quant.json").is_file() and unfinished_problem(out_dir) is None

    if finished():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run quantizing the same checkpoint: wait and reuse it
        if finished():
            return out_dir
        config = DriverConfig(
            model_dir=model_dir, tasks=calibration, method=parse_method(method_name, tasks),
            spec=QuantSpec(bits=bits, group_size=group), out_dir=out_dir, max_samples=args.calib_samples,
            max_tokens=args.max_tokens, save_hessian_state=False, progress=True, error_tasks=error_tasks,
            mlgptq=options,
        )
        report = quantize_model(config)
    print(f"   quantized in {report.seconds:.0f} s, the process's peak RSS so far {report.peak_rss_mb:.0f} MB "
          f"(generation's included), phases {report.phases}", flush=True)
    return out_dir


def servable_dir(checkpoint_dir: Path, serve: str) -> tuple[Path, str]:
    """The directory to generate from: the GPTQ checkpoint if the kernels take it (and `serve`
    is "kernels"), else a float copy of its dequantized weights."""
    from safetensors.torch import save_file

    from inlaid.kernels.dispatch import prepare_quant_linear
    from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint

    checkpoint = None  # loaded only where it is read: a finished float copy needs none
    if serve == "dequantized":
        reason = "on request: --serve dequantized"
    else:
        checkpoint = load_gptq_checkpoint(checkpoint_dir)
        try:
            import torch

            for weights in checkpoint.linears.values():
                prepare_quant_linear(weights, "cpu", torch.float32, mode="dequant")
            return checkpoint_dir, "gptq checkpoint (low-bit kernels)"
        except Exception as error:  # the kernels reject this layout: serve the same weights in float
            reason = "kernels: " + str(error).split(";")[0]
    float_dir = checkpoint_dir / "dequantized"
    if float_dir.is_dir():  # made whole (a rename): reused, also from a directory this run cannot write
        return float_dir, f"dequantized float weights ({reason})"
    # Written whole into a temporary directory and renamed, under a lock: a run killed while
    # writing, or two runs at once (--merge-from), never leave a truncated copy that is reused.
    with open(checkpoint_dir / "dequantized.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not float_dir.is_dir():
            for leftover in checkpoint_dir.glob("dequantized.*.tmp"):  # killed builds (the lock is ours)
                shutil.rmtree(leftover, ignore_errors=True)
            building = checkpoint_dir / f"dequantized.{os.getpid()}.tmp"
            building.mkdir()
            checkpoint = checkpoint or load_gptq_checkpoint(checkpoint_dir)
            config = dict(checkpoint.config)
            config.pop("quantization_config", None)
            (building / "config.json").write_text(json.dumps(config, indent=2))
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                         "special_tokens_map.json"):
                if (checkpoint_dir / name).is_file():
                    shutil.copyfile(checkpoint_dir / name, building / name)
            state = {k: v.contiguous() for k, v in dequantized_state_dict(checkpoint).items()}
            save_file(state, str(building / "model.safetensors"), metadata={"format": "pt"})
            building.rename(float_dir)
    return float_dir, f"dequantized float weights ({reason})"
