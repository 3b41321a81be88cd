"""CPU paths of the quantized linear layer.

int4: torch's CPU int4 kernels (`_weight_int4pack_mm_for_cpu`), convention
      w = (q - 8) * scale + zero per (group, column), q the raw 0..15 code. A GPTQ weight
      s * (q - z) is the same with scale = s, zero = s * (8 - z) -- for ANY code range,
      so 2- and 3-bit codes go into the same layout (shifted to centre them on 8) (one extra bit of memory per
      weight for 3-bit, none of the speed lost; see docs/kernels.md for the measurement
      against dequantizing on the fly). Activations run in bf16 inside the kernel. Its group
      (32-256) divides the checkpoint's group and K (`kernel_group_for`): groups that do not
      tile K (576 at 128) run with a finer kernel group; K itself is padded only where no
      kernel group divides it. Its time grows linearly with the rows of x (docs/kernels.md), so
      where the native kernel (int4_native.c) is built it serves every M below `dense_min_m`
      instead, in fp32, reading the same bytes (`int4_native_matmul`); where AVX512-BF16 is,
      the dot-product kernel (int4_dot.c) serves them instead, x rounded to bf16 and the
      weight exact, ~2x faster (`int4_dot_matmul`). From `dense_min_m` rows
      on (prefill), the same packed codes are dequantized to a bf16 weight for this call and
      multiplied by oneDNN's bf16 GEMM, whose time barely grows with M (`int4_dequant_matmul`;
      docs/kernels.md has the crossovers); where the bf16 kernel builds (int4_bf16.c: AMX
      tiles or AVX512-BF16 dot products) that route is it instead, the weight dequantized a
      panel at a time in cache, and prompt rows take it from 16 rows (48 after the dot-product
      kernel, without AMX) (`int4_bf16_matmul`).
      Nothing more is stored.
dequant: unpack the checkpoint's packed codes on every call, dequantize, matmul.
"""

from __future__ import annotations

import functools
import sys
import threading

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
    scales_and_zeros = torch.stack([scale, zero], dim=-1)[source_group].to(torch.bfloat16).contiguous()
    layout = CpuInt4Layout(packed, scales_and_zeros, kernel_group, pad)
    layout.dequantizable = n % INT4PACK_BLOCK_N == 0 and int4pack_layout_is_known()
    return layout


# ------------------------------------------------------------- many rows: dequantize + bf16 GEMM
INT4PACK_BLOCK_N = 64  # output columns per block of torch's CPU int4pack layout
DENSE_MIN_ROWS = 96  # measured crossover with torch's int4 kernel on the engine's projections (docs/kernels.md)
DENSE_MIN_ROWS_NATIVE = 192  # the same, with the native kernel below it (docs/kernels.md)
NATIVE_MIN_ROWS = 1  # every row count below the bf16 route: results do not depend on the batch (docs/kernels.md)
# Prompt rows: the bf16 route from here where the weight is dequantized natively (~7x faster
# than torch's ops): measured in the engine, a 160-row prompt step 1.28x faster than the native
# kernel, an 80-row one 0.93x (docs/kernels.md).
PREFILL_DENSE_MIN_ROWS_NATIVE = 128
# ... and from here where the bf16 kernel (int4_bf16.c) takes the layout: faster than the fp32
# native kernel from 16 rows on the engine's projections, 2-3x with AMX (docs/kernels.md).
PREFILL_BF16_KERNEL_MIN_ROWS = 16
# ... but from here where its back-end is AVX512-BF16 and the dot-product kernel (int4_dot.c)
# serves the fewer rows: measured crossover of the two on the default model's projections, the
# dot kernel 1.4x faster at 16 rows, 1.1x at 32, even at 48, 0.9x from 128 (docs/kernels.md).
PREFILL_BF16_KERNEL_MIN_ROWS_AFTER_DOT = 48


