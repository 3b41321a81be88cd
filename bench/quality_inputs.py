"""What a bench/quality.py measurement depends on, as digests: the key of its cache of the
unquantized base's results and the terms two reports must share to be merged (the quantized
checkpoints' key: quality_checkpoints.py). A cache entry or a merged report made from other
inputs is never taken for this run's: a retrained adapter (weights or config), a re-prepared
eval split, another base model, a task's new token budget or a change of the code that
produces the numbers each make a new key."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The code between the weights and the numbers of an unquantized row: generation (the engine,
# its kernels), the answer NLL (and the prompt/answer cut and model loading it imports), the
# tasks' prompts and metrics.
MEASURING_CODE = ("inlaid/engine", "inlaid/tasks", "inlaid/quant/nll.py", "inlaid/quant/calibration.py",
                  "inlaid/quant/model_io.py", "kernels")


def code_digest(paths: tuple[str, ...] = MEASURING_CODE) -> str:
    """sha256 of the sources under `paths` (Python and C) and of the libraries they run on."""
    import peft
    import torch
    import transformers

    digest = hashlib.sha256()
    for root in paths:
        path = REPO / root
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                     if p.suffix in (".py", ".c", ".h") and p.is_file())
        for file in files:
            digest.update(str(file.relative_to(REPO)).encode())
            digest.update(file.read_bytes())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}".encode())
    return digest.hexdigest()[:16]


def data_inputs(args: argparse.Namespace, model_dir: Path, scored: list[str]) -> dict:
    """The base model's files, the scored tasks' adapters (config and weights), eval splits and
    token budgets: what every row of a report is measured on."""
    from inlaid.quant.run_support import adapter_digest, file_digest
    from inlaid.tasks import get_task

    model_files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    return {
        "model": {p.name: file_digest(p)[:16] for p in model_files},
        "tasks": {t: {"adapter": {name: digest[:16] for name, digest in adapter_digest(args.adapters_dir / t).items()},
                      "eval": file_digest(get_task(t).split_path("eval"))[:16],
                      "max_new_tokens": get_task(t).max_new_tokens} for t in scored},
    }


def report_terms(args: argparse.Namespace, tasks: list[str], scored: list[str], inputs: dict) -> dict:
    """What two reports must share for their rows to stand in one table (--merge, --merge-from)."""
    from inlaid.quant.suite import quantizer_version

    return {"tasks": tasks, "scored_tasks": scored, "calib_samples": args.calib_samples, "limit": args.limit,
            "nll_limit": args.nll_limit, "weight_dtype": args.weight_dtype, "max_tokens": args.max_tokens,
            "backend": args.backend, "serve": args.serve,
            "inputs": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16],
            "quantizer": quantizer_version()}


def unquantized_key(args: argparse.Namespace, kind: str, scored: list[str], inputs: dict) -> str:
    """The key of the float base's cached results of `kind` ("nll" or "generate")."""
    settings = args.nll_limit if kind == "nll" else [args.limit, args.weight_dtype, args.backend]
    return hashlib.sha256(json.dumps([kind, scored, inputs, settings, code_digest()],
                                     sort_keys=True).encode()).hexdigest()[:10]
