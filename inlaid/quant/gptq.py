"""GPTQ (Frantar et al., 2022), written from the paper's math, and round-to-nearest.

For a linear layer with weight W [rows=out, cols=in] and input Hessian H = (2/n) X Xᵀ,
GPTQ quantizes the columns one at a time and, after each, moves the not-yet-quantized
columns to the optimum of ||(W - Ŵ) X||² given the columns already fixed (the Optimal
Brain Surgeon update). With U the upper Cholesky factor of H⁻¹, the update for column i
is  W[:, i:] -= ((w_i - q_i) / U[i, i]) · U[i, i:].  Updates are applied lazily: inside a
block of `block_size` columns, and to the rest of the matrix once per block.

`gptq_quantize_many` runs several independent problems with the same number of columns
(the linears reading one input: q/k/v, gate/up, or one linear under several Hessians) in
lockstep: each column step is one set of batched tensor operations for all of them, so the
per-column Python and dispatch cost (the bulk of GPTQ's time at these sizes) is paid once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from inlaid.quant.errors import CholeskyFailedError, NonFiniteHessianError
from inlaid.quant.grid import find_grid
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


def _triangular_inverse(lower: torch.Tensor) -> torch.Tensor | None:
    """L⁻¹ of a lower-triangular L by LAPACK's trtri (n³/3 flops; torch only offers a full
    triangular solve against the identity, n³). None if L is singular."""
    from scipy.linalg import lapack

    array = lower.numpy()
    trtri = lapack.get_lapack_funcs("trtri", (array,))
    inverse, info = trtri(array, lower=1)
    return torch.from_numpy(inverse) if info == 0 else None


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, live: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp·I)⁻¹ (UᵀU = (H + damp·I)⁻¹), raising damp until
    the factorization succeeds.

    With J the order-reversing permutation and J(H + damp·I)J = L Lᵀ, U = J L⁻¹ J (an upper
    factor with a positive diagonal is unique): one Cholesky and one triangular inverse, half
    the flops of a Cholesky, an inverse and a second Cholesky."""
    diagonal = torch.diagonal(hessian)
    mean_diag = float(diagonal[live].mean()) if bool(live.any()) else 1.0
    damp = damp_percent * mean_diag
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    flipped = hessian.flip(0, 1)
    for _ in range(_DAMP_ATTEMPTS + 1):
        lower, info = torch.linalg.cholesky_ex(flipped + damp * identity)
        if int(info) == 0:
            lower_inverse = _triangular_inverse(lower)
            if lower_inverse is not None and bool(torch.isfinite(lower_inverse).all()):
                return lower_inverse.flip(0, 1), damp
        damp = damp * _DAMP_GROWTH if damp > 0 else 0.01 * mean_diag
    raise CholeskyFailedError(
        f"Hessian not positive-definite even with dampening {damp / _DAMP_GROWTH:.3g} "
        f"({damp / _DAMP_GROWTH / mean_diag:.3g} x mean diagonal)"
    )


