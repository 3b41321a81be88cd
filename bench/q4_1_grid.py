"""The default model's weights already lie on a 4-bit grid: what that means for group sizes.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF: every decoder linear is stored in blocks of 32
consecutive input weights per output row, each block `w = d·q + m` with q in 0..15 and its
own fp16 scale d and minimum m (the token embedding is Q8_0). The float model Inlaid converts
is those dequantized values. This script measures, on the converted weights:

- how many 32-blocks hold at most 16 distinct levels spaced (max - min)/15 apart (Q4_1's grid);
- round-to-nearest error ‖W - Q‖²/‖W‖² of Inlaid's GPTQ-format grid (integer zero point,
  fp16 scale) at group sizes 32, 64, 128 and per channel, 4 and 3 bits, against a grid with a
  free (float) minimum at g32 — Q4_1's own, which reproduces the weights exactly.

    python bench/q4_1_grid.py          # writes bench/results/q4_1_grid.{json,md}, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BLOCK = 32


def _on_q4_1_grid(weight: torch.Tensor, tolerance: float = 2e-3) -> torch.Tensor:
    """Per 32-block of each row: do its values sit on min + k·(max-min)/15, k integer?"""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK).double()
    low, high = blocks.min(dim=2, keepdim=True).values, blocks.max(dim=2, keepdim=True).values
    step = ((high - low) / 15).clamp_min(1e-12)
    levels = (blocks - low) / step
    return ((levels - levels.round()).abs() <= tolerance).all(dim=2)


def _float_min_grid_error(weight: torch.Tensor, bits: int) -> float:
    """Squared error of RTN on a grid with a free minimum per 32-block (Q4_1-style), summed."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK).double()
    low, high = blocks.min(dim=2, keepdim=True).values, blocks.max(dim=2, keepdim=True).values
    levels = (1 << bits) - 1
    step = ((high - low) / levels).clamp_min(1e-12)
    fake = low + ((blocks - low) / step).round().clamp(0, levels) * step
    return float(((fake - blocks) ** 2).sum())


def main(argv: list[str] | None = None) -> int:
    from safetensors import safe_open

    from inlaid.models.prepare import default_model_dir
    from inlaid.quant.gptq import rtn_quantize
    from inlaid.quant.model_io import LINEAR_NAMES
    from inlaid.quant.spec import QuantSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "q4_1_grid.json")
    args = parser.parse_args(argv if argv is not None else [])
    torch.set_num_threads(1)
    files = sorted(default_model_dir().glob("*.safetensors"))
    groups = (32, 64, 128, -1)
    squared = {(bits, group): 0.0 for bits in (4, 3) for group in groups}
    free_min = {4: 0.0, 3: 0.0}
    energy = 0.0
    blocks_on_grid = blocks_total = 0
    per_linear: dict[str, float] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if not any(key.endswith(f"{name}.weight") for name in LINEAR_NAMES):
                    continue
                weight = handle.get_tensor(key).float()
                on_grid = _on_q4_1_grid(weight)
                blocks_on_grid += int(on_grid.sum())
                blocks_total += on_grid.numel()
                per_linear[key] = float(on_grid.float().mean())
                energy += float((weight.double() ** 2).sum())
                for bits, group in squared:
                    fake = rtn_quantize(weight, QuantSpec(bits=bits, group_size=group)).dequantize(torch.float64)
                    squared[(bits, group)] += float(((fake - weight.double()) ** 2).sum())
                for bits in free_min:
                    free_min[bits] += _float_min_grid_error(weight, bits)
    result = {
        "model": str(default_model_dir()), "linears": len(per_linear), "blocks": blocks_total,
        "blocks_on_16_level_grid": blocks_on_grid,
        "rtn_relative_error": {f"{bits}-bit g{group}": squared[(bits, group)] / energy for bits, group in squared},
        "free_min_g32_relative_error": {f"{bits}-bit": free_min[bits] / energy for bits in free_min},
        "least_on_grid_linear": min(per_linear.items(), key=lambda item: item[1]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF), {result['linears']} decoder linears: "
        f"{blocks_on_grid} of {blocks_total} blocks of 32 input weights ({100 * blocks_on_grid / blocks_total:.2f} %) "
        "hold at most 16 levels spaced (max - min)/15 apart.", "",
        "Round-to-nearest relative weight error ‖W − Q‖²/‖W‖² (×1e-3), all decoder linears:", "",
        "| grid | 4-bit | 3-bit |", "|---|---|---|",
    ]
    for group in groups:
        name = "per channel" if group == -1 else f"g{group}"
        lines.append(f"| GPTQ format (integer zero, fp16 scale), {name} | "
                     f"{1e3 * squared[(4, group)] / energy:.3f} | {1e3 * squared[(3, group)] / energy:.3f} |")
    lines.append(f"| free float minimum per 32-block (Q4_1's grid) | {1e3 * free_min[4] / energy:.3f} | "
                 f"{1e3 * free_min[3] / energy:.3f} |")
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
