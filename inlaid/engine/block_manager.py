"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables. Torch-free.

The executor owns the cache tensors; this class only decides which block ids a sequence
uses, so the coordinator can plan admissions by block counts without touching memory.
"""

from __future__ import annotations

from collections import deque

from inlaid.engine.sequence import Sequence


class OutOfBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO reuse spreads writes over the cache; any order would be correct.
        self._free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_new_tokens` more computed tokens."""
        total_tokens = seq.num_computed_tokens + num_new_tokens
        needed = -(-total_tokens // self.block_size)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free_blocks):
            raise OutOfBlocksError(f"need {needed} blocks, {len(self._free_blocks)} free")
        for _ in range(needed):
            seq.block_table.append(self._free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self._free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
