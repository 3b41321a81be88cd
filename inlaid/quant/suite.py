"""The suite checkpoint: ONE quantized base for every committed task adapter, built once and
cached under `$XDG_CACHE_HOME/inlaid/quantized/<key>/`.

The task list comes from `adapters/MANIFEST.json` (directory name -> training record with
its `task`); each task's calibration file is the entry's `calib` path when it has one,
else the task's committed calibration split (`inlaid/tasks/data/<task>/calib.jsonl`).

The cache key hashes every input that changes the result: the base model's files, each
adapter's config and weights, each calibration file, the method and its search options,
bits, group size and the rest of the spec, the sample/token limits, and the source of the
quantizer's modules plus the torch/transformers/peft versions. Any change gives another
key, so another directory: a stale base is never served. A run killed midway leaves its
finished layers in `<key>/.partial/` and the next call resumes there. A lock file keeps two
processes from building the same checkpoint at once (the second says on stderr that it waits,
once, with the builder's pid, then waits and reuses it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from inlaid.build_lock import build_lock
from inlaid.quant.calibration import CALIBRATION_BATCH_TOKENS, CalibrationTask
from inlaid.quant.driver import DriverConfig, quantize_model
from inlaid.quant.errors import CalibrationDataError, QuantizationError
from inlaid.quant.methods import MlgptqOptions, parse_method
from inlaid.quant.partial import PARTIAL_DIR
from inlaid.quant.run_support import adapter_digest, file_digest
from inlaid.quant.spec import QuantSpec

DEFAULT_ADAPTERS_DIR = Path(__file__).resolve().parent.parent.parent / "adapters"
MANIFEST_FILE = "MANIFEST.json"
SUITE_RECORD = "suite.json"  # written last: its presence marks a complete checkpoint
SUITE_CALIB_SAMPLES = 32
# The modules whose code decides the quantized tensors (any edit there gives a new key).
QUANTIZER_MODULES: tuple[str, ...] = tuple(f"inlaid.quant.{name}" for name in (
    "aggregate", "calibration", "checkpoint", "driver", "gptq", "grid", "hessian", "layerwise", "methods", "model_io",
    "nll", "partial", "spec", "task_costs", "unfinished",
)) + ("inlaid.kernels.gptq_format", "inlaid.kernels.dense_cpu")


@dataclass(frozen=True)
class SuiteTask:
    """One task of the suite: its name, adapter directory and calibration file."""

    name: str
    adapter_dir: Path
    calib_path: Path


def read_manifest(adapters_dir: Path = DEFAULT_ADAPTERS_DIR, tasks: Sequence[str] | None = None) -> list[SuiteTask]:
    """The suite's tasks from `<adapters_dir>/MANIFEST.json`, in manifest order (or the
    order of `tasks`, which must all be in the manifest)."""
    adapters_dir = Path(adapters_dir)
    path = adapters_dir / MANIFEST_FILE
    if not path.is_file():
        raise CalibrationDataError(f"{path} does not exist: train adapters first (inlaid train-adapter) "
                                   "and write it with `inlaid tasks report`")
    try:
        entries = json.loads(path.read_text())["adapters"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CalibrationDataError(f"{path}: not an adapter manifest ({error})") from None
    available: dict[str, SuiteTask] = {}
    for directory, entry in entries.items():
        name = str(entry.get("task", directory)) if isinstance(entry, dict) else directory
        adapter_dir = adapters_dir / directory
        if not (adapter_dir / "adapter_config.json").is_file():
            raise CalibrationDataError(f"{path}: adapter '{directory}' is listed but {adapter_dir} holds no adapter")
        available[name] = SuiteTask(name, adapter_dir, _calibration_file(name, entry, adapters_dir))
    if tasks is None:
        chosen = list(available.values())
    else:
        unknown = [name for name in tasks if name not in available]
        if unknown:
            raise CalibrationDataError(f"tasks {unknown} are not in {path} (it has {', '.join(available)})")
        chosen = [available[name] for name in tasks]
    if not chosen:
        raise CalibrationDataError(f"{path} lists no adapters")
    return chosen


def _calibration_file(task: str, entry: dict, adapters_dir: Path) -> Path:
    if isinstance(entry, dict) and entry.get("calib"):
        calib = Path(entry["calib"])
        return calib if calib.is_absolute() else adapters_dir / calib
    from inlaid.tasks import TaskError, get_task

    try:
        return get_task(task).split_path("calib")
    except TaskError as error:
        raise CalibrationDataError(f"no calibration file for task '{task}': {error}; "
                                   f"give its entry a 'calib' path in {MANIFEST_FILE}") from None


def quantizer_version() -> str:
    """A digest of the quantizer's source code and of the libraries its forward runs on."""
    import peft
    import torch
    import transformers

    digest = hashlib.sha256()
    for name in QUANTIZER_MODULES:
        digest.update(name.encode())
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}".encode())
    return digest.hexdigest()[:16]


