"""The CPU LoRA path and the two ways it replaces, for `bench/kernels_cpu.py`: one matmul
pair per (segment, slice), and a per-token gather of every adapter at the largest rank.
Each takes (x, A pools, B pools, slice offsets, segment starts, segment slots, slot ranks,
slot scales, y) and adds the LoRA output into y."""

from __future__ import annotations

import torch

from inlaid.kernels.dispatch import lora_expand, lora_shrink
from inlaid.kernels.testing import random_lora_case


def lora_case(num_slots: int, ranks: list[int], k: int, widths: list[int], requests: list[tuple[int, int]], seed: int):
    slot_ranks = [[ranks[s % len(ranks)] for s in range(num_slots)]] * len(widths)
    case = random_lora_case(requests, slot_ranks, k, widths, max(ranks), seed=seed)
    for pool in case.a_pools + case.b_pools:  # the token-gather baseline multiplies padding: zeros, not NaN
        torch.nan_to_num_(pool, nan=0.0)
    return (case.x, case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts,
            case.segment_slots, case.slot_ranks, case.slot_scales)


def per_slot_loop(x, a_pools, b_pools, offsets, starts, slots, slot_ranks, slot_scales, y):
    """Baseline: one matmul pair per (segment, slice) -- the loop the batched path avoids."""
    bounds = starts.tolist()
    for g, slot in enumerate(slots.tolist()):
        if slot < 0 or bounds[g + 1] == bounds[g]:
            continue
        xs = x[bounds[g] : bounds[g + 1]]
        for i, (a, b, off) in enumerate(zip(a_pools, b_pools, offsets)):
            r = int(slot_ranks[i, slot])
            y[bounds[g] : bounds[g + 1], off : off + b.shape[1]] += float(slot_scales[i, slot]) * (
                (xs @ a[slot, :r].T) @ b[slot, :, :r].T
            )


def token_gather(x, a_pools, b_pools, offsets, starts, slots, slot_ranks, slot_scales, y):
    """Alternative: gather every token's adapter at R_max, mask ranks, one bmm pair per slice."""
    lengths = (starts[1:] - starts[:-1]).long()
    token_slot = torch.repeat_interleave(slots.long(), lengths)
    active = token_slot >= 0
    tokens = active.nonzero().squeeze(1)
    slot_of = token_slot[tokens]
    for i, (a, b, off) in enumerate(zip(a_pools, b_pools, offsets)):
        r_max = a.shape[1]
        keep = (torch.arange(r_max)[None, :] < slot_ranks[i].long()[slot_of][:, None]).to(x.dtype)
        v = torch.bmm(a[slot_of], x[tokens][:, :, None]).squeeze(2) * keep
        v = v * slot_scales[i][slot_of][:, None]
        y[tokens, off : off + b.shape[1]] += torch.bmm(b[slot_of], v[:, :, None]).squeeze(2)


def batched(x, a_pools, b_pools, offsets, starts, slots, slot_ranks, slot_scales, y):
    v = lora_shrink(x, a_pools, starts, slots, slot_ranks)
    lora_expand(y, v, b_pools, offsets, starts, slots, slot_ranks, slot_scales)
