"""Uniform quantization grids: one (scale, integer zero) per output row of a column group.

Convention (GPTQ checkpoint format): w ≈ scale * (q - zero), q in [0, 2^bits - 1], zero an
integer. Scales are rounded to fp16 here, where they are chosen, so the dequantized weight
GPTQ compensates against is exactly the one the checkpoint reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inlaid.quant.spec import QuantSpec

# fp16's smallest normal number: scales below it would lose precision when stored.
_MIN_SCALE = 6.2e-5


@dataclass
class Grid:
    """Per-row grid of one column group: scale[rows], zero[rows] (integer-valued floats)."""

    scale: torch.Tensor
    zero: torch.Tensor

    def quantize(self, columns: torch.Tensor, max_q: int) -> torch.Tensor:
        """Integer codes (as floats) of columns [rows] or [rows, cols]."""
        scale, zero = self._broadcast(columns)
        return torch.clamp(torch.round(columns / scale) + zero, 0, max_q)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self._broadcast(codes)
        return scale * (codes - zero)

    def fake_quantize(self, columns: torch.Tensor, max_q: int) -> torch.Tensor:
        return self.dequantize(self.quantize(columns, max_q))

    def _broadcast(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.dim() == 1:
            return self.scale, self.zero
        return self.scale.unsqueeze(1), self.zero.unsqueeze(1)


def _minmax_grid(low: torch.Tensor, high: torch.Tensor, spec: QuantSpec) -> Grid:
    """Grid covering [low, high] per row (low <= 0 <= high already)."""
    max_q = spec.max_q
    if spec.symmetric:
        bound = torch.maximum(-low, high)
        bound = torch.where(bound == 0, torch.ones_like(bound), bound)
        scale = _round_scale(2.0 * bound / max_q)
        zero = torch.full_like(scale, float((max_q + 1) // 2))
        return Grid(scale, zero)
    both_zero = (low == 0) & (high == 0)
    low = torch.where(both_zero, -torch.ones_like(low), low)
    high = torch.where(both_zero, torch.ones_like(high), high)
    scale = _round_scale((high - low) / max_q)
    zero = torch.round(-low / scale)
    # GPTQ's v1 qzeros store zero-1, so zero=0 cannot be written: rows whose range starts
    # at 0 get zero=1 and a scale stretched so that `high` is still reachable.
    needs_shift = zero < 1
    if bool(needs_shift.any()):
        stretched = _round_scale(high / (max_q - 1))
        scale = torch.where(needs_shift, stretched, scale)
        zero = torch.where(needs_shift, torch.ones_like(zero), zero)
    zero = torch.clamp(zero, 1, max_q)
    return Grid(scale, zero)


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a scale UP to the next fp16 value, so the range it was chosen for stays covered."""
    wanted = scale.clamp_min(_MIN_SCALE)
    half = wanted.to(torch.float16)
    too_small = half.to(wanted.dtype) < wanted
    half = torch.where(too_small, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.to(scale.dtype)


def find_grid(columns: torch.Tensor, spec: QuantSpec) -> Grid:
    """Grid for a column group `columns` [rows, cols]: min/max range, or the shrunk range
    that minimises the rows' ||w - Q(w)||_p (p = spec.clip_norm) when spec.mse_clip."""
    low = columns.min(dim=1).values.clamp(max=0)
    high = columns.max(dim=1).values.clamp(min=0)
    best = _minmax_grid(low, high, spec)
    if not spec.mse_clip:
        return best
    best_error = _row_error(columns, best, spec)
    for step in range(1, spec.clip_grid_steps + 1):
        shrink = 1.0 - (1.0 - spec.clip_max_shrink) * step / spec.clip_grid_steps
        candidate = _minmax_grid(low * shrink, high * shrink, spec)
        error = _row_error(columns, candidate, spec)
        better = error < best_error
        if bool(better.any()):
            best = Grid(
                torch.where(better, candidate.scale, best.scale),
                torch.where(better, candidate.zero, best.zero),
            )
            best_error = torch.where(better, error, best_error)
    return best


def _row_error(columns: torch.Tensor, grid: Grid, spec: QuantSpec) -> torch.Tensor:
    residual = (grid.fake_quantize(columns, spec.max_q) - columns).abs()
    return residual.pow(spec.clip_norm).sum(dim=1)
