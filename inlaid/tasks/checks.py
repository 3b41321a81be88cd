"""Checks `inlaid eval` and `inlaid train-adapter` run before any model loads (torch-free).

Returns a one-line problem or None, so a bad adapter costs a usage error at once, not a
silently empty score after the whole run. (Output paths: inlaid/cli_args.py.)
"""

from __future__ import annotations

from pathlib import Path


def adapter_problem(model_dir: Path, adapters: dict[str, Path]) -> str | None:
    """The first adapter the engine could not serve on `model_dir`, checked as the server
    checks one (`check_servable_adapter`: config, every shape against this base, finite
    values), or None. `eval` sizes its engine's LoRA pools to its adapters, so the rank
    bound is the engine's largest. Without this an adapter for another base made every
    request fail inside the engine and `eval` scored the empty outputs (accuracy 0, exit 0)."""
    from inlaid.engine.adapter_config import AdapterError
    from inlaid.engine.adapter_weights import check_servable_adapter
    from inlaid.engine.config import MAX_LORA_RANK, ModelConfig

    if not adapters or not (Path(model_dir) / "config.json").is_file():
        return None  # a missing model is reported by the model check / the model load
    model = ModelConfig.from_dir(model_dir)
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            return f"adapter '{name}': no adapter_config.json in {path}"
        try:
            check_servable_adapter(name, str(path), model, MAX_LORA_RANK)
        except AdapterError as error:
            return str(error)
    return None

