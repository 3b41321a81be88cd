"""Plain float64 references for the segmented LoRA ops (Punica SGMV semantics).

Deliberately the most literal form: a Python loop over segments, each slicing the
adapter's real rank. Used by the tests as ground truth; never on a hot path.
See `dispatch.lora_shrink` / `dispatch.lora_expand` for the argument contract.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def lora_shrink_reference(
    x: Tensor,
    a_pools: Sequence[Tensor],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
) -> Tensor:
    """float64 [n_slices, T, R_max]; entries that the contract leaves undefined are 0."""
    n_slices = len(a_pools)
    num_tokens = x.shape[0]
    r_max = a_pools[0].shape[1]
    out = torch.zeros((n_slices, num_tokens, r_max), dtype=torch.float64)
    starts = segment_starts.tolist()
    for g, slot in enumerate(segment_slots.tolist()):
        if slot < 0:
            continue
        tokens = slice(starts[g], starts[g + 1])
        for i, a_pool in enumerate(a_pools):
            rank = int(slot_ranks[i, slot])
            if rank == 0:
                continue
            a = a_pool[slot, :rank, :].to(torch.float64).cpu()
            out[i, tokens, :rank] = x[tokens].to(torch.float64).cpu() @ a.T
    return out


def lora_expand_reference(
    y: Tensor,
    v: Tensor,
    b_pools: Sequence[Tensor],
    slice_offsets: Sequence[int],
    segment_starts: Tensor,
    segment_slots: Tensor,
    slot_ranks: Tensor,
    slot_scales: Tensor,
) -> Tensor:
    """float64 copy of y after `y[t, off_i:off_i+N_i] += scale * v[i, t, :r] @ B[s, :, :r].T`."""
    out = y.to(torch.float64).cpu().clone()
    starts = segment_starts.tolist()
    for g, slot in enumerate(segment_slots.tolist()):
        if slot < 0:
            continue
        tokens = slice(starts[g], starts[g + 1])
        for i, (b_pool, offset) in enumerate(zip(b_pools, slice_offsets)):
            rank = int(slot_ranks[i, slot])
            if rank == 0:
                continue
            b = b_pool[slot, :, :rank].to(torch.float64).cpu()
            scale = float(slot_scales[i, slot])
            delta = scale * (v[i, tokens, :rank].to(torch.float64).cpu() @ b.T)
            out[tokens, offset : offset + b.shape[0]] += delta
    return out
