"""Small pieces `inlaid quantize` and `quantize-add` share around a run (an outside probe of
the CLI): how a refused resume names the settings that differ, the hint printed when a run
with finished layers is interrupted, and transformers' deprecation noise kept off the user's
terminal.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from inlaid.engine.adapter_config import ADAPTER_FILES
from inlaid.quant.partial import PARTIAL_DIR

# A settings value recorded as a digest of a file's contents: a refusal says "other contents"
# instead of printing two 64-digit hashes.
DIGEST_PREFIX = "sha256:"
# A settings value recorded as a digest of files' paths, sizes and times (large files the
# fingerprint hashed already): a refusal says "other files", which may be the same bytes.
FILES_PREFIX = "files:"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in chunks: model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_digest(adapter_dir: Path | None) -> dict[str, str] | None:
    """Digests of what defines an adapter (its config and weights); None for the base forward."""
    if adapter_dir is None:
        return None
    files = [Path(adapter_dir) / name for name in ADAPTER_FILES]
    return {p.name: file_digest(p) for p in files if p.is_file()}


def settings_differences(recorded: dict | None, current: dict) -> list[str]:
    """`key A there, B here` for every setting both record and that differs (train-adapter's
    wording); digests read "other contents". Empty when `recorded` is None (a run.json from
    before settings were recorded) or nothing recorded differs."""
    if not isinstance(recorded, dict):
        return []
    differing = []
    for key, value in current.items():
        if key not in recorded or recorded[key] == value:
            continue
        if isinstance(value, str) and value.startswith(DIGEST_PREFIX):
            differing.append(f"{key}: other contents")
        elif isinstance(value, str) and value.startswith(FILES_PREFIX):
            differing.append(f"{key}: other files (path, size or modification time)")
        else:
            differing.append(f"{key} {_shown(recorded[key])} there, {_shown(value)} here")
    differing += [f"{key} {_shown(recorded[key])} there, not given here" for key in recorded if key not in current]
    return differing


def _shown(value: object) -> object:
    # An option left out is recorded as None: "--max-samples None there" read as Python, not as the default
    return "not given (the default)" if value is None else value


def finished_layers(out: Path) -> int:
    """How many leading layers `<out>/.partial/` holds."""
    done = 0
    while (Path(out) / PARTIAL_DIR / f"layer_{done:03d}.safetensors").is_file():
        done += 1
    return done


def resume_hint(out: Path | None, command: str) -> str | None:
    """The line printed before `inlaid <command>: interrupted` when the run kept finished layers
    (the generic line said nothing of resuming), or None."""
    if out is None:
        return None
    done = finished_layers(out)
    if not done:
        return None
    return (f"inlaid {command}: {done} finished layer{'s' if done != 1 else ''} kept in {out}: rerun the same "
            "command to resume, or add --restart to start over")


def attach_adapters_quietly(model, adapters: dict[str, Path]):
    """model_io.attach_adapters without transformers' `is_gradient_checkpointing is deprecated`
    FutureWarning, which PEFT's PeftModel triggers on every load (each quantize and quantize-add
    printed it); only that warning, only here."""
    from inlaid.quant.model_io import attach_adapters

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        return attach_adapters(model, adapters)


def absolute(path: Path | str | None) -> str | None:
    """A path as a checkpoint records it: absolute, so a later `quantize-add --exact` finds it
    from any directory (relative paths, as typed, were resolved against the later cwd)."""
    return str(Path(path).expanduser().absolute()) if path else None


def recorded_path(text: str, what: str, task: str, checkpoint: Path) -> Path:
    """A file the checkpoint recorded for `task` (its adapter or calibration), found. An older
    checkpoint recorded relative paths as typed: tried against the current directory, as
    before; if not there, the refusal says so and from where to run (no traceback of a missing
    file the user never typed)."""
    from inlaid.quant.errors import QuantizationError

    path = Path(text).expanduser()
    if path.exists():
        return path
    if path.is_absolute():
        raise QuantizationError(f"{checkpoint} records the {what} of task {task!r} at {path}, which does not exist "
                                "(moved or removed?): restore it, or add the task without --exact")
    raise QuantizationError(
        f"{checkpoint} records the {what} of task {task!r} as the relative path {text} (as typed when it was made), "
        f"not found from {Path.cwd()}: run quantize-add --exact from the directory `inlaid quantize` ran in "
        f"(where {text} lies), or add the task without --exact")


def files_identity(files: list[Path]) -> str:
    """Files by where they lie, their sizes and times, not their contents: the fingerprint
    hashed their hundreds of MB once already, and this only words a refusal."""
    described = {str(path.resolve()): [path.stat().st_size, path.stat().st_mtime_ns] for path in files}
    return digest_of(described, FILES_PREFIX)


def digest_of(value: object, prefix: str = DIGEST_PREFIX) -> str:
    """A settings value standing for `value` (JSON-able): `prefix` says how a refusal words it."""
    import hashlib
    import json

    return prefix + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def run_settings(config) -> dict[str, object]:
    """What DriverConfig.fingerprint hashes, in the flags' words (kept in run.json: a refused
    resume names what differs, as train-adapter's does). Not part of the fingerprint."""
    from dataclasses import asdict

    model_dir, spec = Path(config.model_dir), config.spec
    described: dict[str, object] = {
        # The model by where it lies and its files' sizes and times, not their digests: the
        # fingerprint hashed its hundreds of MB once already, and this is only for the message.
        "--model": files_identity(sorted(model_dir.glob("*.safetensors"))),
        "--method": config.method.name, "--bits": spec.bits, "--group-size": spec.group_size, "--sym": spec.symmetric,
        "--act-order": spec.act_order, "--dynamic-groups": not spec.static_groups, "--mse-clip": spec.mse_clip,
        "--damp": spec.damp_percent, "--max-samples": config.max_samples, "--max-tokens": config.max_tokens,
        "--batch-tokens": config.max_batch_tokens, "--task": ",".join(t.name for t in config.tasks),
    }
    described |= {f"mlgptq {key}": value for key, value in asdict(config.mlgptq).items()}
    for task in config.tasks:
        adapter = adapter_digest(task.adapter_dir)
        described[f"adapter of {task.name}"] = digest_of(adapter) if adapter is not None else "none"
        described[f"calibration of {task.name}"] = DIGEST_PREFIX + file_digest(task.calib_path)
    return described


def probe_bar(tasks: list, progress: bool = True):
    """The tasks, iterated under a tqdm bar like the layers' (mlgptq's cost probe ran 11-17 s
    on the suite before the layer bar showed anything)."""
    from tqdm import tqdm

    return tqdm(tasks, desc="probe task costs", unit="task", disable=not progress)


def out_overlaps_adapter_problem(out: Path, tasks: list) -> str | None:
    """Why `out` may not take a run's output beside the tasks' adapters, or None: inside one
    (or around it), UNFINISHED, .partial/ and the Hessian state landed among the adapter's
    files, as inputs.out_overlaps_model_problem refuses for --model."""
    resolved = Path(out).expanduser().resolve()
    for task in tasks:
        if task.adapter_dir is None:
            continue
        adapter = Path(task.adapter_dir).expanduser().resolve()
        if resolved == adapter or adapter in resolved.parents or resolved in adapter.parents:
            return (f"--out {resolved} overlaps the adapter {adapter} of task {task.name!r}: write the checkpoint "
                    "to a directory outside it")
    return None
