"""A GPTQ checkpoint's files checked by what is cheap to read (marks, config.json, the weights'
safetensors header), before any model loads. Torch-free: `inlaid serve` checks
model.quantized_dir with it before an executor starts."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError

from inlaid.quant.errors import CheckpointError
from inlaid.quant.unfinished import unfinished_problem

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "inlaid_quant.json"  # Inlaid's record beside the GPTQ tensors (absent in others' checkpoints)


def is_gptq_checkpoint(model_dir: Path) -> bool:
    """Whether `model_dir`'s config.json declares a quantization: the engine loads it quantized,
    transformers only through optimum."""
    config_path = Path(model_dir) / "config.json"
    return config_path.is_file() and "quantization_config" in json.loads(config_path.read_text())


def read_inlaid_metadata(checkpoint_dir: Path) -> dict | None:
    """The checkpoint's inlaid_quant.json, None when it has none; CheckpointError naming the
    file when it is not a JSON object (the bare JSON parser's words reached the user)."""
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}): the checkpoint is corrupt; rebuild it") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is not a JSON object: the checkpoint is corrupt; rebuild it")
    return metadata


_CORRUPT_CHECKPOINT = ": the checkpoint is corrupt; rebuild it"


def corrupt_weights_error(weights_path: Path, error: SafetensorError) -> CheckpointError:
    from inlaid.cli_args import damaged_safetensors

    return CheckpointError(damaged_safetensors(weights_path, error, _CORRUPT_CHECKPOINT))


def weights_file_problem(weights_path: Path) -> str | None:
    """What is wrong with a checkpoint's safetensors file by its header (read, not its tensors:
    cheap enough to check before a model loads), or None. A truncated file or a garbled header
    otherwise surfaced as the library's "incomplete metadata, file not fully covered"."""
    from inlaid.cli_args import safetensors_problem

    return safetensors_problem(weights_path, _CORRUPT_CHECKPOINT)


def quantized_dir_problem(checkpoint_dir: Path, float_hint: str = "give the float model as --model") -> str | None:
    """Why `checkpoint_dir` is not a loadable GPTQ checkpoint by its files (marks, config, the
    weights' header), or None; `float_hint` says where a float model goes instead (a float
    model folder given as the checkpoint was served unquantized)."""
    checkpoint_dir = Path(checkpoint_dir)
    if unfinished := unfinished_problem(checkpoint_dir):
        return unfinished
    config_path, weights_path = checkpoint_dir / "config.json", checkpoint_dir / WEIGHTS_FILE
    if not config_path.is_file():
        return f"{checkpoint_dir} is not a quantized checkpoint (config.json + {WEIGHTS_FILE})"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{config_path} is not readable JSON ({error}): the checkpoint is corrupt; rebuild it"
    if not isinstance(config, dict):
        return f"{config_path} is not a JSON object: the checkpoint is corrupt; rebuild it"
    # Before the weights file: a float model folder (often sharded) is told what it is.
    if config.get("quantization_config") is None and not (checkpoint_dir / "quantize_config.json").is_file():
        return (f"{checkpoint_dir}: config.json has no GPTQ quantization_config: not a quantized checkpoint "
                f"({float_hint})")
    if not weights_path.is_file():
        return f"{checkpoint_dir} is not a quantized checkpoint (config.json + {WEIGHTS_FILE})"
    try:
        read_inlaid_metadata(checkpoint_dir)
    except CheckpointError as error:
        return str(error)
    return weights_file_problem(weights_path)