def suite_inputs(model_dir: Path, tasks: list[SuiteTask], method: str, spec: QuantSpec, calib_samples: int,
                 max_tokens: int, max_batch_tokens: int, mlgptq: MlgptqOptions) -> dict:
    """Everything the checkpoint depends on, as digests and settings (what the key hashes)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise QuantizationError(f"{model_dir} is not a model directory (no config.json)")
    model_files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    for task in tasks:
        if not task.calib_path.is_file():
            raise CalibrationDataError(f"calibration file {task.calib_path} of task '{task.name}' does not exist")
    return {
        "model": {p.name: file_digest(p) for p in model_files},
        "tasks": [{"name": t.name, "adapter": adapter_digest(t.adapter_dir), "calib": file_digest(t.calib_path)}
                  for t in tasks],
        "method": method,
        "mlgptq": asdict(mlgptq) if parse_method(method).kind in ("mlgptq", "minimax") else None,
        "spec": spec.to_dict(),
        "calib_samples": calib_samples, "max_tokens": max_tokens, "max_batch_tokens": max_batch_tokens,
        "quantizer": quantizer_version(),
    }


def suite_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def suite_cache_dir() -> Path:
    from inlaid.models.prepare import cache_root

    return cache_root() / "quantized"


def is_complete(checkpoint_dir: Path) -> bool:
    return (Path(checkpoint_dir) / SUITE_RECORD).is_file()


@dataclass(frozen=True)
class SuitePlan:
    """What a suite checkpoint is built from and where it lives."""

    model_dir: Path
    tasks: list[SuiteTask]
    method: str
    spec: QuantSpec
    inputs: dict
    out_dir: Path


def plan_suite(
    model_dir: Path | None = None, *, method: str = "mlgptq", bits: int = 4, group_size: int = 128,
    calib_samples: int = SUITE_CALIB_SAMPLES, tasks: Sequence[str] | None = None,
    adapters_dir: Path = DEFAULT_ADAPTERS_DIR, spec: QuantSpec | None = None, max_tokens: int = 512,
    max_batch_tokens: int = CALIBRATION_BATCH_TOKENS, mlgptq: MlgptqOptions = MlgptqOptions(), cache_dir: Path | None = None,
) -> SuitePlan:
    """Resolve the manifest's tasks and hash every input into the checkpoint's directory.
    `spec`, when given, replaces bits/group_size (for the other QuantSpec options)."""
    if model_dir is None:
        from inlaid.models.prepare import prepare_default_model

        model_dir = prepare_default_model(quiet=True)
    suite = read_manifest(adapters_dir, tasks)
    spec = spec or QuantSpec(bits=bits, group_size=group_size)
    method = parse_method(method, [t.name for t in suite]).name
    inputs = suite_inputs(Path(model_dir), suite, method, spec, calib_samples, max_tokens, max_batch_tokens, mlgptq)
    root = Path(cache_dir) if cache_dir is not None else suite_cache_dir()
    return SuitePlan(Path(model_dir), suite, method, spec, inputs, root / suite_key(inputs))


def suite_checkpoint_dir(model_dir: Path | None = None, **options) -> Path:
    """Where `ensure_suite_checkpoint` with the same arguments puts (or finds) its checkpoint."""
    return plan_suite(model_dir, **options).out_dir


def ensure_suite_checkpoint(
    model_dir: Path | None = None, *, method: str = "mlgptq", bits: int = 4, group_size: int = 128,
    calib_samples: int = SUITE_CALIB_SAMPLES, tasks: Sequence[str] | None = None,
    adapters_dir: Path = DEFAULT_ADAPTERS_DIR, spec: QuantSpec | None = None, max_tokens: int = 512,
    max_batch_tokens: int = CALIBRATION_BATCH_TOKENS, mlgptq: MlgptqOptions = MlgptqOptions(), save_hessian_state: bool = True,
    cache_dir: Path | None = None, progress: bool = True,
) -> Path:
    """The directory of the quantized base for the manifest's tasks: reused if cached,
    resumed if a previous build was interrupted, built otherwise (tqdm bar per layer)."""
    plan = plan_suite(model_dir, method=method, bits=bits, group_size=group_size, calib_samples=calib_samples,
                      tasks=tasks, adapters_dir=adapters_dir, spec=spec, max_tokens=max_tokens,
                      max_batch_tokens=max_batch_tokens, mlgptq=mlgptq, cache_dir=cache_dir)
    out_dir = plan.out_dir
    if is_complete(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(out_dir):  # another process building the same key: wait for it (saying so)
        if is_complete(out_dir):
            return out_dir
        names = [t.name for t in plan.tasks]
        config = DriverConfig(
            model_dir=plan.model_dir, tasks=[CalibrationTask(t.name, t.adapter_dir, t.calib_path) for t in plan.tasks],
            method=parse_method(plan.method, names), spec=plan.spec, out_dir=out_dir, max_samples=calib_samples,
            max_tokens=max_tokens, max_batch_tokens=max_batch_tokens, save_hessian_state=save_hessian_state,
            mlgptq=mlgptq, progress=progress,
        )
        started = time.time()
        report = quantize_model(config)
        shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)  # model.safetensors holds it all now
        record = {"key": out_dir.name, "inputs": plan.inputs, "tasks": names,
                  "adapters": {t.name: str(t.adapter_dir) for t in plan.tasks},
                  "calibration": {t.name: str(t.calib_path) for t in plan.tasks},
                  "seconds": round(time.time() - started, 1), "layers_resumed": report.layers_resumed,
                  "peak_rss_mb": round(report.peak_rss_mb, 1)}
        temporary = out_dir / (SUITE_RECORD + ".tmp")
        temporary.write_text(json.dumps(record, indent=1))
        temporary.replace(out_dir / SUITE_RECORD)
    if progress and (note := other_builds_note(out_dir)):
        print(note, file=sys.stderr)
    return out_dir


def other_builds_note(kept: Path) -> str | None:
    """What else the cache beside `kept` holds, said after a new build: each change of the
    quantizer, the adapters or the options makes a new key and nothing is ever deleted (a
    server may be serving an older build), so the cache grew by ~2 GB per change unseen."""
    others = [path for path in kept.parent.iterdir() if path.is_dir() and path != kept]
    if not others:
        return None
    size = sum(file.stat().st_size for path in others for file in path.rglob("*") if file.is_file())
    amount = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    return (f"the quantized-base cache {kept.parent} also holds {len(others)} other build"
            f"{'' if len(others) == 1 else 's'} ({amount}): delete those no longer served "
            "(any is rebuilt when asked for again)")


__all__ = [
    "DEFAULT_ADAPTERS_DIR", "SUITE_CALIB_SAMPLES", "SuitePlan", "SuiteTask", "ensure_suite_checkpoint", "is_complete",
    "other_builds_note", "plan_suite", "quantizer_version", "read_manifest", "suite_cache_dir", "suite_checkpoint_dir",
    "suite_inputs", "suite_key",
]
