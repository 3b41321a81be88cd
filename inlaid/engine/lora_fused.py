"""The LoRA expand folded into the base matmul, for narrow (bf16) dense weights on the CPU.

At decode sizes a separate expand matmul per slice costs as much as a third of the base
matmul (measured: 16 tokens, gate|up of SmolLM2, fp32 expand 184 us vs bf16 base 384 us),
while widening the base matmul's inner dimension by the pools' columns costs almost nothing
(bf16, K 576 -> 704: within noise). So every slot's B, pre-scaled, sits beside the base
weight as extra input columns, and a step computes

    v = (x @ A_all.T) * token_slot_mask          [T, S * n_slices * R], zero outside each token's slot
    y = [x | v] @ [W | B_all].T                  one matmul: base + every token's own LoRA

Row s * n_slices * R + i * R + r of A_all holds A_i[s][r]; the same column of B_all holds
scale_i[s] * B_i[s][:, r] on slice i's output rows and zero on every other slice's rows.

A decode step is bound by memory traffic (every weight is read once per step), so A_all and
B_all are kept in the weight dtype (bf16) like the base: the float32 pools would add twice
their bytes. x is rounded to bf16 once, for the shrink and the base alike. Float32 weights
never take this path. Both matrices are multiplied pre-packed for oneDNN (kernels/dense_cpu.py),
re-packed after an adapter is written into a slot (where oneDNN has bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inlaid.kernels.dispatch import PackedDenseWeight
from inlaid.kernels.lora_cpu import DENSE_MAX_TOKEN_SLOTS

# Only worth it while the pools' columns are a modest fraction of the base's K: beyond
# this the widened matmul reads more zero columns than the separate expands would cost.
MAX_EXTRA_COLUMNS_PER_K = 1.0
# Tokens x slots above which the shrink of every token against every slot wastes more than
# the per-adapter route saves: the CPU's masked route has the same trade, and its bound.
MAX_TOKEN_SLOTS = DENSE_MAX_TOKEN_SLOTS


class FusedExpandWeight:
    """[W | B_all] for one (possibly fused) projection; `weight` is the base's view of it.

    weight: the base [N, K] (a view into `combined`, so the base path reads the same memory)
    combined: [N, K + S * n_slices * R] in the weight dtype
    """

    def __init__(self, weight: torch.Tensor, slice_offsets: list[int], num_slots: int, max_rank: int,
                 pack: bool = True) -> None:
        """slice_offsets: first output row of each slice of the (fused) projection; pack:
        multiply through oneDNN-packed copies."""
        out_features, in_features = weight.shape
        self.in_features = in_features
        self.slice_offsets = list(slice_offsets)
        self.num_slots, self.max_rank = num_slots, max_rank
        self.columns_per_slot = len(slice_offsets) * max_rank
        self.combined = torch.zeros(out_features, in_features + num_slots * self.columns_per_slot,
                                    dtype=weight.dtype, device=weight.device)
        self.combined[:, :in_features].copy_(weight)
        self.weight = self.combined[:, :in_features]
        self.shrink = torch.zeros(num_slots * self.columns_per_slot, in_features, dtype=weight.dtype,
                                  device=weight.device)
        self.packed_combined = PackedDenseWeight(self.combined, pack)
        self.packed_shrink = PackedDenseWeight(self.shrink, pack)

    @staticmethod
    def worth_it(in_features: int, n_slices: int, num_slots: int, max_rank: int) -> bool:
        return num_slots * n_slices * max_rank <= MAX_EXTRA_COLUMNS_PER_K * in_features

    def clear_slot(self, slot: int) -> None:
        start = slot * self.columns_per_slot
        self.shrink[start : start + self.columns_per_slot].zero_()
        start += self.in_features
        self.combined[:, start : start + self.columns_per_slot].zero_()
        self.packed_combined.invalidate()
        self.packed_shrink.invalidate()

    def write_slice(self, slot: int, slice_index: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Place A [r, K] and scale * B [N_i, r] of slice `slice_index` in `slot` (after clear_slot)."""
        rank = b.shape[1]
        column = slot * self.columns_per_slot + slice_index * self.max_rank
        self.shrink[column : column + rank].copy_(a)
        row = self.slice_offsets[slice_index]
        column += self.in_features
        self.combined[row : row + b.shape[0], column : column + rank].copy_(b * scale)
        self.packed_combined.invalidate()
        self.packed_shrink.invalidate()

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The base alone, x @ W.T, for steps too large for `forward`; [T, N] in the weight dtype.

        A plain matmul with W (a view of `combined`): those steps have over MAX_TOKEN_SLOTS /
        S tokens, where re-laying W out per call costs little (measured at 640 tokens:
        3.9 ms, against 4.2 ms through the packed `combined` with zeros beside x).
        """
        return F.linear(x.to(self.combined.dtype), self.weight)

    def forward(self, x: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        """Base + LoRA for every token; returns [T, N] in the weight dtype.

        x: [T, K] activations; slot_mask: [T, S] in the weight dtype, 1.0 at each token's
        slot (a row of zeros: no adapter).
        """
        num_tokens = x.shape[0]
        narrow_x = x.to(self.combined.dtype)
        shrunk = self.packed_shrink.linear(narrow_x).view(num_tokens, self.num_slots, self.columns_per_slot)
        shrunk = shrunk * slot_mask[:, :, None]
        return self.packed_combined.linear(torch.cat([narrow_x, shrunk.view(num_tokens, -1)], dim=1))
