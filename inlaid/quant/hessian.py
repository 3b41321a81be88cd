"""Layer-input Hessians H = (2/n) X Xᵀ, accumulated as a running token average in fp32,
and the reconstruction error they measure."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inlaid.quant.errors import NonFiniteHessianError


@dataclass
class HessianAccumulator:
    """Running token average of 2 x xᵀ over every token fed in (tokens = rows of `inputs`).

    Averaging (rather than summing) keeps the magnitudes independent of how many tokens a
    task contributes, so tasks with different calibration sizes stay comparable, and fp32
    never overflows however long the calibration set.
    """

    features: int
    dtype: torch.dtype = torch.float32
    hessian: torch.Tensor = field(init=False)
    tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.hessian = torch.zeros(self.features, self.features, dtype=self.dtype)

    def add(self, inputs: torch.Tensor) -> None:
        """Add the tokens of `inputs` [..., features] (any leading shape)."""
        rows = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype)
        if rows.shape[-1] != self.features:
            raise ValueError(f"expected {self.features} input features, got {rows.shape[-1]}")
        count = rows.shape[0]
        if count == 0:
            return
        total = self.tokens + count
        self.hessian.mul_(self.tokens / total)
        # (2/total) X Xᵀ through one matmul: scale the rows by sqrt(2/total) first.
        scaled = rows * (2.0 / total) ** 0.5
        self.hessian.addmm_(scaled.T, scaled)
        self.tokens = total

    def merge(self, other: "HessianAccumulator") -> None:
        """Fold another accumulator's tokens in (token-weighted), as if fed the same rows."""
        total = self.tokens + other.tokens
        if total == 0:
            return
        self.hessian.mul_(self.tokens / total).add_(other.hessian, alpha=other.tokens / total)
        self.tokens = total


def check_finite(hessian: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(hessian).all()):
        raise NonFiniteHessianError(
            f"the Hessian of {where} holds NaN/Inf: the calibration forward overflowed "
            "(check the adapter and the calibration texts, or run the forward in fp32)"
        )


def quadratic_form_trace(matrix: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(A H Aᵀ): the product in fp32 (fast), the final sum in fp64 (accurate)."""
    product = matrix.float() @ hessian.float()
    return float((product.double() * matrix.double()).sum())


def reconstruction_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, reference: float | None = None
) -> float:
    """Relative output error ||(W-Q)X||² / ||WX||² for inputs X whose Hessian is `hessian`.

    With H = (2/n) X Xᵀ, ||A X||² = (n/2) tr(A H Aᵀ); the ratio needs only H. `reference`
    may pass a precomputed tr(W H Wᵀ).
    """
    if weight.dtype == torch.float64:
        delta = weight - quantized.to(torch.float64)
        hessian64 = hessian.to(torch.float64)
        error = float(((delta @ hessian64) * delta).sum())
        energy = float(((weight @ hessian64) * weight).sum()) if reference is None else reference
    else:
        error = quadratic_form_trace(weight.float() - quantized.float(), hessian)
        energy = quadratic_form_trace(weight, hessian) if reference is None else reference
    return error / energy if energy > 0 else error
