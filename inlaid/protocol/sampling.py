"""How a request wants its tokens picked (carried by client requests and engine plans)."""

from __future__ import annotations

import math
import re

import msgspec

# Stop rules are checked on the coordinator's loop for every token of the request, against
# the whole text (inlaid/engine/tokenizer.py): without a bound, one request listing 24,000
# stop strings slowed every other client's stream 30-fold (an outside probe). OpenAI takes
# at most 4 stop strings; these bounds leave room for more and keep a token's check short.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


class SamplingError(ValueError):
    """A sampling value no sampler can honour; `field` names it (the HTTP front's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to pick tokens. temperature 0 means greedy; any other finite temperature > 0
    is honoured exactly (the sampler scales in float64 relative to the row's maximum).
    `max_tokens` None generates until the context is full (the engine resolves it to the
    room the prompt leaves); a server refuses a number the context cannot hold."""

    max_tokens: int | None = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise SamplingError (a ValueError naming the field) for values no sampler can honour."""
        self._check_types()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature < math.inf):  # also refuses NaN
            raise SamplingError("temperature", f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError("top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # `inlaid generate` took 10^23
            raise SamplingError("seed", f"seed must be an integer in [-2**63, 2**64) (what a request's frame "
                                f"carries), got {self.seed}")
        if any(not s for s in self.stop):
            raise SamplingError("stop", "stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise SamplingError("stop", f"stop strings must be at most {MAX_STOP_CHARS} characters, got one of "
                                f"{max(len(s) for s in self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingError("stop_token_ids", f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got "
                                f"{len(self.stop_token_ids)}")

    def _check_types(self) -> None:
        """A Struct built in Python is not type-checked (a decoded frame is): stop="ab" was read
        as the stop strings "a" and "b", and top_k=1.5 or seed=1.5 passed to the sampler and
        raised inside the engine's step, failing the batch (an outside probe)."""
        try:
            msgspec.convert(msgspec.to_builtins(self), SamplingParams)
        except (msgspec.ValidationError, TypeError) as error:
            where = re.search(r"\$\.(\w+)", str(error))
            field = where.group(1) if where else "sampling"
            value = f" (value {getattr(self, field)!r:.80})" if where else ""
            raise SamplingError(field, f"{field}: {str(error).split(' - at ')[0].replace('`', '')}{value}") from None


__all__ = [
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_TOKEN_IDS",
    "SamplingError",
    "SamplingParams",
]
