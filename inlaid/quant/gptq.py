"""GPTQ (Frantar et al., 2022), written from the paper's math, and round-to-nearest.

For a linear layer with weight W [rows=out, cols=in] and input Hessian H = (2/n) X Xᵀ,
GPTQ quantizes the columns one at a time and, after each, moves the not-yet-quantized
columns to the optimum of ||(W - Ŵ) X||² given the columns already fixed (the Optimal
Brain Surgeon update). With U the upper Cholesky factor of H⁻¹, the update for column i
is  W[:, i:] -= ((w_i - q_i) / U[i, i]) · U[i, i:].  Updates are applied lazily: inside a
block of `block_size` columns, and to the rest of the matrix once per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inlaid.quant.errors import CholeskyFailedError, NonFiniteHessianError
from inlaid.quant.grid import Grid, find_grid
from inlaid.quant.hessian import check_finite
from inlaid.quant.spec import QuantSpec

_DAMP_GROWTH = 10.0
_DAMP_ATTEMPTS = 6


@dataclass
class QuantizedWeight:
    """One quantized linear weight in nn.Linear orientation (codes [out, in]).

    w[r, k] ≈ scales[g_idx[k], r] * (codes[r, k] - zeros[g_idx[k], r]).
    """

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 [groups, out], exactly fp16-representable
    zeros: torch.Tensor  # int32 [groups, out], in [0, 2^bits - 1]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # the effective size (in_features for per-channel)
    damp: float = 0.0  # absolute dampening added to the Hessian diagonal

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        index = self.g_idx.long()
        scales = self.scales.to(dtype)[index].T  # [out, in]
        zeros = self.zeros.to(dtype)[index].T
        return scales * (self.codes.to(dtype) - zeros)


def _inverse_cholesky(hessian: torch.Tensor, damp_percent: float, live: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·I)⁻¹, raising damp until both factorizations succeed."""
    diagonal = torch.diagonal(hessian)
    mean_diag = float(diagonal[live].mean()) if bool(live.any()) else 1.0
    damp = damp_percent * mean_diag
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for _ in range(_DAMP_ATTEMPTS + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * identity)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        damp = damp * _DAMP_GROWTH if damp > 0 else 0.01 * mean_diag
    raise CholeskyFailedError(
        f"Hessian not positive-definite even with dampening {damp / _DAMP_GROWTH:.3g} "
        f"({damp / _DAMP_GROWTH / mean_diag:.3g} x mean diagonal)"
    )


def _current_columns(
    work_t: torch.Tensor, block_t: torch.Tensor, block_errors_t: torch.Tensor,
    inverse_upper: torch.Tensor, block_start: int, offset: int, block_end: int, end: int,
) -> torch.Tensor:
    """Columns [block_start+offset, end) as they stand now, as [rows, n], including the lazy
    updates that the current block has not yet pushed to columns past its end.

    (Transposed storage: row j of `work_t` / `block_t` is weight column j.)"""
    inside = block_t[offset : min(end, block_end) - block_start]
    if end <= block_end:
        return inside.T
    pending = inverse_upper[block_start : block_start + offset, block_end:end].T @ block_errors_t[:offset]
    return torch.cat([inside, work_t[block_end:end] - pending], dim=0).T


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, compute_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Quantize `weight` [out, in] against the input Hessian `hessian` [in, in]."""
    dtype = compute_dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
    work = weight.detach().to(dtype).clone()
    rows, cols = work.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}")
    check_finite(hessian, "this layer")
    if not bool(torch.isfinite(work).all()):
        raise NonFiniteHessianError("the weight itself holds NaN/Inf")
    hess = hessian.detach().to(dtype).clone()

    # A column whose input is always 0 cannot affect the output on this data: give it a unit
    # diagonal so the factorization works; its zero off-diagonals isolate it from the
    # updates, so it is simply rounded to nearest (its weight is kept, not zeroed).
    diagonal = torch.diagonal(hess)
    dead = diagonal == 0
    diagonal[dead] = 1.0

    group = spec.effective_group_size(cols)
    n_groups = spec.num_groups(cols)
    max_q = spec.max_q
    scales = torch.zeros(n_groups, rows, dtype=dtype)
    zeros = torch.zeros(n_groups, rows, dtype=dtype)
    g_idx = torch.zeros(cols, dtype=torch.int32)

    static_grids: list[Grid] | None = None
    if spec.group_size == -1 or (spec.act_order and spec.static_groups):
        static_grids = []
        for g in range(n_groups):
            grid = find_grid(work[:, g * group : (g + 1) * group], spec)
            static_grids.append(grid)
            scales[g], zeros[g] = grid.scale, grid.zero
        g_idx = (torch.arange(cols) // group).to(torch.int32)

    if spec.act_order:
        perm = torch.argsort(torch.diagonal(hess), descending=True, stable=True)
        work = work[:, perm]
        hess = hess[perm][:, perm]
    else:
        perm = torch.arange(cols)
    inverse_upper, damp = _inverse_cholesky(hess, spec.damp_percent, ~dead[perm])

    # Columns are stored as rows (work_t[j] = column j) so each rank-1 update of the
    # not-yet-quantized columns touches contiguous memory.
    work_t = work.T.contiguous()
    codes_t = torch.zeros(cols, rows, dtype=dtype)
    grid: Grid | None = None
    for block_start in range(0, cols, spec.block_size):
        block_end = min(block_start + spec.block_size, cols)
        block_t = work_t[block_start:block_end].clone()
        block_errors_t = torch.zeros_like(block_t)
        block_inverse = inverse_upper[block_start:block_end, block_start:block_end]
        for offset in range(block_end - block_start):
            position = block_start + offset
            original_column = int(perm[position])
            if static_grids is not None:
                grid = static_grids[original_column // group]
            elif position % group == 0:
                # Dynamic groups take their grid from the columns' current (error-compensated)
                # values, in processing order.
                end = min(position + group, cols)
                current = _current_columns(
                    work_t, block_t, block_errors_t, inverse_upper, block_start, offset, block_end, end
                )
                grid = find_grid(current, spec)
                scales[position // group], zeros[position // group] = grid.scale, grid.zero
            if static_grids is None:
                g_idx[original_column] = position // group
            assert grid is not None
            column = block_t[offset]
            column_codes = grid.quantize(column, max_q)
            codes_t[position] = column_codes
            error = (column - grid.dequantize(column_codes)) / block_inverse[offset, offset]
            block_t[offset:].addr_(block_inverse[offset, offset:], error, alpha=-1.0)
            block_errors_t[offset] = error
        work_t[block_end:].addmm_(inverse_upper[block_start:block_end, block_end:].T, block_errors_t, alpha=-1.0)

    codes = codes_t.T
    codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.to(torch.float32),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        bits=spec.bits,
        group_size=group,
        damp=damp,
    )


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest with the same grids (min/max or MSE clip) per contiguous group."""
    work = weight.detach().to(torch.float32)
    rows, cols = work.shape
    group = spec.effective_group_size(cols)
    n_groups = spec.num_groups(cols)
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    scales = torch.zeros(n_groups, rows)
    zeros = torch.zeros(n_groups, rows)
    for g in range(n_groups):
        columns = work[:, g * group : (g + 1) * group]
        grid = find_grid(columns, spec)
        codes[:, g * group : (g + 1) * group] = grid.quantize(columns, spec.max_q)
        scales[g], zeros[g] = grid.scale, grid.zero
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=(torch.arange(cols) // group).to(torch.int32),
        bits=spec.bits,
        group_size=group,
    )
