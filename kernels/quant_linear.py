"""Low-bit weight-only linear layers on GPTQ checkpoints: prepare once, multiply many times.

    QuantLinearWeights     exactly the checkpoint tensors of one layer (see gptq_format):
        qweight  int32 [K * bits // 32, N]    qzeros int32 [G, N * bits // 32]
        scales   float [G, N]                 g_idx  int32 [K] or None (k // group_size)
        bits in {2, 3, 4, 8}; group_size > 0 or -1 (one group over K); G = ceil(K / group_size):
        groups need not tile K (the last one is then shorter)
        bias     [N] or None
    prepare_quant_linear(w, device, act_dtype, mode, batch_invariant) -> PreparedQuantLinear
        an offline re-layout for the device; the checkpoint tensors stay untouched.
        batch_invariant (CPU int4 path): every row count takes the few-rows kernel (the
        dot-product or native one), never the bf16 route, so a row's result does not depend on
        how many rows share the call, prompt or decode (prompt calls of 48-512 rows ~1.1x slower
        on AVX512-BF16 without AMX, bench/int4_many_rows.py; more with AMX, whose bf16 route is
        faster)
    quant_matmul(x [M, K], prepared) -> [M, N] in x's dtype (+ bias)

Paths (`mode`):
    "auto"     CUDA: Triton (dequantize in registers, fp32 accumulation; dequant + cuBLAS
               for M >= prepared.dense_min_m). CPU: torch's int4 kernels for bits <= 4
               (2/3-bit codes are stored in the int4 layout), "dequant" where the int4
               kernel's shape constraints fail (N % 16, group size).
    "int4"     CPU int4 kernels (bf16 activations internally), error if impossible.
    "triton"   Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests).
    "dequant"  dequantize from the packed checkpoint on every call, then matmul (any g_idx).
    "dense"    dequantize once to a dense weight in act_dtype (fp32: the exact-parity path).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .gptq_format import SUPPORTED_BITS, dequantize_gptq, num_groups, unpack_qweight, unpack_qzeros

Mode = Literal["auto", "int4", "triton", "dequant", "dense"]
# Activations the routes compute in (float8 passed a floating-point check and came back float8)
ACTIVATION_DTYPES = frozenset([torch.float32, torch.float16, torch.bfloat16, torch.float64])


class QuantLinearError(ValueError):
    """A quantized layer cannot be prepared or multiplied as asked."""


@dataclass
class QuantLinearWeights:
    """Exactly the checkpoint tensors of one GPTQ linear layer."""

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    bias: Tensor | None = None


@dataclass
class CpuInt4Layout:
    packed: Tensor  # uint8, torch's int4pack layout of codes [N, K_pad] (K act-order sorted)
    scales_and_zeros: Tensor  # bf16 [K_pad // kernel_group, N, 2]: w = (q - 8) * scale + zero
    kernel_group: int  # 32/64/128/256 (a divisor of the checkpoint's group size)
    pad: int = 0  # K_pad - K: zero input columns appended when no kernel group divides K
    # Whether quant_cpu.int4_dequant_matmul (the many-rows route) can read `packed`:
    dequantizable: bool = False
    # The native kernel's binding of this layout (int4_native.native_weight), made on first use;
    # private: a lazily made cache (a model fingerprint, engine/cuda_graphs.py, skips it)
    _native: object | None = field(default=None, repr=False, compare=False)
    # ... and the dot-product kernel's (int4_dot.dot_weight), likewise
    _dot: object | None = field(default=None, repr=False, compare=False)


@dataclass
class DequantLayout:
    qweight: Tensor  # the checkpoint's packed codes (kept packed: low memory)
    zeros: Tensor  # act_dtype [G, N] true zero points
    scales: Tensor  # act_dtype [G, N]
    g_idx: Tensor  # int64 [K]
    contiguous_group: int | None = None  # set when g_idx = k // group: dequantize by broadcasting


@dataclass
class DenseLayout:
    weight: Tensor  # act_dtype [N, K] (nn.Linear layout)


@dataclass
class TritonLayout:
    codes: Tensor  # int32 [K * b // 32, N], codes packed along K in sorted-K order (b = bits, 2 for 3-bit)
    high_bits: Tensor | None  # 3-bit only: int32 [K // 32, N], the codes' top bit (1-bit plane)
    scales: Tensor  # act_dtype [G, N]
    zeros: Tensor  # act_dtype [G, N] true zero points
    group_size: int  # effective (K for -1); groups are contiguous in sorted-K order
    in_features: int  # K (the last group may be shorter than group_size)


@dataclass
class PreparedQuantLinear:
    kind: Literal["int4", "triton", "dequant", "dense"]
    layout: CpuInt4Layout | DequantLayout | DenseLayout | TritonLayout
    bits: int
    group_size: int
    in_features: int
    out_features: int
    act_dtype: torch.dtype
    input_perm: Tensor | None  # int64 [K]: sorted-K position -> input column (act-order); None = identity
    bias: Tensor | None
    # From this many rows on, dequantize the whole weight and use the dense GEMM (Triton path:
    # cuBLAS; CPU int4 path: oneDNN bf16, where the layout allows it, else never)
    dense_min_m: int = 128
    # CPU int4 path: from this many rows (below dense_min_m), the native kernel
    # (int4_native.c) instead of torch's; sys.maxsize where it is unavailable
    native_min_m: int = sys.maxsize
    # CPU int4 path: rows below the bf16 route take the dot-product kernel (int4_dot.c: x in
    # bf16, the weight exact) instead of the native fp32 one, where it builds
    few_rows_dot: bool = False
    # CPU int4 path, rows of prompt chunks (`quant_matmul(..., prefill=True)`): the bf16 route
    # from this many rows. Decode rows keep dense_min_m, so a sequence's decode tokens do not
    # change precision with the batch they share.
    prefill_dense_min_m: int = sys.maxsize


def _effective_group_size(w: QuantLinearWeights) -> int:
    group = w.in_features if w.group_size == -1 else w.group_size
    if group <= 0:
        raise QuantLinearError(f"group_size must be positive or -1, got {w.group_size}")
    return group


def check_weights(w: QuantLinearWeights) -> int:
    """Validate shapes against the GPTQ format; returns the effective group size."""
    if w.bits not in SUPPORTED_BITS:
        raise QuantLinearError(f"bits must be one of {SUPPORTED_BITS}, got {w.bits}")
    group = _effective_group_size(w)
    k, n = w.in_features, w.out_features
    n_groups = num_groups(k, group)
    expected = {
        "qweight": (w.qweight, (k * w.bits // 32, n), torch.int32),
        "qzeros": (w.qzeros, (n_groups, n * w.bits // 32), torch.int32),
    }
    for name, (tensor, shape, dtype) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise QuantLinearError(
                f"{name} must be {dtype} {shape} for K={k}, N={n}, {w.bits}-bit, group {w.group_size}; "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
    if (k * w.bits) % 32 or (n * w.bits) % 32:
        raise QuantLinearError(f"K={k} and N={n} must pack into whole int32 words at {w.bits} bits")
    if tuple(w.scales.shape) != (n_groups, n) or not w.scales.is_floating_point():
        raise QuantLinearError(f"scales must be float [{n_groups}, {n}], got {w.scales.dtype} {tuple(w.scales.shape)}")
    if w.g_idx is not None and (tuple(w.g_idx.shape) != (k,) or w.g_idx.is_floating_point()
                                or w.g_idx.dtype == torch.bool or w.g_idx.is_complex()):
        raise QuantLinearError(f"g_idx must be integer [{k}], got {w.g_idx.dtype} {tuple(w.g_idx.shape)}")
    if w.bias is not None and tuple(w.bias.shape) != (n,):
        raise QuantLinearError(f"bias must be [{n}], got {tuple(w.bias.shape)}")
    # Once, at prepare (a sync on CUDA is fine there): a NaN scale made every output of its
    # columns NaN with no word; the checkpoint load refused them, a direct caller did not.
    for name, tensor in (("scales", w.scales), ("bias", w.bias)):
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise QuantLinearError(f"{name} hold NaN or infinite values")
    return group


def _group_index(w: QuantLinearWeights, group: int) -> Tensor:
    if w.g_idx is None:
        return torch.arange(w.in_features, dtype=torch.int64) // group
    g_idx = w.g_idx.to("cpu", torch.int64)
    n_groups = num_groups(w.in_features, group)
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise QuantLinearError(f"g_idx values must lie in [0, {n_groups})")
    return g_idx


def sorted_k_order(g_idx: Tensor, group: int) -> tuple[Tensor | None, bool]:
    """(perm, contiguous): input columns sorted by group (None if already sorted), and whether
    every group then holds exactly `group` consecutive rows, the last one the remainder of K
    (what blocked kernels need)."""
    k = g_idx.shape[0]
    if bool((g_idx == torch.arange(k) // group).all()):
        return None, True
    perm = torch.argsort(g_idx, stable=True)
    return perm, bool((g_idx[perm] == torch.arange(k) // group).all())


def fuse_quant_slices(slices: list[QuantLinearWeights]) -> QuantLinearWeights | None:
    """The slices of a fused projection (q|k|v, gate|up) as ONE layer concatenated along N,
    or None when they cannot share a kernel call (bits, group size or act-order g_idx differ).

    Exact: each output column keeps its own codes, zero point and scale. One call over the
    concatenated weight replaces one call per slice (fewer, larger kernel launches)."""
    first = slices[0]
    for other in slices[1:]:
        if (other.bits, other.group_size, other.in_features) != (first.bits, first.group_size, first.in_features):
            return None
        if (other.g_idx is None) != (first.g_idx is None):
            return None
        if other.g_idx is not None and not torch.equal(other.g_idx, first.g_idx):
            return None
    has_bias = any(w.bias is not None for w in slices)
    bias = None
    if has_bias:
        bias = torch.cat([
            w.bias if w.bias is not None else torch.zeros(w.out_features, dtype=first.scales.dtype) for w in slices
        ])
    return QuantLinearWeights(
        qweight=torch.cat([w.qweight for w in slices], dim=1),
        qzeros=torch.cat([w.qzeros for w in slices], dim=1),
        scales=torch.cat([w.scales for w in slices], dim=1),
        g_idx=first.g_idx,
        bits=first.bits,
        group_size=first.group_size,
        in_features=first.in_features,
        out_features=sum(w.out_features for w in slices),
        bias=bias,
    )


def prepare_quant_linear(
    w: QuantLinearWeights,
    device: torch.device | str,
    act_dtype: torch.dtype,
    mode: Mode = "auto",
    batch_invariant: bool = False,
) -> PreparedQuantLinear:
    """Re-layout one layer for `device` (done once at load; the checkpoint stays standard)."""
    from . import quant_cpu  # local: keeps the module graph acyclic

    if act_dtype not in ACTIVATION_DTYPES:  # an integer one truncated the weights and the bias silently
        raise QuantLinearError(f"act_dtype must be one of {sorted(map(str, ACTIVATION_DTYPES))}, got {act_dtype}")
    device = torch.device(device)
    group = check_weights(w)
    g_idx = _group_index(w, group)
    perm, contiguous = sorted_k_order(g_idx, group)
    bias = None if w.bias is None else w.bias.to(device, act_dtype)
    common = dict(
        bits=w.bits, group_size=w.group_size, in_features=w.in_features,
        out_features=w.out_features, act_dtype=act_dtype, bias=bias,
    )
    if mode == "auto":
        if device.type == "cuda":
            from .quant_triton import triton_supported

            mode = "triton" if contiguous and triton_supported(w.in_features, group) else "dequant"
        else:
            mode = "int4" if contiguous and quant_cpu.int4_supported(w, group) else "dequant"
    if mode == "dense":
        weight = dequantize_gptq(w.qweight, w.qzeros, w.scales, g_idx.to(w.qweight.device), w.bits)
        return PreparedQuantLinear("dense", DenseLayout(weight.T.contiguous().to(device, act_dtype)),
                                   input_perm=None, **common)
    if mode == "dequant":
        layout = DequantLayout(
            qweight=w.qweight.to(device),
            zeros=unpack_qzeros(w.qzeros, w.bits, w.out_features).to(device, act_dtype),
            scales=w.scales.to(device, act_dtype),
            g_idx=g_idx.to(device),
            contiguous_group=group if perm is None else None,
        )
        return PreparedQuantLinear("dequant", layout, input_perm=None, **common)
    if not contiguous:
        raise QuantLinearError(f"mode {mode!r} needs every g_idx group to hold exactly {group} rows")
    input_perm = None if perm is None else perm.to(device)
    codes = unpack_qweight(w.qweight.cpu(), w.bits, w.in_features)
    if perm is not None:
        codes = codes[perm]
    zeros = unpack_qzeros(w.qzeros.cpu(), w.bits, w.out_features)
    scales = w.scales.cpu()
    if mode == "int4":
        layout = quant_cpu.prepare_int4(codes, zeros, scales, w.bits, group, device)
        # The bf16 route rounds the weight to bf16 where the few-rows kernels use it exactly:
        # a request's logits moved by ~0.16 with the prompt rows beside it (an outside probe).
        never = sys.maxsize if batch_invariant else None
        return PreparedQuantLinear("int4", layout, input_perm=input_perm, **common,
                                   dense_min_m=never or quant_cpu.dense_min_rows(layout),
                                   native_min_m=quant_cpu.native_min_rows(layout),
                                   few_rows_dot=quant_cpu.few_rows_dot(layout),
                                   prefill_dense_min_m=never or quant_cpu.prefill_dense_min_rows(layout))
    if mode == "triton":
        from .quant_triton import DENSE_MIN_M, prepare_triton_layout

        layout = prepare_triton_layout(codes, zeros, scales, w.bits, group, device, act_dtype)
        return PreparedQuantLinear("triton", layout, input_perm=input_perm, **common, dense_min_m=DENSE_MIN_M)
    raise QuantLinearError(f"unknown mode {mode!r}")


def quant_matmul(x: Tensor, prepared: PreparedQuantLinear, prefill: bool = False, out: Tensor | None = None) -> Tensor:
    """x [M, K] -> x @ W + bias, [M, N] in x's dtype. `prefill`: x's rows are tokens of prompt
    chunks, not decode tokens (the CPU int4 path's bf16 route then starts at
    `prepared.prefill_dense_min_m` rows instead of `dense_min_m`). `out`: an optional
    contiguous [M, N] tensor in x's dtype that receives the result (returned): the CPU int4
    kernels write float32 results straight into it, so rows of one output (a step's decode
    rows and prompt rows) can come from two routes without a concatenation's copy.

    x must be floating point (QuantLinearError otherwise). The result's dtype is x's, its
    precision the route's: the CPU int4 routes round x to bf16 (or multiply in fp32), so a
    float64 x comes back float64 at that precision (~3e-3 relative), not float64's; for
    float64 accuracy prepare with mode="dequant" and act_dtype=torch.float64 ("dense"
    dequantizes in fp32 first: ~3e-8)."""
    from . import quant_cpu

    if x.dtype not in ACTIVATION_DTYPES:
        # The routes would each do something different with it (the int4 kernels round it to
        # bf16, dequant/dense matmul in x's dtype and truncate; float8 came back float8), none
        # of it a quantized linear.
        raise QuantLinearError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != prepared.in_features:
        raise QuantLinearError(f"x must be [M, {prepared.in_features}], got shape {tuple(x.shape)}")
    if out is not None and (out.dtype != x.dtype or tuple(out.shape) != (x.shape[0], prepared.out_features)
                            or not out.is_contiguous() or out.device != x.device):
        raise QuantLinearError(f"out must be a contiguous {x.dtype} [{x.shape[0]}, {prepared.out_features}] on "
                               f"{x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    # The fp32 int4 kernels write into `out` themselves; the other routes' results are copied.
    kernel_out = out if out is not None and out.dtype == torch.float32 else None
    layout = prepared.layout
    weight_device = layout.packed.device if isinstance(layout, CpuInt4Layout) else next(
        t for t in vars(layout).values() if isinstance(t, Tensor)).device
    if x.device != weight_device:
        raise QuantLinearError(f"x is on {x.device}, the prepared weight on {weight_device}")
    if isinstance(layout, CpuInt4Layout):  # first: the CPU engine's every projection
        if x.shape[0] >= (min(prepared.dense_min_m, prepared.prefill_dense_min_m) if prefill else prepared.dense_min_m):
            result = quant_cpu.int4_bf16_matmul(x, layout, prepared.input_perm, out=kernel_out)
        elif prepared.few_rows_dot:
            result = quant_cpu.int4_dot_matmul(x, layout, prepared.input_perm, out=kernel_out)
        elif x.shape[0] >= prepared.native_min_m:
            result = quant_cpu.int4_native_matmul(x, layout, prepared.input_perm, out=kernel_out)
        else:
            result = quant_cpu.int4_matmul(x, layout, prepared.input_perm)
    elif isinstance(layout, DenseLayout):
        result = torch.nn.functional.linear(x.to(layout.weight.dtype), layout.weight)
    elif isinstance(layout, DequantLayout):
        result = quant_cpu.dequant_matmul(x, layout, prepared.bits, prepared.in_features)
    else:
        from .interpret import triton_interpreter_active
        from .quant_triton import triton_quant_matmul

        # Else the launch failed deep in Triton ("0 active drivers") with no word of why. (An
        # empty x launches nothing: it is answered anywhere.)
        if x.device.type != "cuda" and x.shape[0] and not triton_interpreter_active():
            raise QuantLinearError(f"mode 'triton' runs on CUDA devices, or on CPU tensors with TRITON_INTERPRET=1 "
                                   f"set before triton is imported; x is on {x.device}: on the CPU prepare the "
                                   "linear with mode 'int4' or 'dequant' (or 'auto')")
        result = triton_quant_matmul(x, layout, prepared.bits, prepared.input_perm, prepared.dense_min_m)
    if out is not None:
        if result is not out:
            out.copy_(result)  # converts to x's dtype as .to() does
        if prepared.bias is not None:
            out += prepared.bias.to(x.dtype)
        return out
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    if prepared.bias is not None:
        result = result + prepared.bias.to(x.dtype)
    return result
