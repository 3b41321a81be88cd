"""Attention groups: how one step's query rows are laid out for attention (model.py's
AttentionGroup), built once per step by the runner and shared by every layer.

`attention_group` pads chunks to a common grid for torch's SDPA (or, one query per chunk, the
native decode attention reading the cache in place). `row_attention_group` hands EVERY query
row to the native decode attention as its own query, so a row's attention is computed from
its query, its cached keys and its position alone, whatever chunk or batch it came in
(`EngineConfig.batch_invariant`).
"""

from __future__ import annotations

import torch

from inlaid.engine.model import AttentionGroup
from inlaid.protocol import ChunkPlan


def attention_group(chunks: list[ChunkPlan], offsets: list[int], block_size: int, device: torch.device,
                    dtype: torch.dtype, native_decode: bool) -> AttentionGroup:
    """The chunks (flat rows from offsets[i] on) padded to the longest query count and context.

    native_decode: one-query groups read the cache in place (kernels/attention_native.py)."""
    query_counts = [len(chunk.token_ids) for chunk in chunks]
    context_lengths = [chunk.start_pos + count for chunk, count in zip(chunks, query_counts)]
    max_queries = max(query_counts)
    max_blocks = -(-max(context_lengths) // block_size)
    max_keys = max_blocks * block_size
    query_rows: list[int] = []
    valid_slots: list[int] = []
    output_rows: list[int] = []
    kv_blocks: list[int] = []
    for row, (chunk, offset, count, length) in enumerate(zip(chunks, offsets, query_counts, context_lengths)):
        # Padding query slots repeat the chunk's last row; padding key blocks repeat the
        # chunk's first block. Both are masked or discarded, as are the key slots past
        # `length` inside its last block.
        query_rows.extend(offset + min(i, count - 1) for i in range(max_queries))
        valid_slots.extend(range(row * max_queries, row * max_queries + count))
        output_rows.extend(range(offset, offset + count))
        used_blocks = -(-length // block_size)
        kv_blocks.extend(chunk.block_table[:used_blocks])
        kv_blocks.extend([chunk.block_table[0]] * (max_blocks - used_blocks))
    starts = torch.tensor([chunk.start_pos for chunk in chunks], device=device)
    counts = torch.tensor(query_counts, device=device)
    query_offsets = torch.arange(max_queries, device=device)
    query_valid = query_offsets[None, :] < counts[:, None]
    key_positions = torch.arange(max_keys, device=device)
    causal = key_positions[None, None, :] <= (starts[:, None] + query_offsets[None, :])[:, :, None]
    # Padding rows attend key 0 only, so their softmax stays finite (they are discarded).
    padding_rows = ~query_valid[:, :, None] & (key_positions[None, None, :] == 0)
    allowed = (causal & query_valid[:, :, None]) | padding_rows
    # Additive form, built once per step: SDPA would convert a boolean mask in every layer.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    # One query per chunk on consecutive flat rows (a decode group): queries and outputs
    # are slices of the flat batch, and no row indices are built.
    is_span = max_queries == 1 and offsets == list(range(offsets[0], offsets[0] + len(chunks)))
    native = max_queries == 1 and native_decode
    return AttentionGroup(
        batch_size=len(chunks),
        max_queries=max_queries,
        max_keys=max_keys,
        query_rows=None if is_span else index(query_rows),
        kv_blocks=index(kv_blocks),
        valid_slots=None if is_span or len(valid_slots) == len(query_rows) else index(valid_slots),
        output_rows=None if is_span else index(output_rows),
        mask=mask[:, None],
        query_span=(offsets[0], offsets[0] + len(chunks)) if is_span else None,
        context_lens=index(context_lengths) if native else None,
    )


def row_attention_group(chunks: list[ChunkPlan], positions: torch.Tensor, block_size: int) -> AttentionGroup:
    """Every flat row (the chunks laid out one after another, as the runner does) as one query of
    the native decode attention: row r attends the first positions[r] + 1 cached keys of its
    chunk's block table. The kernel computes each row alone, in one fixed order, so a prompt
    token's attention is the same bits whether its prompt came whole, chunked or beside
    others, and the same as a decode token's at that position. The runner writes a step's
    keys and values before attending, so a prompt row finds its own chunk's keys cached.

    positions: int64 [T] on the CPU (the native kernel's device)."""
    context_lens = [chunk.start_pos + len(chunk.token_ids) for chunk in chunks]
    max_blocks = -(-max(context_lens) // block_size)
    # Entries past a row's own blocks are never read; padding repeats the chunk's first block.
    tables = torch.tensor([chunk.block_table[: -(-length // block_size)]
                           + [chunk.block_table[0]] * (max_blocks - -(-length // block_size))
                           for chunk, length in zip(chunks, context_lens)], dtype=torch.long)
    counts = torch.tensor([len(chunk.token_ids) for chunk in chunks])
    rows = int(positions.shape[0])
    return AttentionGroup(
        batch_size=rows,
        max_queries=1,
        max_keys=max_blocks * block_size,
        query_rows=None,
        kv_blocks=tables.repeat_interleave(counts, dim=0).reshape(-1),
        valid_slots=None,
        output_rows=None,
        mask=torch.empty(0),  # the native kernel masks by context length
        query_span=(0, rows),
        context_lens=positions + 1,
    )
