"""The native CPU LoRA kernel (lora_native.c): y += LoRA(x), each token through its own slot
at the slot's real rank, one call per projection, fp32 (a slot whose adapter is stored in
float16 may be read from float16 copies of the pools: `HalfPools`). Built and loaded by
native.py (`INLAID_NATIVE_LORA=0` turns it off); then lora_apply_cpu keeps its torch routes."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

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
            + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3)
        library.inlaid_lora_half_fast.restype = ctypes.c_int
        library.inlaid_lora_half_fast.argtypes = []
    return library, reason


def native_lora_available() -> bool:
    return _load()[0] is not None


def native_lora_unavailable_reason() -> str:
    """Why the native LoRA kernel is not available ('' when it is)."""
    return _load()[1]


def native_half_copies_worth_it() -> bool:
    """Whether float16 copies of the pools speed the kernel up here: it is built, widens 16
    float16 values in one instruction (AVX-512), and `INLAID_NATIVE_LORA_HALF=0` is not set."""
    library = _load()[0]
    return (library is not None and bool(library.inlaid_lora_half_fast())
            and os.environ.get("INLAID_NATIVE_LORA_HALF", "1") != "0")


@dataclass
class HalfPools:
    """float16 copies of one projection's pools, in the same layout (stacked_a [S, n_slices * R, K];
    b_pools [S, N_i, R] views of [S, R, N_i] storage), and slot_half uint8 [S]: 1 where the slot's
    copies hold its adapter (its weights were float16, so the copies hold exactly the float32
    pools' values), 0 where the kernel reads the float32 pools."""

    stacked_a: Tensor
    b_pools: list[Tensor]
    slot_half: Tensor

    @staticmethod
    def like(stacked_a: Tensor, b_pools: Sequence[Tensor]) -> "HalfPools":
        return HalfPools(torch.zeros_like(stacked_a, dtype=torch.float16),
                         [torch.zeros_like(b.transpose(1, 2), dtype=torch.float16).transpose(1, 2) for b in b_pools],
                         torch.zeros(stacked_a.shape[0], dtype=torch.uint8))


def native_pools_fit(stacked_a: Tensor | None, b_pools: Sequence[Tensor]) -> bool:
    """Whether the kernel takes these pools: float32 on the CPU in the engine's layout (stacked A
    pools contiguous, B pools stored [S, R, N_i]), R at most MAX_RANK."""
    return (stacked_a is not None and stacked_a.dtype == torch.float32 and stacked_a.device.type == "cpu"
            and stacked_a.is_contiguous() and stacked_a.shape[1] // len(b_pools) <= MAX_RANK
            and all(b.dtype == torch.float32 and b.transpose(1, 2).is_contiguous() for b in b_pools))


def native_lora_fits(y: Tensor, x: Tensor, stacked_a: Tensor | None, b_pools: Sequence[Tensor]) -> bool:
    """Whether `lora_apply_native` can take these tensors: pools that `native_pools_fit`, x and
    y float32 on the CPU, rows of y and x contiguous."""
    return (native_pools_fit(stacked_a, b_pools) and x.dtype == y.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous() and y.stride(1) == 1)


class NativeLoraPools:
    """One projection's pools bound to lora_native.c once, so a call is one ctypes call.

    The engine's pools are allocated once and written in place (a slot load copies into them,
    the ranks and scales are set in place), so the pointers, widths and offsets every call
    passes are computed here once instead of per call (~90 us a call: 120 calls a decode step
    of the default model). Checks that the pools fit the kernel happen here; `apply` checks
    only the step's tensors. slot_ranks / slot_scales must be the live int32 / float32 tensors
    (a converted copy would not see later slot loads).
    """

    def __init__(self, stacked_a: Tensor, b_pools: Sequence[Tensor], slice_offsets: Sequence[int],
                 slot_ranks: Tensor, slot_scales: Tensor, half: HalfPools | None = None) -> None:
        library = _load()[0]
        if library is None:
            raise LoraArgumentError(f"the native LoRA kernel is unavailable: {native_lora_unavailable_reason()}")
        if not native_pools_fit(stacked_a, b_pools):
            raise LoraArgumentError(f"the native LoRA kernel takes float32 CPU pools in the engine's layout, of rank "
                                    f"<= {MAX_RANK}")
        num_slots, stacked_rows, self.in_features = stacked_a.shape
        n_slices = len(b_pools)
        if stacked_rows % n_slices or len(slice_offsets) != n_slices:
            raise LoraArgumentError(f"stacked_a's {stacked_rows} rows do not hold {n_slices} slices")
        if any(b.shape[0] != num_slots or b.shape[2] != stacked_rows // n_slices for b in b_pools):
            raise LoraArgumentError("the B pools' slots or ranks differ from stacked_a's")
        if slot_ranks.dtype != torch.int32 or slot_scales.dtype != torch.float32 or not (
                slot_ranks.is_contiguous() and slot_scales.is_contiguous()) or not (
                slot_ranks.shape == slot_scales.shape == (n_slices, num_slots)):
            raise LoraArgumentError(f"slot_ranks / slot_scales must be contiguous int32 / float32 [{n_slices}, {num_slots}]")
        if half is not None and not (
                half.stacked_a.dtype == torch.float16 and half.stacked_a.shape == stacked_a.shape
                and half.stacked_a.is_contiguous() and len(half.b_pools) == n_slices
                and all(h.dtype == torch.float16 and h.shape == b.shape and h.transpose(1, 2).is_contiguous()
                        for h, b in zip(half.b_pools, b_pools))
                and half.slot_half.dtype == torch.uint8 and half.slot_half.shape == (num_slots,)
                and half.slot_half.is_contiguous()):
            raise LoraArgumentError("the float16 copies must be contiguous float16 pools shaped as the float32 ones, "
                                    "with a uint8 flag per slot")
        if any(offset < 0 for offset in slice_offsets):  # the kernel writes at y + offset unchecked
            raise LoraArgumentError(f"slice_offsets must be >= 0, got {list(slice_offsets)}")
        widths = [b.shape[1] for b in b_pools]
        self.out_columns = max(offset + width for offset, width in zip(slice_offsets, widths))
        self.stacked_a = stacked_a
        self._kept = (b_pools, slot_ranks, slot_scales, half)  # the pointers below point into these
        self._function = library.inlaid_lora_apply
        # The ctypes arrays are kept: the kernel reads them through the pointers below.
        self._arrays = ((ctypes.c_void_p * n_slices)(*[b.data_ptr() for b in b_pools]),
                        (ctypes.c_int64 * n_slices)(*widths), (ctypes.c_int64 * n_slices)(*slice_offsets),
                        (ctypes.c_void_p * n_slices)(*[b.data_ptr() for b in half.b_pools] if half else [None] * n_slices))
        self._pools_arguments = (
            stacked_a.data_ptr(), *(ctypes.addressof(array) for array in self._arrays[:3]),
            slot_ranks.data_ptr(), slot_scales.data_ptr(), num_slots, n_slices, stacked_rows // n_slices)
        self._half_arguments = ((half.stacked_a.data_ptr(), ctypes.addressof(self._arrays[3]), half.slot_half.data_ptr())
                                if half is not None else (None, None, None))

    def apply(self, y: Tensor, x: Tensor, token_slots: Tensor) -> None:
        """y[t, slice i] += LoRA of slot token_slots[t] (-1: nothing). x: float32 [T, K] contiguous;
        y: float32 [T, >= the slices' columns], rows contiguous; token_slots: int64 [T] contiguous."""
        num_tokens = x.shape[0]
        if not (x.dtype == y.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
                and y.stride(1) == 1):
            raise LoraArgumentError(f"the native LoRA kernel takes float32 CPU x (contiguous) and y (rows contiguous), "
                                    f"got {x.dtype} and {y.dtype}")
        if x.dim() != 2 or x.shape[1] != self.in_features or y.shape[0] != num_tokens or not (
                token_slots.dtype == torch.int64 and token_slots.shape == (num_tokens,) and token_slots.is_contiguous()):
            raise LoraArgumentError(f"x {tuple(x.shape)}, y {tuple(y.shape)} and token_slots {tuple(token_slots.shape)} "
                                    f"do not match the pools' K = {self.in_features}")
        if y.shape[1] < self.out_columns:
            raise LoraArgumentError(f"a slice reaches past y's columns ({self.out_columns} > {y.shape[1]})")
        status = self._function(x.data_ptr(), num_tokens, self.in_features, token_slots.data_ptr(),
                                *self._pools_arguments, y.data_ptr(), y.stride(0), *self._half_arguments)
        if status != 0:
            raise LoraArgumentError("the native LoRA kernel refused its arguments (a rank past R, or a slot out of range)")


def lora_apply_native(y: Tensor, x: Tensor, stacked_a: Tensor, b_pools: Sequence[Tensor], slice_offsets: Sequence[int],
                      token_slots: Tensor, slot_ranks: Tensor, slot_scales: Tensor, half: HalfPools | None = None) -> None:
    """y[t, slice i] += scale[i, s] * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T, s = token_slots[t]
    (-1: nothing), r = slot_ranks[i, s]. stacked_a: float32 [S, n_slices * R, K];
    b_pools: float32 [S, N_i, R] views of [S, R, N_i] storage; token_slots: int64 [T].
    One call; a caller that calls again with the same pools keeps a `NativeLoraPools`."""
    pools = NativeLoraPools(stacked_a, b_pools, slice_offsets, slot_ranks.to(torch.int32).contiguous(),
                            slot_scales.to(torch.float32).contiguous(), half)
    pools.apply(y, x, token_slots.to(torch.int64).contiguous())
