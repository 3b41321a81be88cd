"""The native CPU LoRA kernel (lora_native.c): y += LoRA(x), each token through its own slot
at the slot's real rank, one call per projection, fp32. Built and loaded by native.py
(`INLAID_NATIVE_LORA=0` turns it off); then lora_apply_cpu keeps its torch routes."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from .lora_meta import LoraArgumentError
from .native import load

MAX_RANK = 256  # lora_native.c's bound on R_max


def _load() -> tuple[ctypes.CDLL | None, str]:
    library, reason = load("lora_native", "INLAID_NATIVE_LORA")
    if library is not None and library.inlaid_lora_apply.argtypes is None:
        library.inlaid_lora_apply.restype = ctypes.c_int
        library.inlaid_lora_apply.argtypes = (
            [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 7
            + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64])
    return library, reason


def native_lora_available() -> bool:
    return _load()[0] is not None


def native_lora_unavailable_reason() -> str:
    """Why the native LoRA kernel is not available ('' when it is)."""
    return _load()[1]


def native_lora_fits(y: Tensor, x: Tensor, stacked_a: Tensor | None, b_pools: Sequence[Tensor]) -> bool:
    """Whether `lora_apply_native` can take these tensors: the engine's CPU layout in fp32
    (stacked A pools, B pools stored [S, R, N_i]), rows of y and x contiguous."""
    return (stacked_a is not None and x.dtype == y.dtype == stacked_a.dtype == torch.float32
            and x.device.type == "cpu" and stacked_a.is_contiguous() and x.is_contiguous() and y.stride(1) == 1
            and stacked_a.shape[1] // len(b_pools) <= MAX_RANK
            and all(b.dtype == torch.float32 and b.transpose(1, 2).is_contiguous() for b in b_pools))


def lora_apply_native(y: Tensor, x: Tensor, stacked_a: Tensor, b_pools: Sequence[Tensor], slice_offsets: Sequence[int],
                      token_slots: Tensor, slot_ranks: Tensor, slot_scales: Tensor) -> None:
    """y[t, slice i] += scale[i, s] * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T, s = token_slots[t]
    (-1: nothing), r = slot_ranks[i, s]. stacked_a: float32 [S, n_slices * R, K];
    b_pools: float32 [S, N_i, R] views of [S, R, N_i] storage; token_slots: int64 [T]."""
    library = _load()[0]
    if library is None:
        raise LoraArgumentError(f"the native LoRA kernel is unavailable: {native_lora_unavailable_reason()}")
    if not native_lora_fits(y, x, stacked_a, b_pools):
        raise LoraArgumentError("the native LoRA kernel takes float32 CPU tensors in the engine's pool layout")
    num_slots, stacked_rows, k = stacked_a.shape
    n_slices = len(b_pools)
    if x.shape[1] != k or token_slots.shape != (x.shape[0],) or y.shape[0] != x.shape[0]:
        raise LoraArgumentError(f"x {tuple(x.shape)}, y {tuple(y.shape)} and token_slots {tuple(token_slots.shape)} "
                                f"do not match the pools' K = {k}")
    ranks = slot_ranks.to(torch.int32).contiguous()
    scales = slot_scales.to(torch.float32).contiguous()
    slots = token_slots.to(torch.int64).contiguous()
    if ranks.shape != (n_slices, num_slots) or scales.shape != (n_slices, num_slots):
        raise LoraArgumentError(f"slot_ranks and slot_scales must be [{n_slices}, {num_slots}]")
    widths = [b.shape[1] for b in b_pools]
    if any(offset + width > y.shape[1] for offset, width in zip(slice_offsets, widths)):
        raise LoraArgumentError("a slice reaches past y's columns")
    status = library.inlaid_lora_apply(
        x.data_ptr(), x.shape[0], k, slots.data_ptr(), stacked_a.data_ptr(),
        ctypes.cast((ctypes.c_void_p * n_slices)(*[b.data_ptr() for b in b_pools]), ctypes.c_void_p),
        ctypes.cast((ctypes.c_int64 * n_slices)(*widths), ctypes.c_void_p),
        ctypes.cast((ctypes.c_int64 * n_slices)(*slice_offsets), ctypes.c_void_p),
        ranks.data_ptr(), scales.data_ptr(), num_slots, n_slices, stacked_rows // n_slices, y.data_ptr(), y.stride(0))
    if status != 0:
        raise LoraArgumentError("the native LoRA kernel refused its arguments (a rank past R, or a slot out of range)")
