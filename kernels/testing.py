"""Random inputs for the kernels' tests and benchmarks (fresh tensors, poisoned padding).

`random_gptq_layer` returns a checkpoint layer AND its unpacked ground truth (codes,
zero points, scales, g_idx), so references never go through the code under test.
`random_lora_case` fills every padded rank of the pools with NaN: a kernel that reads
padding (instead of stopping at the slot's rank) produces NaN and fails the comparison.
`check_interpreted_in_child` runs a test file's interpreted kernel tests in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .gptq_format import default_g_idx, num_groups, pack_qweight, pack_qzeros
from .lora_meta import build_lora_segments
from .quant_linear import QuantLinearWeights


@dataclass
class GPTQLayer:
    weights: QuantLinearWeights
    codes: Tensor  # int64 [K, N]
    zeros: Tensor  # int64 [G, N]
    scales: Tensor  # float32 [G, N]
    g_idx: Tensor  # int64 [K]

    def dense_float64(self) -> Tensor:
        """W [K, N] = scales[g] * (codes - zeros[g]) in float64."""
        g = self.g_idx
        return self.scales.double()[g] * (self.codes.double() - self.zeros.double()[g])


def random_gptq_layer(
    in_features: int, out_features: int, bits: int, group_size: int, *,
    symmetric: bool = False, act_order: bool = False, bias: bool = False, seed: int = 0,
) -> GPTQLayer:
    gen = torch.Generator().manual_seed(seed)
    n_groups = num_groups(in_features, group_size)  # the last group may be shorter
    codes = torch.randint(0, 2**bits, (in_features, out_features), generator=gen)
    if symmetric:  # GPTQ sym: the zero point is the middle code everywhere
        zeros = torch.full((n_groups, out_features), 2 ** (bits - 1), dtype=torch.int64)
    else:
        zeros = torch.randint(0, 2**bits, (n_groups, out_features), generator=gen)
    scales = torch.rand((n_groups, out_features), generator=gen) * 0.02 + 0.002
    g_idx = default_g_idx(in_features, group_size).long()
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    weights = QuantLinearWeights(
        qweight=pack_qweight(codes, bits),
        qzeros=pack_qzeros(zeros, bits),
        scales=scales,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        out_features=out_features,
        bias=torch.randn(out_features, generator=gen) if bias else None,
    )
    return GPTQLayer(weights, codes, zeros, scales, g_idx)


@dataclass
class LoraCase:
    x: Tensor  # [T, K]
    a_pools: list[Tensor]  # n_slices x [S, R_max, K]
    b_pools: list[Tensor]  # n_slices x [S, N_i, R_max]
    slice_offsets: list[int]
    segment_starts: Tensor  # int32 [G + 1]
    segment_slots: Tensor  # int32 [G]
    slot_ranks: Tensor  # int32 [n_slices, S]
    slot_scales: Tensor  # float32 [n_slices, S]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def defined_mask(self) -> Tensor:
        """bool [n_slices, T, R_max]: the entries of the shrink output the contract defines."""
        lengths = (self.segment_starts[1:] - self.segment_starts[:-1]).long()
        token_slot = torch.repeat_interleave(self.segment_slots.long(), lengths)
        n_slices, r_max = len(self.a_pools), self.a_pools[0].shape[1]
        ranks = torch.zeros((n_slices, self.num_tokens), dtype=torch.int64)
        has = token_slot >= 0
        ranks[:, has] = self.slot_ranks.long()[:, token_slot[has]]
        return torch.arange(r_max)[None, None, :] < ranks[:, :, None]

    def to(self, device: torch.device | str) -> "LoraCase":
        return LoraCase(
            self.x.to(device), [a.to(device) for a in self.a_pools], [b.to(device) for b in self.b_pools],
            list(self.slice_offsets), self.segment_starts.to(device), self.segment_slots.to(device),
            self.slot_ranks.to(device), self.slot_scales.to(device),
        )


def random_lora_case(
    requests: Sequence[tuple[int, int]],
    slot_ranks: Sequence[Sequence[int]],
    in_features: int,
    slice_widths: Sequence[int],
    r_max: int,
    *,
    dtype: torch.dtype = torch.float32,
    capacity: int | None = None,
    seed: int = 0,
) -> LoraCase:
    """requests: (slot, tokens) back to back (slot -1 = no adapter); slot_ranks [n_slices][S]."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.tensor(slot_ranks, dtype=torch.int32)
    n_slices, num_slots = ranks.shape
    if n_slices != len(slice_widths):
        raise ValueError("one row of slot_ranks per slice")
    a_pools, b_pools = [], []
    for i, width in enumerate(slice_widths):
        a = torch.randn((num_slots, r_max, in_features), generator=gen) / in_features**0.5
        b = torch.randn((num_slots, width, r_max), generator=gen) / r_max**0.5
        for slot in range(num_slots):
            a[slot, int(ranks[i, slot]) :] = float("nan")
            b[slot, :, int(ranks[i, slot]) :] = float("nan")
        a_pools.append(a.to(dtype))
        b_pools.append(b.to(dtype))
    starts, slots = build_lora_segments([s for s, _ in requests], [c for _, c in requests], capacity=capacity)
    num_tokens = sum(c for _, c in requests)
    return LoraCase(
        x=torch.randn((num_tokens, in_features), generator=gen).to(dtype),
        a_pools=a_pools,
        b_pools=b_pools,
        slice_offsets=[sum(slice_widths[:i]) for i in range(n_slices)],
        segment_starts=starts,
        segment_slots=slots,
        slot_ranks=ranks,
        slot_scales=torch.rand((n_slices, num_slots), generator=gen) + 0.5,
    )


def stacked_pools(case: LoraCase, zero_padding: bool = True) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The case's pools in the engine's layout, for the CPU path's `stacked_a` routes.

    Returns (stacked_a [S, n_slices * R_max, K], a views of it, b views [S, N_i, R_max] of
    [S, R_max, N_i] storage). By default entries past a slot's rank are ZERO, as the
    engine's slot loader leaves them (the case's NaN poison there is replaced by 0;
    everything the contract reads is kept). `zero_padding=False` keeps the poison: no CPU
    route may read past a rank (the masked route once did; tests/test_kernels_probe_fixes.py)."""
    num_slots, r_max, in_features = case.a_pools[0].shape
    n_slices = len(case.a_pools)
    clean = (lambda t: torch.nan_to_num(t, nan=0.0)) if zero_padding else (lambda t: t)
    stacked = torch.zeros(num_slots, n_slices * r_max, in_features, dtype=case.x.dtype)
    a_views, b_views = [], []
    for i, (a, b) in enumerate(zip(case.a_pools, case.b_pools)):
        view = stacked[:, i * r_max : (i + 1) * r_max]
        view.copy_(clean(a))
        a_views.append(view)
        b_storage = clean(b).transpose(1, 2).contiguous()
        b_views.append(b_storage.transpose(1, 2))
    return stacked, a_views, b_views


def check_interpreted_in_child(test_file: str, keyword: str = "triton_interp") -> None:
    """Run `test_file`'s tests named with `keyword` in a child pytest with TRITON_INTERPRET=1
    (for a process where triton was already imported in compiled mode, which cannot switch
    to the interpreter); AssertionError with the child's output tail if any failed."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", keyword, test_file],
        env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
