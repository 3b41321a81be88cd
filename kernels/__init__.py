"""Inlaid's kernels: tensors in, tensors out (no import of the rest of inlaid).

The engine calls the ops in `dispatch` (Triton on CUDA tensors, the CPU path otherwise);
`gptq_format` reads and writes the standard GPTQ checkpoint tensors. See docs/kernels.md.
"""

from .dispatch import (
    PreparedQuantLinear,
    QuantLinearWeights,
    lora_apply,
    lora_expand,
    lora_shrink,
    prepare_quant_linear,
    quant_matmul,
)
from .gptq_format import (
    GPTQFormatError,
    default_g_idx,
    dequantize_gptq,
    num_groups,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)
from .lora_meta import build_lora_segments
from .quant_linear import QuantLinearError

__all__ = [  # every name docs/kernels.md shows
    "GPTQFormatError", "PreparedQuantLinear", "QuantLinearError", "QuantLinearWeights", "build_lora_segments",
    "default_g_idx", "dequantize_gptq", "num_groups",
    "lora_apply", "lora_expand", "lora_shrink", "pack_qweight", "pack_qzeros",
    "prepare_quant_linear", "quant_matmul", "unpack_qweight", "unpack_qzeros",
]
