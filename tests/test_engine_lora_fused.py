"""The LoRA expand folded into the bf16 base matmul (inlaid/engine/lora_fused.py) against a
float64 computation from the same (bf16-rounded) weights."""

from __future__ import annotations

import pytest
import torch

from inlaid.engine.lora import LoraBatch, LoraLinear
from inlaid.engine.lora_fused import MAX_TOKEN_SLOTS
from inlaid.kernels.dispatch import lora_host_segments

SLICES = {"qkv": ([64, 16, 16], ["q_proj", "k_proj", "v_proj"]), "down": ([48], ["down_proj"])}


def _linear(kind: str, in_features: int, num_slots: int, max_rank: int, bias: bool) -> LoraLinear:
    out_slices, names = SLICES[kind]
    linear = LoraLinear(in_features, out_slices, names, bias=bias)
    linear.weight.data = torch.randn(sum(out_slices), in_features) / in_features**0.5
    if bias:
        linear.bias.data = torch.randn(sum(out_slices))
    linear.allocate_lora(num_slots, max_rank, torch.float32, torch.device("cpu"))
    linear.weight.data = linear.weight.data.to(torch.bfloat16)
    assert linear.fuse_lora_expand()
    return linear


def _adapter(linear: LoraLinear, rank: int, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (torch.randn(rank, linear.in_features) * 0.1, torch.randn(out, rank) * 0.1)
            for name, out in zip(linear.slice_names, linear.out_slices) if name in names}


def _reference(linear: LoraLinear, x, token_slots, adapters, scales, bias) -> torch.Tensor:
    """float64: x @ W.T (+ bias) + scale * (x @ A.T) @ B.T per token, with the LoRA's x, A and
    scale * B rounded to bf16 as the fused path stores them."""
    y = x.double() @ linear.weight.double().T
    if bias is not None:
        y += bias.double()
    for token, slot in enumerate(token_slots):
        if slot < 0:
            continue
        for name, (a, b) in adapters[slot].items():
            index = linear.slice_names.index(name)
            start = linear.slice_offsets[index]
            x_row, a_narrow = x[token].to(torch.bfloat16).double(), a.to(torch.bfloat16).double()
            delta = (x_row @ a_narrow.T) @ (b * scales[slot]).to(torch.bfloat16).double().T
            y[token, start : start + b.shape[0]] += delta
    return y


# 200 tokens x 3 slots exceeds MAX_TOKEN_SLOTS: the base alone through the fused matrix
# (`FusedExpandWeight.base`), then the float32 per-adapter LoRA.
@pytest.mark.parametrize("kind,in_features,num_tokens,bias", [("qkv", 96, 5, True), ("down", 128, 16, False),
                                                              ("qkv", 96, 33, False), ("qkv", 96, 200, True)])
