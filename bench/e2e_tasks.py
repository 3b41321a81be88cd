"""The 100-task workload of bench/e2e.py: the suite's adapters replicated under new names,
each LoRA weight perturbed, so that every task is a distinct adapter of known shape and
behaviour; written once and cached."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def replicated_adapters(families: dict[str, str], scale: float, seed: int) -> dict[str, Path]:
    """`replicate_adapters`, cached under `$XDG_CACHE_HOME/inlaid/e2e-tasks/<key>/`: the key
    hashes the sources' bytes, the names and families, the scale and the seed (100 copies
    take ~50 s to write, and every run draws the same ones)."""
    from inlaid.models.prepare import cache_root

    digest = hashlib.sha256(json.dumps([sorted(families.items()), scale, seed]).encode())
    for family in sorted(set(families.values())):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update((ADAPTERS / family / name).read_bytes())
    cached = cache_root() / "e2e-tasks" / digest.hexdigest()[:20]
    if not (cached / "complete").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        replicate_adapters(families, partial, scale, seed)
        (partial / "complete").write_text("")
        shutil.rmtree(cached, ignore_errors=True)
        partial.rename(cached)  # whole or absent: a killed run leaves only a temp dir
    return {name: cached / name for name in sorted(families)}


def replicate_adapters(families: dict[str, str], out_dir: Path, scale: float, seed: int) -> dict[str, Path]:
    """A copy of the suite adapter `families[name]` for each new task name, every LoRA weight
    multiplied by (1 + scale x N(0, 1)): distinct adapters of the same shapes and behaviour."""
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for name, family in sorted(families.items()):
        source, target = ADAPTERS / family, out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
        tensors = load_file(str(source / "adapter_model.safetensors"))
        noisy = {}
        for key, value in sorted(tensors.items()):
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            noisy[key] = (value.float() * (1 + scale * noise)).to(value.dtype)
        save_file(noisy, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        paths[name] = target
    return paths
