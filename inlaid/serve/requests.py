"""The coordinator's view of one client request while it is in flight. Torch-free."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from inlaid.protocol import GenerateDone

RequestKey = tuple[bytes, str]  # (client socket identity, the client's request id)


@dataclass
class ActiveRequest:
    key: RequestKey
    engine_id: str
    seq_id: int
    task: str | None
    stream: bool
    num_prompt_tokens: int
    received_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    deadline: asyncio.TimerHandle | None = None
    executor: int = 0  # the executor whose engine holds it (it can move while it waits)
    restarted: bool = False  # queued again once after its executor was lost before its first token

    @property
    def identity(self) -> bytes:
        return self.key[0]

    @property
    def request_id(self) -> str:
        return self.key[1]

    def done_message(self, finish_reason: str) -> GenerateDone:
        now = time.monotonic()
        return GenerateDone(
            request_id=self.request_id,
            text="".join(self.text),
            token_ids=list(self.token_ids),
            finish_reason=finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            queue_seconds=(self.scheduled_at or now) - self.received_at,
            first_token_seconds=(self.first_token_at - self.received_at) if self.first_token_at else 0.0,
            total_seconds=now - self.received_at,
        )