def _current_columns(
    work_t: torch.Tensor, block_t: torch.Tensor, block_errors_t: torch.Tensor,
    inverse_upper: torch.Tensor, block_start: int, offset: int, block_end: int, end: int,
) -> torch.Tensor:
    """Columns [block_start+offset, end) as they stand now, as [problems, rows, n], including
    the lazy updates that the current block has not yet pushed to columns past its end.

    (Transposed storage: [p, j] of `work_t` / `block_t` is problem p's weight column j.)"""
    inside = block_t[:, offset : min(end, block_end) - block_start]
    if end <= block_end:
        return inside.transpose(1, 2)
    pending = inverse_upper[:, block_start : block_start + offset, block_end:end].transpose(1, 2) @ block_errors_t[:, :offset]
    return torch.cat([inside, work_t[:, block_end:end] - pending], dim=1).transpose(1, 2)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, compute_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Quantize `weight` [out, in] against the input Hessian `hessian` [in, in]."""
    return gptq_quantize_many([weight], [hessian], spec, compute_dtype)[0]


def gptq_quantize_many(
    weights: Sequence[torch.Tensor], hessians: Sequence[torch.Tensor], spec: QuantSpec,
    compute_dtype: torch.dtype | None = None,
) -> list[QuantizedWeight]:
    """Quantize each `weights[p]` [out_p, in] against `hessians[p]` [in, in], all in lockstep.

    Every problem gets exactly what `gptq_quantize` alone would give it (the same
    operations, batched; rows are padded with zeros to the widest problem and dropped).
    A Hessian passed for several problems (the same tensor object) is factorized once."""
    if len(weights) != len(hessians) or not weights:
        raise ValueError(f"need one Hessian per weight, got {len(weights)} weights and {len(hessians)} Hessians")
    dtype = compute_dtype or (torch.float64 if weights[0].dtype == torch.float64 else torch.float32)
    cols = weights[0].shape[1]
    row_counts = [int(w.shape[0]) for w in weights]
    problems, rows = len(weights), max(row_counts)
    work = torch.zeros(problems, rows, cols, dtype=dtype)
    for index, (weight, hessian) in enumerate(zip(weights, hessians)):
        if weight.shape[1] != cols or hessian.shape != (cols, cols):
            raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}"
                             if hessian.shape[0] != weight.shape[1] else "weights of one batch need the same in_features")
        if not bool(torch.isfinite(weight).all()):
            raise NonFiniteHessianError("the weight itself holds NaN/Inf")
        work[index, : row_counts[index]] = weight.detach()
    distinct: dict[int, int] = {}  # id(hessian) -> its index among the distinct ones
    for hessian in hessians:
        if id(hessian) not in distinct:
            check_finite(hessian, "this layer")
            distinct[id(hessian)] = len(distinct)
    hess = torch.stack([h.detach().to(dtype) for h in {id(h): h for h in hessians}.values()])
    source = torch.tensor([distinct[id(h)] for h in hessians])

    # A column whose input is always 0 cannot affect the output on this data: give it a unit
    # diagonal so the factorization works; its zero off-diagonals isolate it from the
    # updates, so it is simply rounded to nearest (its weight is kept, not zeroed).
    diagonal = torch.diagonal(hess, dim1=1, dim2=2)
    dead = diagonal == 0
    diagonal[dead] = 1.0

    group = spec.effective_group_size(cols)
    n_groups = spec.num_groups(cols)
    max_q = spec.max_q
    scales = torch.zeros(problems, n_groups, rows, dtype=dtype)
    zeros = torch.zeros(problems, n_groups, rows, dtype=dtype)
    static = spec.group_size == -1 or (spec.act_order and spec.static_groups)
    if static:
        for g in range(n_groups):
            columns = work[:, :, g * group : (g + 1) * group]
            grid = find_grid(columns.reshape(problems * rows, -1), spec)
            scales[:, g], zeros[:, g] = grid.scale.view(problems, rows), grid.zero.view(problems, rows)

    # Processing order per distinct Hessian (act-order: decreasing diagonal), its factor.
    if spec.act_order:
        orders = torch.argsort(torch.diagonal(hess, dim1=1, dim2=2), dim=1, descending=True, stable=True)
    else:
        orders = torch.arange(cols).expand(len(hess), cols)
    factors, damps = [], []
    for index, order in enumerate(orders):
        ordered, live = hess[index], ~dead[index]
        if spec.act_order:
            ordered, live = ordered[order][:, order], live[order]
        factor, damp = inverse_cholesky(ordered, spec.damp_percent, live)
        factors.append(factor)
        damps.append(damp)
    perm = orders[source]  # [problems, cols]
    all_distinct = len(factors) == problems
    inverse_upper = torch.stack(factors) if all_distinct else torch.stack([factors[int(i)] for i in source])
    if spec.act_order:
        work = torch.gather(work, 2, perm[:, None, :].expand(problems, rows, cols))
    problem_index = torch.arange(problems)
    group_of_position = perm // group  # static groups: the group of the column processed at each position

    # Columns are stored as rows ([p, j] = problem p's column j) so each rank-1 update of the
    # not-yet-quantized columns touches contiguous memory.
    work_t = work.transpose(1, 2).contiguous()
    codes_t = torch.zeros(problems, cols, rows, dtype=dtype)
    scale = zero = None
    for block_start in range(0, cols, spec.block_size):
        block_end = min(block_start + spec.block_size, cols)
        block_t = work_t[:, block_start:block_end].clone()
        block_errors_t = torch.zeros_like(block_t)
        block_inverse = inverse_upper[:, block_start:block_end, block_start:block_end]
        block_diagonal = torch.diagonal(block_inverse, dim1=1, dim2=2).unsqueeze(2)
        for offset in range(block_end - block_start):
            position = block_start + offset
            if static:
                if spec.act_order or scale is None:
                    g = group_of_position[:, position]
                    scale, zero = scales[problem_index, g], zeros[problem_index, g]
            elif position % group == 0:
                # Dynamic groups take their grid from the columns' current (error-compensated)
                # values, in processing order.
                end = min(position + group, cols)
                current = _current_columns(
                    work_t, block_t, block_errors_t, inverse_upper, block_start, offset, block_end, end
                )
                grid = find_grid(current.reshape(problems * rows, -1), spec)
                scale, zero = grid.scale.view(problems, rows), grid.zero.view(problems, rows)
                scales[:, position // group], zeros[:, position // group] = scale, zero
            # The Grid convention (grid.py) on [problems, rows] at once, written in place into
            # the codes and errors (the same operations as Grid.quantize / dequantize, without
            # temporaries: the per-column dispatch cost is most of GPTQ's time here).
            column = block_t[:, offset]
            column_codes = torch.div(column, scale, out=codes_t[:, position]).round_().add_(zero).clamp_(0, max_q)
            error = torch.sub(column_codes, zero, out=block_errors_t[:, offset]).mul_(scale)
            torch.sub(column, error, out=error).div_(block_diagonal[:, offset])
            block_t[:, offset:].baddbmm_(block_inverse[:, offset, offset:].unsqueeze(2), error.unsqueeze(1), alpha=-1.0)
        work_t[:, block_end:].baddbmm_(inverse_upper[:, block_start:block_end, block_end:].transpose(1, 2),
                                       block_errors_t, alpha=-1.0)

    codes = torch.empty_like(codes_t)
    codes.scatter_(1, perm[:, :, None].expand(problems, cols, rows), codes_t)  # back to the original column order
    if static:
        g_idx = (torch.arange(cols) // group).to(torch.int32).expand(problems, cols)
    else:
        g_idx = torch.empty(problems, cols, dtype=torch.int32)
        g_idx.scatter_(1, perm, (torch.arange(cols) // group).to(torch.int32).expand(problems, cols).contiguous())
    return [
        QuantizedWeight(
            codes=codes[p, :, : row_counts[p]].T.to(torch.uint8).contiguous(),
            scales=scales[p, :, : row_counts[p]].to(torch.float32).contiguous(),
            zeros=zeros[p, :, : row_counts[p]].to(torch.int32).contiguous(),
            g_idx=g_idx[p].clone(),  # its own storage: static g_idx is one expanded row for all
            bits=spec.bits,
            group_size=group,
            damp=damps[int(source[p])],
        )
        for p in range(problems)
    ]


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
