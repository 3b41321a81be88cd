"""Dense matmul on the CPU with the weight pre-packed into oneDNN's blocked layout.

`F.linear` re-lays a plain bf16 [N, K] weight out for oneDNN on every call (so a decode
step reads each weight two or three times), and sends float32 to MKL, which on this AMD
EPYC runs well below the memory bandwidth. Packing once, when the weight is set, leaves
one read per step. Measured on a 2-core AVX512-BF16 EPYC, weights not in cache, M = 16
tokens: bf16 gate|up 3072x704 440 -> 216 us, bf16 lm_head 49152x576 4.2 -> 2.6 ms
(bit-identical outputs); float32 gate|up 3072x576 827 -> 245 us, float32 lm_head 20.3 ->
4.6 ms, and 2.0-2.4x at M = 640.

    weight  [N, K] float32 or bf16, plain; kept, because writes into it (LoRA slots beside
            the base) need a re-pack, which happens lazily on the next matmul after
            `invalidate()`
    x       [M, K] in the weight's dtype, any M (the packing's batch-size hint only picks
            a layout)
    returns [M, N] in the weight's dtype

bf16 results equal `F.linear`'s bit for bit here. float32 ones differ in the last bits
(oneDNN sums in another order than MKL): on the engine's parity batch against transformers
+ PEFT in float32 the logits moved from at most 0.9e-4 to at most 2.2e-4 off, every
greedy token unchanged (the bound is 1e-3). The packed copy costs as many bytes as the
weight (`EngineConfig.pack_weights = False` trades the speed back for the memory). A
weight that cannot be packed (float16, another device, a CPU without bf16 in oneDNN for a
bf16 weight) is multiplied with `F.linear`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# A typical decode batch: the layout oneDNN picks for it also serves prefill sizes (measured
# at M = 256 and 640: no slower than the plain weight).
PACKING_BATCH_HINT = 16


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, several times slower than float32 (docs/engine.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def packing_supported(weight: Tensor) -> bool:
    """Whether `PackedDenseWeight` packs this weight: float32 on a CPU with oneDNN, or bf16
    where oneDNN also has bf16."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def dense_linear_reference(x: Tensor, weight: Tensor) -> Tensor:
    """What `PackedDenseWeight.linear` computes, with the plain weight (and MKL for float32)."""
    return F.linear(x, weight)


class PackedDenseWeight:
    """A plain [N, K] weight and, where `packing_supported` (and `pack`), its oneDNN-packed
    copy (built on first use)."""

    def __init__(self, weight: Tensor, pack: bool = True) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
        self.weight = weight
        self.packs = pack and packing_supported(weight)
        self._packed: Tensor | None = None

    def invalidate(self) -> None:
        """Call after writing into `weight`; the next matmul re-packs it."""
        self._packed = None

    def linear(self, x: Tensor) -> Tensor:
        """x [M, K] in the weight's dtype -> [M, N]."""
        if x.dtype != self.weight.dtype or x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"x must be {self.weight.dtype} [M, {self.weight.shape[1]}], got {x.dtype} {tuple(x.shape)}"
            )
        if not self.packs:
            return F.linear(x, self.weight)
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACKING_BATCH_HINT)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