def unpack_int4pack(packed: Tensor, n: int, k: int, out: Tensor | None = None) -> Tensor:
    """The raw 0..15 codes, uint8 [K, N], from torch's CPU int4pack bytes [N, K // 2]: for each
    block of 64 output columns, byte [k, j] of the block holds column j's code in its low
    nibble and column j + 32's in its high one (ATen's layout, checked at start by
    `int4pack_layout_is_known`)."""
    blocks = packed.view(n // INT4PACK_BLOCK_N, k, INT4PACK_BLOCK_N // 2).permute(1, 0, 2)
    codes = torch.empty(k, n, dtype=torch.uint8) if out is None else out
    codes = codes.view(k, n // INT4PACK_BLOCK_N, INT4PACK_BLOCK_N)
    torch.bitwise_and(blocks, 15, out=codes[..., : INT4PACK_BLOCK_N // 2])
    torch.bitwise_right_shift(blocks, 4, out=codes[..., INT4PACK_BLOCK_N // 2:])
    return codes.view(k, n)


@functools.lru_cache(maxsize=1)
def int4pack_layout_is_known() -> bool:
    """Whether this torch packs int4 codes the way `unpack_int4pack` reads them (an ATen
    internal, so checked once on random codes rather than assumed)."""
    codes = torch.randint(0, 16, (2 * INT4PACK_BLOCK_N, 64), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return packed.shape == (codes.shape[0], codes.shape[1] // 2) and torch.equal(
            unpack_int4pack(packed, codes.shape[0], codes.shape[1]).to(torch.int32), codes.T)
    except (RuntimeError, ValueError):
        return False


def dense_min_rows(layout: CpuInt4Layout) -> int:
    """The M from which `quant_matmul` takes the dequantize + bf16 GEMM route (never: maxsize).
    Never on a CPU without native bf16 either: oneDNN emulates bf16 there, ~8x slower than
    float32 at prefill sizes (docs/engine.md), which would lose the route's gain and more."""
    from .dense_cpu import native_bf16

    if not (layout.dequantizable and native_bf16()):
        return sys.maxsize
    return DENSE_MIN_ROWS_NATIVE if native_min_rows(layout) < sys.maxsize else DENSE_MIN_ROWS


def prefill_dense_min_rows(layout: CpuInt4Layout) -> int:
    """The M from which prompt rows take the bf16 route (`quant_matmul(..., prefill=True)`):
    PREFILL_BF16_KERNEL_MIN_ROWS where the bf16 kernel takes the layout (on AVX512-BF16 with the
    dot-product kernel below it: PREFILL_BF16_KERNEL_MIN_ROWS_AFTER_DOT), PREFILL_DENSE_MIN_ROWS_NATIVE
    where the native kernel dequantizes the weight, else the same as any rows (`dense_min_rows`)."""
    from .int4_bf16 import bf16_kernel_backend, bf16_kernel_fits
    from .int4_native import native_int4_available

    dense = dense_min_rows(layout)
    if dense < sys.maxsize and bf16_kernel_fits(layout):
        after_dot = few_rows_dot(layout) and bf16_kernel_backend() != "amx"
        return min(dense, PREFILL_BF16_KERNEL_MIN_ROWS_AFTER_DOT if after_dot else PREFILL_BF16_KERNEL_MIN_ROWS)
    return min(dense, PREFILL_DENSE_MIN_ROWS_NATIVE) if dense < sys.maxsize and native_int4_available() else dense


_scratch = threading.local()  # reused weight buffers: a fresh one page-faults on every call


def dequantize_int4pack(layout: CpuInt4Layout) -> Tensor:
    """bf16 [K_pad, N] = (q - 8) * scale + zero, from the int4pack bytes, into a buffer reused
    by the next call of the same shape on this thread (use it before then)."""
    n = layout.packed.shape[0]
    k = layout.packed.shape[1] * 2
    buffers: dict[tuple[int, int], tuple[Tensor, Tensor]] = _scratch.__dict__.setdefault("weights", {})
    if (k, n) not in buffers:
        buffers[(k, n)] = (torch.empty(k, n, dtype=torch.uint8), torch.empty(k, n, dtype=torch.bfloat16))
    codes, weight = buffers[(k, n)]
    from .int4_native import native_int4_available, native_weight

    if native_int4_available():  # the same values in one pass (int4_native.c)
        return native_weight(layout).dequantize_bf16(weight)
    # q - 8 exactly (uint8 wraps, read back as int8), then one rounding: (q - 8) * scale + zero.
    # Folding the 8 into the zero instead would round a large offset (2-bit: ~8 scales) and
    # triple the error of small weights.
    unpack_int4pack(layout.packed, n, k, out=codes).sub_(8)
    weight.copy_(codes.view(torch.int8))
    groups = weight.view(k // layout.kernel_group, layout.kernel_group, n)
    # The kernel's own bf16 scale and zero (the same weight), as contiguous [G, 1, N] copies of
    # the small rows: broadcasting strided views of scales_and_zeros takes torch's slow
    # elementwise path (4-5x slower dequantization, measured).
    scales = layout.scales_and_zeros[:, None, :, 0].contiguous()
    zeros = layout.scales_and_zeros[:, None, :, 1].contiguous()
    torch.addcmul(zeros, groups, scales, out=groups)
    return weight


def int4_dequant_matmul(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None) -> Tensor:
    """bf16 [M, N] = x (act-order permuted) @ W, W dequantized to bf16 for this call."""
    if not layout.dequantizable:
        raise QuantLinearError("this int4 layout has no dequantize route (N % 64 != 0 or unknown packing)")
    return _kernel_input(x, layout, input_perm, torch.bfloat16) @ dequantize_int4pack(layout)


def int4_bf16_matmul(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None, out: Tensor | None = None) -> Tensor:
    """[M, N] = bf16(x) (act-order permuted) @ bf16(W): the many-rows route. The bf16 kernel where
    it takes the layout (fp32 result, the weight dequantized block by block in cache; written
    into `out`, a contiguous float32 [M, N], when given), else the whole weight dequantized for
    oneDNN's bf16 GEMM (bf16 result, `out` left to the caller)."""
    from .int4_bf16 import bf16_kernel_fits, int4pack_mm_bf16

    if bf16_kernel_fits(layout):
        return int4pack_mm_bf16(_kernel_input(x, layout, input_perm, x.dtype), layout, threads=torch.get_num_threads(),
                                out=out)
    return int4_dequant_matmul(x, layout, input_perm)


def native_min_rows(layout: CpuInt4Layout) -> int:
    """The M from which `quant_matmul` takes the native kernel (below `dense_min_rows`; never:
    maxsize): where it built (int4_native.py) and can read the layout (N % 64 == 0, the known
    int4pack bytes)."""
    from .int4_native import native_int4_available

    return NATIVE_MIN_ROWS if layout.dequantizable and native_int4_available() else sys.maxsize


def few_rows_dot(layout: CpuInt4Layout) -> bool:
    """Whether `quant_matmul` multiplies the rows below the bf16 route with the dot-product kernel
    (int4_dot.c: x in bf16, the weight exact) rather than the fp32 native kernel: where it
    builds and takes the layout."""
    from .int4_dot import dot_kernel_fits

    return dot_kernel_fits(layout)


def int4_dot_matmul(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None, out: Tensor | None = None) -> Tensor:
    """float32 [M, N] = bf16(x) (act-order permuted) @ W through the dot-product kernel (into
    `out`, a contiguous float32 [M, N], when given)."""
    from .int4_dot import dot_weight

    return dot_weight(layout).matmul(_kernel_input(x, layout, input_perm, torch.float32),
                                     threads=torch.get_num_threads(), out=out)


def int4_native_matmul(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None,
                       out: Tensor | None = None) -> Tensor:
    """float32 [M, N] = x (act-order permuted) @ W through the native kernel, in fp32 (into `out`,
    a contiguous float32 [M, N], when given)."""
    from .int4_native import native_weight

    return native_weight(layout).matmul(_kernel_input(x, layout, input_perm, torch.float32),
                                        threads=torch.get_num_threads(), out=out)


def int4_matmul(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None) -> Tensor:
    """bf16 [M, N] = x (act-order permuted) @ W."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        _kernel_input(x, layout, input_perm, torch.bfloat16), layout.packed, layout.kernel_group,
        layout.scales_and_zeros,
    )


def _kernel_input(x: Tensor, layout: CpuInt4Layout, input_perm: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x as every int4 route reads it: in `dtype`, its columns in the layout's sorted-K order
    (act-order), zero columns appended up to the padded K, contiguous."""
    if x.dtype == dtype and input_perm is None and not layout.pad and x.is_contiguous():
        return x  # the engine's usual case, without four calls per projection
    x = x.to(dtype)
    if input_perm is not None:
        x = x.index_select(1, input_perm)
    if layout.pad:
        x = torch.nn.functional.pad(x, (0, layout.pad))
    return x.contiguous()


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
