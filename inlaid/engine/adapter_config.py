"""Reading and validating PEFT LoRA adapter directories. Torch-free.

Accepts the subset of PEFT's LoRA that the engine computes exactly: any subset of the
seven projections, any rank, lora_alpha scaling and rsLoRA. Everything else (DoRA,
embedding or lm_head LoRA, per-module rank patterns, trained biases) is rejected with a
clear message rather than served wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter directory is missing, malformed or uses an unsupported PEFT feature."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_spec(name: str, path: str | Path) -> AdapterSpec:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: directory not found: {path}")
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_config.json (not a PEFT adapter)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_model.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {error}") from error

    def reject(feature: str) -> None:
        raise AdapterError(f"adapter {name!r}: {feature} is not supported")

    if config.get("peft_type", "LORA") != "LORA":
        reject(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        reject("DoRA (use_dora=true)")
    if config.get("modules_to_save"):
        reject(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        reject(f"bias={config['bias']!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        reject("rank_pattern/alpha_pattern (per-module ranks)")
    if config.get("layers_to_transform") is not None:
        reject("layers_to_transform")
    targets = config.get("target_modules")
    if targets == "all-linear":
        targets = list(PROJECTIONS)
    if isinstance(targets, str) or not targets:
        reject(f"target_modules={targets!r} (give a list of projection names)")
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        reject(f"LoRA on {unknown} (supported: {', '.join(PROJECTIONS)})")
    rank = int(config.get("r", 8))
    if rank < 1:
        raise AdapterError(f"adapter {name!r}: rank must be >= 1, got {rank}")
    return AdapterSpec(
        name=name,
        path=str(path),
        rank=rank,
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=tuple(p for p in PROJECTIONS if p in targets),
    )
