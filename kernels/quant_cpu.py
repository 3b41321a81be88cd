"""CPU paths of the quantized linear layer.

int4: torch's CPU int4 kernels (`_weight_int4pack_mm_for_cpu`), convention
      w = (q - 8) * scale + zero per (group, column), q the raw 0..15 code. A GPTQ weight
      s * (q - z) is the same with scale = s, zero = s * (8 - z) -- for ANY code range,
      so 2- and 3-bit codes go into the same layout (shifted to centre them on 8) (one extra bit of memory per
      weight for 3-bit, none of the speed lost; see docs/kernels.md for the measurement
      against dequantizing on the fly). Activations run in bf16 inside the kernel.
dequant: unpack the checkpoint's packed codes on every call, dequantize, matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant_linear import CpuInt4Layout, DequantLayout, QuantLinearError, QuantLinearWeights

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts


def kernel_group_for(group: int, in_features: int) -> tuple[int, int] | None:
    """(kernel group, K padding) for torch's int4 kernel, or None when it cannot hold the
    layer. A kernel group must lie inside one checkpoint group, so it divides the group
    size (any does when one group spans K); the scales are then repeated per kernel group
    (a finer grid of the same values is the same weight). The kernel also needs it to divide
    K: where none does (e.g. K = 600), K is padded with zero input columns, the least
    padding first. Among equal paddings the largest group wins (fewest scale rows)."""
    fitting = [c for c in INT4_KERNEL_GROUPS if group >= in_features or group % c == 0]
    if not fitting:
        return None
    best = min(fitting, key=lambda c: (-in_features % c, -c))
    return best, -in_features % best


def int4_supported(w: QuantLinearWeights, group: int) -> bool:
    return w.bits <= 4 and w.out_features % 16 == 0 and kernel_group_for(group, w.in_features) is not None


def prepare_int4(
    codes: Tensor, zeros: Tensor, scales: Tensor, bits: int, group: int, device: torch.device
) -> CpuInt4Layout:
    """codes int32 [K, N] (sorted-K order), zeros int [G, N], scales [G, N] -> int4pack layout."""
    if device.type != "cpu":
        raise QuantLinearError(f"the int4 path runs on the CPU, not {device}")
    if bits > 4:
        raise QuantLinearError(f"the int4 path holds at most 4-bit codes, got {bits}-bit")
    k, n = codes.shape
    choice = kernel_group_for(group, k)
    if n % 16 or choice is None:
        raise QuantLinearError(
            f"torch's int4 CPU kernel needs N % 16 == 0 and a group size divisible by 32 "
            f"(got N={n}, group {group}); use mode='dequant'"
        )
    kernel_group, pad = choice
    # Centre narrower codes on the kernel's 8 (q' = q + shift): the stored zero s*(8 - shift - z)
    # then stays small, so its bf16 rounding does not swamp a 2- or 3-bit weight.
    shift = 8 - 2 ** (bits - 1)
    centred = codes.to(torch.int32) + shift
    if pad:  # padded rows meet zero input columns: their value never counts
        centred = torch.cat([centred, torch.full((pad, n), 8, dtype=torch.int32)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(centred.T.contiguous(), 1)
    scale = scales.to(torch.float32)
    zero = scale * (8.0 - shift - zeros.to(torch.float32))
    # Kernel group j covers rows [j * kernel_group, (j + 1) * kernel_group), all inside
    # checkpoint group j * kernel_group // group (padding rows: the last group).
    first_rows = torch.arange(0, k + pad, kernel_group)
    source_group = (first_rows // group).clamp(max=scales.shape[0] - 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1)[source_group]
    return CpuInt4Layout(packed, scales_and_zeros.to(torch.bfloat16).contiguous(), kernel_group, pad)


def int4_matmul(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None) -> Tensor:
    """bf16 [M, N] = x (act-order permuted) @ W."""
    x_bf16 = x.to(torch.bfloat16)
    if input_perm is not None:
        x_bf16 = x_bf16.index_select(1, input_perm)
    if layout.pad:
        x_bf16 = torch.nn.functional.pad(x_bf16, (0, layout.pad))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x_bf16.contiguous(), layout.packed, layout.kernel_group, layout.scales_and_zeros
    )


def _unpack_codes_fast(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """int32 [K, N] codes with few large temporaries (fresh big buffers page-fault on
    every call: measured to dominate on small VMs)."""
    if bits == 3:
        # 32 codes per 3 words: code j sits at bit 3j of the 96-bit little-endian run.
        words = qweight.view(in_features // 32, 3, -1)
        parts = []
        for j in range(32):
            word, shift = divmod(3 * j, 32)
            value = words[:, word] >> shift
            if shift > 29:  # straddles into the next word; >> is arithmetic: drop the sign copies
                value = (value & ((1 << (32 - shift)) - 1)) | (words[:, word + 1] << (32 - shift))
            parts.append(value & 7)
        return torch.stack(parts, dim=1).view(in_features, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(in_features, -1)


def dequant_matmul(x: Tensor, layout: DequantLayout, bits: int, in_features: int) -> Tensor:
    """x @ W with W dequantized from the packed codes for this call only."""
    weight = _unpack_codes_fast(layout.qweight, bits, in_features).to(layout.scales.dtype)
    group = layout.contiguous_group
    if group is not None:
        # Whole groups by broadcasting; a shorter last group (groups not tiling K) on its own.
        whole = in_features // group * group
        grouped = weight[:whole].view(-1, group, weight.shape[1])
        full_groups = whole // group
        grouped.sub_(layout.zeros[:full_groups, None, :]).mul_(layout.scales[:full_groups, None, :])
        if whole < in_features:
            weight[whole:].sub_(layout.zeros[full_groups]).mul_(layout.scales[full_groups])
    else:
        weight.sub_(layout.zeros[layout.g_idx]).mul_(layout.scales[layout.g_idx])
    return x.to(weight.dtype) @ weight
