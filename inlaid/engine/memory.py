"""What an executor holds in memory, by kind: base projections, embedding/head, LoRA pools,
KV cache, and the base's size at other precisions (from its parameter counts).

Counts the bytes of the tensors the runner keeps (int4 layouts, dense weights and their
oneDNN-packed copies, slot pools, cache), each storage once; the process's other costs
(Python, torch's allocator slack, the tokenizer) are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inlaid.engine.lora import LoraLinear
from inlaid.engine.runner import ModelRunner

MB = 1e6


@dataclass(frozen=True)
class EngineMemory:
    """Bytes by kind. `projections` is the base's linear layers as held (packed copies
    included); `lora_pools` every slot padded to the pool's max rank (with the float16 copies
    the native LoRA kernel reads, where the engine keeps them)."""

    projections: int
    embedding_and_head: int
    other_weights: int  # norms, biases
    lora_pools: int
    kv_cache: int
    lora_half_copies: int = 0  # of lora_pools: the float16 copies (and flags) the native LoRA kernel reads

    @property
    def base_weights(self) -> int:
        return self.projections + self.embedding_and_head + self.other_weights

    @property
    def total(self) -> int:
        return self.base_weights + self.lora_pools + self.kv_cache


@dataclass(frozen=True)
class BaseSizes:
    """The base's parameter counts and its size at a precision (bytes)."""

    projection_params: int
    embedding_params: int  # with a tied head the head shares them
    other_params: int

    def dense_bytes(self, bytes_per_param: int) -> int:
        return (self.projection_params + self.embedding_params + self.other_params) * bytes_per_param


class _Counter:
    """Sums tensor bytes, each storage once (views and tied weights are not counted twice)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    def __call__(self, *tensors: torch.Tensor | None) -> int:
        total = 0
        for tensor in tensors:
            if tensor is None:
                continue
            if tensor.is_mkldnn:  # an opaque oneDNN layout: no storage to share
                key, size = (id(tensor), -1), tensor.numel() * tensor.element_size()
            else:
                storage = tensor.untyped_storage()
                key, size = (storage.data_ptr(), tensor.device.index or 0), storage.nbytes()
            if key in self.seen:
                continue
            self.seen.add(key)
            total += size
        return total


def _packed(weight) -> torch.Tensor | None:
    """The oneDNN-packed copy a PackedDenseWeight holds (None until its first matmul)."""
    return None if weight is None else weight._packed


def engine_memory(runner: ModelRunner) -> EngineMemory:
    count = _Counter()
    model = runner.model
    lora = projections = half_copies = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        # LoRA first: a fused [W | B_all] matrix holds the dense base as a view and is
        # counted once here (its base columns are the projection's weight).
        lora += count(module.stacked_a, *module.lora_b, module.slot_ranks, module.slot_scales)
        if module.half_pools is not None:
            half = module.half_pools
            copies = count(half.stacked_a, *half.b_pools, half.slot_half)
            lora += copies
            half_copies += copies
        if module.fused is not None:
            fused = module.fused
            lora += count(fused.shrink, _packed(fused.packed_shrink))
            projections += count(fused.combined, _packed(fused.packed_combined))
        if module.quantized is not None:
            for prepared in module.quantized:
                tensors = [t for t in vars(prepared.layout).values() if isinstance(t, torch.Tensor)]
                projections += count(*tensors, prepared.input_perm, prepared.bias)
        else:
            projections += count(module.weight, _packed(module.packed))
    embedding = count(model.embed_tokens.weight, model.lm_head_weight, _packed(model.packed_head))
    other = count(*(p for p in model.parameters()))  # what is left: norms, biases
    kv = count(*(t for pair in runner.kv_caches for t in pair))
    return EngineMemory(projections, embedding, other, lora, kv, half_copies)


def base_sizes(runner: ModelRunner) -> BaseSizes:
    """Parameter counts of the base model (from its config: the same for every precision)."""
    return BaseSizes(*runner.model_config.parameter_counts())
