"""The settings of one quantization run (bits, groups, ordering, dampening)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from inlaid.quant.errors import InvalidQuantSpecError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized.

    group_size: input columns sharing one scale/zero per output row; -1 = one group over
    the whole input (per-channel). act_order: process columns by decreasing Hessian
    diagonal; with static_groups the groups stay contiguous in the ORIGINAL column order
    (g_idx stays k // group_size, which low-bit kernels prefer) and their grids are fixed
    from the unmodified weight before any error compensation.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = True
    mse_clip: bool = False
    clip_max_shrink: float = 0.8
    clip_grid_steps: int = 40
    clip_norm: float = 2.4
    damp_percent: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InvalidQuantSpecError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise InvalidQuantSpecError(f"group_size must be -1 or positive, got {self.group_size}")
        if not 0.0 <= self.damp_percent < 10.0:
            raise InvalidQuantSpecError(f"damp_percent must be in [0, 10), got {self.damp_percent}")
        if self.block_size < 1:
            raise InvalidQuantSpecError(f"block_size must be positive, got {self.block_size}")
        if not 0.0 < self.clip_max_shrink <= 1.0:
            raise InvalidQuantSpecError(f"clip_max_shrink must be in (0, 1], got {self.clip_max_shrink}")
        if self.clip_grid_steps < 1:
            raise InvalidQuantSpecError("clip_grid_steps must be positive")

    @property
    def max_q(self) -> int:
        return (1 << self.bits) - 1

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        size = self.effective_group_size(in_features)
        return (in_features + size - 1) // size

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
