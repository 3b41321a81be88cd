"""Segment metadata for the segmented LoRA ops: building, checking, CUDA-graph capacity.

A step's tokens form one flat batch of T tokens. Consecutive tokens that use the same
adapter slot form a segment:

    segment_starts  int32 [G + 1]   token offsets, non-decreasing, starts[0] = 0, starts[G] = T;
                                    segment g = tokens [starts[g], starts[g + 1]) (may be empty)
    segment_slots   int32 [G]       adapter slot of segment g in the pools; -1 = no adapter

CUDA graphs need every launch parameter fixed at capture time. The kernels size their
grid from (T, G, n_slices, pool shapes) only -- never from segment lengths -- so a graph
captured for a batch bucket of T tokens stays valid for any segmentation when G is a
fixed capacity: allocate the two buffers once with G_cap = T (the worst case, every
token its own segment), fill them in place before each replay, and pad unused segments
as empty ones at the end (start = end = T, slot -1). `build_lora_segments(...,
capacity=T)` produces exactly that padding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class LoraArgumentError(ValueError):
    """Arguments of a LoRA op do not satisfy its shape/dtype contract."""


def build_lora_segments(
    request_slots: Sequence[int],
    request_num_tokens: Sequence[int],
    capacity: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(segment_starts int32 [G_cap + 1], segment_slots int32 [G_cap]) for requests laid out
    back to back; neighbours with the same slot merge into one segment.

    capacity: pad to this many segments with empty ones (for CUDA-graph buffers)."""
    if len(request_slots) != len(request_num_tokens):
        raise LoraArgumentError("request_slots and request_num_tokens differ in length")
    starts: list[int] = [0]
    slots: list[int] = []
    total = 0
    for slot, count in zip(request_slots, request_num_tokens):
        if count < 0:
            raise LoraArgumentError(f"negative token count {count}")
        if slot < -1:
            raise LoraArgumentError(f"slot must be >= -1, got {slot}")
        total += count
        if slots and slots[-1] == slot:
            starts[-1] = total
        else:
            slots.append(slot)
            starts.append(total)
    if capacity is not None:
        if capacity < len(slots):
            raise LoraArgumentError(f"{len(slots)} segments exceed capacity {capacity}")
        pad = capacity - len(slots)
        slots += [-1] * pad
        starts += [total] * pad
    return (
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.int32, device=device),
    )


def check_segments(segment_starts: Tensor, segment_slots: Tensor, num_tokens: int) -> None:
    """Shape/dtype checks (no device sync)."""
    if segment_starts.dtype != torch.int32 or segment_slots.dtype != torch.int32:
        raise LoraArgumentError("segment_starts and segment_slots must be int32")
    if segment_slots.dim() != 1 or segment_starts.shape != (segment_slots.shape[0] + 1,):
        raise LoraArgumentError(
            f"segment_starts must be [G + 1] for segment_slots [G]; got "
            f"{tuple(segment_starts.shape)} and {tuple(segment_slots.shape)}"
        )


def check_segment_values(
    segment_starts: Tensor, segment_slots: Tensor, num_tokens: int, num_slots: int
) -> None:
    """Value checks (syncs on CUDA: for the CPU path and debugging)."""
    starts = segment_starts.to("cpu", torch.int64)
    if int(starts[0]) != 0 or int(starts[-1]) != num_tokens:
        raise LoraArgumentError(
            f"segment_starts must run from 0 to T={num_tokens}, got {int(starts[0])}..{int(starts[-1])}"
        )
    if bool((starts[1:] < starts[:-1]).any()):
        raise LoraArgumentError("segment_starts must be non-decreasing")
    slots = segment_slots.to("cpu", torch.int64)
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= num_slots):
        raise LoraArgumentError(f"segment_slots must lie in [-1, {num_slots})")


def check_pools(
    pools: Sequence[Tensor], what: str, dtype: torch.dtype, device: torch.device
) -> tuple[int, int]:
    """Every pool 3-D, same dtype/device as the activations, same S and R_max; -> (S, R_max)."""
    if len(pools) == 0:
        raise LoraArgumentError(f"{what}: at least one slice is needed")
    rank_dim = 1 if what == "a_pools" else 2
    num_slots, r_max = pools[0].shape[0], pools[0].shape[rank_dim]
    for i, pool in enumerate(pools):
        if pool.dim() != 3:
            raise LoraArgumentError(f"{what}[{i}] must be 3-D, got shape {tuple(pool.shape)}")
        if pool.dtype != dtype or pool.device != device:
            raise LoraArgumentError(
                f"{what}[{i}] is {pool.dtype} on {pool.device}; activations are {dtype} on {device}"
            )
        if pool.shape[0] != num_slots or pool.shape[rank_dim] != r_max:
            raise LoraArgumentError(f"{what}[{i}] has shape {tuple(pool.shape)}; slices disagree on S or R_max")
    return num_slots, r_max
