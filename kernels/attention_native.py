"""The native CPU decode attention (attention_native.c): one query token per sequence, keys and
values read in place from the paged cache, fp32. Built and loaded by native.py
(`INLAID_NATIVE_ATTENTION=0` turns it off); then the engine keeps torch's gather + SDPA.
`decode_attention_reference` beside it is the plain-torch definition it is tested against."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .native import load

USE_NATIVE = True  # the engine's decode groups take this kernel where it is built and fits; tests switch it


class AttentionArgumentError(ValueError):
    """Arguments the native decode attention cannot take."""


def _load() -> tuple[ctypes.CDLL | None, str]:
    library, reason = load("attention_native", "INLAID_NATIVE_ATTENTION")
    if library is not None and library.inlaid_decode_attention.argtypes is None:
        library.inlaid_decode_attention.restype = ctypes.c_int
        library.inlaid_decode_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7
                                                    + [ctypes.c_float, ctypes.c_void_p])
    return library, reason


def native_attention_available() -> bool:
    return _load()[0] is not None


def native_attention_unavailable_reason() -> str:
    """Why the native decode attention is not available ('' when it is)."""
    return _load()[1]


def native_attention_fits(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `decode_attention` takes attention of this shape: float32 on the CPU, head_dim a
    multiple of 16 up to 256, at most 16 query heads per kv head."""
    return (dtype == torch.float32 and device.type == "cpu" and head_dim % 16 == 0 and 0 < head_dim <= 256
            and kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= 16)


def decode_attention(queries: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                     context_lens: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """out [B, H * D] = softmax(q k^T * scale) v per sequence and query head over its first
    context_lens[b] cached keys (grouped-query: head h reads kv head h // (H // KVH)).

    queries: float32 [B, H * D]; key_cache / value_cache: float32 [num_blocks, block_size, KVH, D];
    block_tables: int64 [B, max_blocks] (entries past a sequence's blocks are never read; the
    others must name blocks of the cache);
    context_lens: int64 [B], each in 1 .. max_blocks * block_size; out: optional float32
    [B, H * D] contiguous, written whole."""
    library = _load()[0]
    if library is None:
        raise AttentionArgumentError(f"the native decode attention is unavailable: {native_attention_unavailable_reason()}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or queries.dim() != 2:
        raise AttentionArgumentError(f"caches must be [blocks, block_size, kv_heads, head_dim] alike and queries 2-D, "
                                     f"got {tuple(key_cache.shape)}, {tuple(value_cache.shape)}, {tuple(queries.shape)}")
    batch = queries.shape[0]
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    heads = queries.shape[1] // head_dim if head_dim else 0
    if not (native_attention_fits(queries.dtype, queries.device, heads, kv_heads, head_dim)
            and key_cache.dtype == value_cache.dtype == torch.float32 and key_cache.device.type == "cpu"
            and queries.is_contiguous() and key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise AttentionArgumentError("the native decode attention takes contiguous float32 CPU tensors, head_dim a "
                                     "multiple of 16 up to 256, at most 16 query heads per kv head")
    if queries.shape[1] != heads * head_dim:
        raise AttentionArgumentError(f"queries' {queries.shape[1]} columns are not whole heads of {head_dim}")
    if not (block_tables.dtype == context_lens.dtype == torch.int64 and block_tables.dim() == 2
            and block_tables.shape[0] == batch and context_lens.shape == (batch,)
            and block_tables.is_contiguous() and context_lens.is_contiguous()):
        raise AttentionArgumentError(f"block_tables must be int64 [{batch}, max_blocks] and context_lens int64 [{batch}]")
    max_blocks = block_tables.shape[1]
    if out is None:
        out = torch.empty(batch, heads * head_dim, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (batch, heads * head_dim) or not out.is_contiguous():
        raise AttentionArgumentError(f"out must be a contiguous float32 [{batch}, {heads * head_dim}]")
    if batch == 0:
        return out
    status = library.inlaid_decode_attention(
        queries.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr(),
        context_lens.data_ptr(), batch, heads, kv_heads, head_dim, num_blocks, block_size, max_blocks, scale,
        out.data_ptr())
    if status != 0:
        raise AttentionArgumentError("the native decode attention refused its arguments (a context length outside "
                                     "1 .. max_blocks * block_size, or a block outside the cache)")
    return out


def decode_attention_reference(queries: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor, scale: float) -> Tensor:
    """`decode_attention` in plain torch, one sequence at a time, in the inputs' dtype."""
    batch = queries.shape[0]
    _, block_size, kv_heads, head_dim = key_cache.shape
    heads = queries.shape[1] // head_dim
    outputs = []
    for b in range(batch):
        length = int(context_lens[b])
        blocks = block_tables[b, : -(-length // block_size)]
        keys = key_cache[blocks].reshape(-1, kv_heads, head_dim)[:length]  # [L, KVH, D]
        values = value_cache[blocks].reshape(-1, kv_heads, head_dim)[:length]
        q = queries[b].view(kv_heads, heads // kv_heads, head_dim)  # [KVH, G, D]
        scores = torch.einsum("hgd,lhd->hgl", q, keys) * scale
        outputs.append(torch.einsum("hgl,lhd->hgd", scores.softmax(-1), values).reshape(heads * head_dim))
    return torch.stack(outputs) if outputs else queries.new_empty(0, heads * head_dim)
