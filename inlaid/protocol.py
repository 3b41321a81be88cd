"""Every message Inlaid sends, as msgspec Structs (msgpack frames over ZeroMQ).

This module imports nothing of Inlaid: clients, the coordinator and the executor all
speak through it. Engine-internal messages (BatchPlan, StepResult) live here too, so the
in-process engine and the multi-process server run exactly the same plans.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError with a clear message for values no sampler can honour."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


# ---------------------------------------------------------------- coordinator <-> executor


class ChunkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence's work in a step: compute KV for `token_ids` starting at `start_pos`.

    A decode step is a chunk of one token; a prefill may be split into several chunks.
    `sample` is set on the chunk that ends at the sequence's last known token.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    adapter_slot: int  # -1: no adapter
    sample: bool
    sampling: SamplingParams
    num_generated: int  # tokens generated so far: with the seed, makes sampling replayable


class AdapterLoad(msgspec.Struct, frozen=True, kw_only=True):
    """Load adapter `name` from `path` into device slot `slot` (evicting what was there)."""

    slot: int
    name: str
    path: str


class BatchPlan(msgspec.Struct, frozen=True, kw_only=True, tag="batch_plan"):
    step_id: int
    chunks: list[ChunkPlan]
    adapter_loads: list[AdapterLoad] = []


class SampledToken(msgspec.Struct, frozen=True, kw_only=True):
    seq_id: int
    token_id: int


class StepResult(msgspec.Struct, frozen=True, kw_only=True, tag="step_result"):
    step_id: int
    sampled: list[SampledToken]
    num_tokens: int  # tokens computed in the step (prefill + decode)
    compute_seconds: float
