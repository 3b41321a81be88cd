"""Checks `inlaid eval` and `inlaid train-adapter` run before any model loads (torch-free).

Returns a one-line problem or None, so a bad adapter costs a usage error at once, not a
silently empty score after the whole run. (Output paths: inlaid/cli_args.py.)
"""

from __future__ import annotations

from pathlib import Path


def adapter_problem(model_dir: Path, adapters: dict[str, Path], max_rank: int | None = None) -> str | None:
    """The first adapter the engine could not serve on `model_dir`, checked as the server
    checks one (`check_servable_adapter`: config, every shape against this base, finite
    values), or None. `eval` and `generate` size their engine's LoRA pools to their adapters,
    so their rank bound (`max_rank` None) is the engine's largest. Without this an adapter for
    another base made every request fail inside the engine and `eval` scored the empty
    outputs (accuracy 0, exit 0)."""
    from inlaid.engine.adapter_config import AdapterError
    from inlaid.engine.adapter_weights import check_servable_adapter
    from inlaid.engine.config import MAX_LORA_RANK, ModelConfig

    if not adapters or not (Path(model_dir) / "config.json").is_file():
        return None  # a missing model is reported by the model check / the model load
    model = ModelConfig.from_dir(model_dir)
    for name, path in adapters.items():
        if not Path(path).is_dir():  # as generate, quantize and serve say it
            return f"adapter '{name}': directory not found: {path}"
        if not (Path(path) / "adapter_config.json").is_file():
            return f"adapter '{name}': no adapter_config.json in {path}"
        try:
            check_servable_adapter(name, str(path), model, MAX_LORA_RANK if max_rank is None else max_rank)
        except AdapterError as error:
            return str(error)
    return None



def base_model_warnings(model_dir: Path, adapters: dict[str, Path]) -> list[str]:
    """One line per adapter whose adapter_config.json names another base model than
    `model_dir` (compared by the last component of `base_model_name_or_path`, so a hub id
    `org/Name` or another machine's cache path of the same model match): a warning, not a
    refusal. The shapes (`adapter_problem`) decide whether it can be served; a name alone
    may be a fine-tune or a copy of this base, and it was served without a word."""
    import json

    this = _float_base_name(Path(model_dir))
    warnings = []
    for name, path in adapters.items():
        try:
            named = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable config is `adapter_problem`'s to report
        if not isinstance(named, str) or not named.strip():
            continue
        other = Path(named.rstrip("/\\").replace("\\", "/")).name
        if other and other.lower() != this.lower():
            warnings.append(f"adapter {name!r} was trained for base model {named!r} (its adapter_config.json's "
                            f"base_model_name_or_path), not this model {this!r}; served because its shapes fit")
    return warnings


def task_mismatch_warnings(runs: list[tuple[str, Path]]) -> list[str]:
    """One line per (task, adapter) pair whose adapter's training.json (written by `inlaid
    train-adapter`) names another task: scored on a task it was not trained for, it read as a
    broken adapter (unparsed 100 %) without a word. Adapters without that file: nothing said."""
    import json

    warnings = []
    for task, path in runs:
        try:
            trained = json.loads((Path(path) / "training.json").read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            continue
        # (a task of your own is NAME=PATH: its name is what says which task)
        if isinstance(trained, str) and trained and trained.split("=", 1)[0] != task.split("=", 1)[0]:
            warnings.append(f"adapter {str(path)!r} was trained for task {trained!r} (its training.json), "
                            f"scored here on {task!r}")
    return warnings


def _float_base_name(model_dir: Path) -> str:
    """The name of the float model `model_dir` is, or was quantized from: a checkpoint of
    `inlaid quantize` records its base (an adapter of that base read "not this model
    'mlgptq3'" when scored on the checkpoint, an outside probe)."""
    from inlaid.quant.checkpoint_files import read_inlaid_metadata
    from inlaid.quant.errors import CheckpointError

    try:
        base = (read_inlaid_metadata(model_dir) or {}).get("base_model")
    except CheckpointError:  # the checkpoint's own checks report it
        base = None
    return Path(base).name if isinstance(base, str) and base.strip() else Path(model_dir).resolve().name