def test_fused_expand_matches_float64(kind, in_features, num_tokens, bias):
    torch.manual_seed(num_tokens)
    num_slots, max_rank = 3, 8
    assert (num_tokens * num_slots > MAX_TOKEN_SLOTS) == (num_tokens == 200)  # both routes are covered
    linear = _linear(kind, in_features, num_slots, max_rank, bias)
    names = linear.slice_names
    # Slot 1 first holds a rank-8 adapter on every slice, then a rank-4 one on one slice:
    # nothing of the first may reach slot 1's tokens after the reload.
    linear.load_slot(1, _adapter(linear, 8, names), 0.5)
    adapters = {0: _adapter(linear, 8, names), 1: _adapter(linear, 4, names[:1]), 2: _adapter(linear, 2, names[-1:])}
    scales = {0: 2.0, 1: 1.5, 2: 0.25}
    for slot, weights in adapters.items():
        linear.load_slot(slot, weights, scales[slot])
    token_slots = [(t % (num_slots + 1)) - 1 for t in range(num_tokens)]  # -1 = no adapter
    token_slots.sort()
    starts, slots = [0], []
    for t, slot in enumerate(token_slots):
        if not slots or slots[-1] != slot:
            slots.append(slot)
            starts.append(t)
        starts[-1] = t + 1
    starts = torch.tensor(starts, dtype=torch.int32)
    slots = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(num_tokens, in_features)
    batch = LoraBatch(starts, slots, lora_host_segments(starts, slots, num_tokens, num_slots))
    reference = _reference(linear, x, token_slots, adapters, scales, linear.bias)
    y = linear(x, batch)
    assert y.dtype == torch.float32 and y.shape == reference.shape
    # bf16 rounds the matmul's inputs of x and v and its output: relative error ~ 2^-8.
    scale = reference.abs().max().item()
    assert (y.double() - reference).abs().max().item() < 2e-2 * scale
    lora_part = reference - _reference(linear, x, [-1] * num_tokens, adapters, scales, linear.bias)
    assert lora_part.abs().max().item() > 0.2 * scale  # the adapters matter at this tolerance
    # The unfused route (separate float32 LoRA) agrees with the fused one.
    fused, linear.fused = linear.fused, None
    unfused = linear(x, batch)
    linear.fused = fused
    assert (unfused - y).abs().max().item() < 2e-2 * scale


def test_fusion_only_for_narrow_dense_weights():
    linear = LoraLinear(64, [32], ["o_proj"], bias=False)
    linear.weight.data = torch.randn(32, 64)
    linear.allocate_lora(2, 8, torch.float32, torch.device("cpu"))
    assert not linear.fuse_lora_expand()  # float32 weights: the exact float32 route stays
    linear.weight.data = linear.weight.data.to(torch.bfloat16)
    wide = LoraLinear(64, [32], ["o_proj"], bias=False)
    wide.weight.data = torch.randn(32, 64).to(torch.bfloat16)
    wide.allocate_lora(16, 64, torch.float32, torch.device("cpu"))
    assert not wide.fuse_lora_expand()  # pools far wider than K: separate expands are cheaper
    assert linear.fuse_lora_expand()
    assert linear.weight.data_ptr() == linear.fused.combined.data_ptr()  # no second copy of W



def test_unfused_bf16_base_goes_through_the_packed_weight():
    """Pools too wide to fuse: the bf16 base alone is packed (kernels/dense_cpu.py), LoRA
    stays the float32 per-adapter route; the sum still matches float64."""
    from inlaid.kernels.dispatch import packing_supported

    torch.manual_seed(7)
    linear = LoraLinear(64, [32], ["o_proj"], bias=True)
    linear.weight.data = (torch.randn(32, 64) / 8).to(torch.bfloat16)
    linear.bias.data = torch.randn(32)
    linear.allocate_lora(16, 64, torch.float32, torch.device("cpu"))
    assert not linear.fuse_lora_expand()
    linear.pack_weight()
    assert (linear.packed is not None) == packing_supported(linear.weight)
    adapter = {"o_proj": (torch.randn(8, 64) * 0.1, torch.randn(32, 8) * 0.1)}
    linear.load_slot(5, adapter, 2.0)
    starts = torch.tensor([0, 3, 9], dtype=torch.int32)
    slots = torch.tensor([-1, 5], dtype=torch.int32)
    x = torch.randn(9, 64)
    batch = LoraBatch(starts, slots, lora_host_segments(starts, slots, 9, 16))
    y = linear(x, batch)
    a, b = adapter["o_proj"]
    reference = x.to(torch.bfloat16).double() @ linear.weight.double().T + linear.bias.double()
    reference[3:] += 2.0 * (x[3:].double() @ a.double().T) @ b.double().T
    scale = reference.abs().max().item()
    assert (y.double() - reference).abs().max().item() < 2e-2 * scale
    assert (reference[3:] - (x[3:].to(torch.bfloat16).double() @ linear.weight.double().T
                             + linear.bias.double())).abs().max().item() > 0.1 * scale  # LoRA matters
