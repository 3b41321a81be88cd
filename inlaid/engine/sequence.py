"""A request's state while the engine works on it. Torch-free."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from inlaid.protocol import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    CONTEXT = "context"  # the model's context length reached
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(eq=False)  # identity: a sequence equals only itself (queues find it by identity)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    # Tokens whose keys/values are in the KV cache. Reset to 0 on preemption (recompute).
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Scheduling: the policy's estimate of the output length (set on arrival), and when the
    # scheduler first and last planned work for this sequence (its clock).
    predicted_output_tokens: float | None = None
    first_scheduled_at: float | None = None
    last_scheduled_at: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens that still need their KV computed before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
