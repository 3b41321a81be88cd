"""`mlfq`: FastServe's skip-join multi-level feedback queue (Wu et al. 2023), as a baseline.

Level i grants a quantum of `base_quantum_tokens * quantum_growth**i` generated tokens. A
new request skips the levels whose quantum is shorter than its prefill (`prefill_weight`
decode steps per prompt token), the skip-join that keeps long prompts from hogging the top
level; a request that used up its quantum drops one level. Every step runs the highest
levels first, running and waiting requests alike: a demoted running request is paused
(it keeps its KV blocks, as FastServe keeps its KV cache in host memory) when higher
levels fill the batch. A request not served for `starvation_s` goes back to the top level.
Adapters play no part in the ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inlaid.engine.config import check_range
from inlaid.engine.policy import SchedulingPolicy, seconds_without_progress
from inlaid.engine.sequence import Sequence
from inlaid.scheduling.srtf import MAX_PREFILL_WEIGHT


MAX_LEVELS = 64
MAX_QUANTUM_LOG10 = 9  # a billion tokens: past any context


@dataclass
class MlfqOptions:
    levels: int = 6
    base_quantum_tokens: int = 4
    quantum_growth: float = 2.0
    prefill_weight: float = 0.05  # decode-step equivalents of one prompt token (skip-join)
    starvation_s: float = 60.0

    def validate(self) -> None:
        # One message per option, naming it (a combined one blamed prefill_weight for a bad
        # starvation_s).
        if isinstance(self.levels, int) and self.levels > MAX_LEVELS:  # quantum_growth ** levels overflowed
            raise ValueError(f"levels must be <= {MAX_LEVELS} (FastServe uses a handful), got {self.levels}")
        check_range("levels", self.levels, 1, MAX_LEVELS, integer=True)
        check_range("base_quantum_tokens", self.base_quantum_tokens, 1, integer=True)
        check_range("quantum_growth", self.quantum_growth, 1)
        # The last level's quantum, computed in logs: a finite but large growth (1e70)
        # overflowed the quanta's float power at start-up, a traceback.
        if math.log10(self.base_quantum_tokens) + (self.levels - 1) * math.log10(self.quantum_growth) > MAX_QUANTUM_LOG10:
            raise ValueError(f"base_quantum_tokens x quantum_growth ** (levels - 1) must be at most "
                             f"1e{MAX_QUANTUM_LOG10} tokens (longer than any context), got base_quantum_tokens "
                             f"{self.base_quantum_tokens}, quantum_growth {self.quantum_growth}, levels {self.levels}")
        # Decode steps a prompt token costs: below 1 in practice; 1e300 passed before.
        check_range("prefill_weight", self.prefill_weight, 0, MAX_PREFILL_WEIGHT)
        check_range("starvation_s", self.starvation_s, 0, low_open=True)


@dataclass
class _Level:
    level: int
    tokens: int  # generated at this level
    since: float  # entered this level


class MlfqPolicy(SchedulingPolicy):
    name = "mlfq"

    def __init__(self, options: MlfqOptions) -> None:
        options.validate()
        self.options = options
        self.quanta = [options.base_quantum_tokens * options.quantum_growth**i for i in range(options.levels)]
        self._levels: dict[int, _Level] = {}

    def on_arrival(self, seq: Sequence, now: float) -> None:
        prefill_steps = self.options.prefill_weight * seq.num_prompt_tokens
        level = next((i for i, quantum in enumerate(self.quanta) if quantum >= prefill_steps), len(self.quanta) - 1)
        self._levels[seq.seq_id] = _Level(level, 0, now)

    def order(self, running: list[Sequence], waiting: list[Sequence], now: float) -> list[Sequence]:
        starvation = self.options.starvation_s
        for seq in running + waiting:
            state = self._levels[seq.seq_id]
            last_served = seq.last_scheduled_at if seq.last_scheduled_at is not None else seq.arrival_time
            if state.level > 0 and now - max(last_served, state.since) >= starvation:
                self._levels[seq.seq_id] = _Level(0, 0, now)
        return sorted(running + waiting, key=lambda s: (self._levels[s.seq_id].level, self._levels[s.seq_id].since,
                                                        s.arrival_time, s.seq_id))

    def is_overdue(self, seq: Sequence, now: float) -> bool:
        # Starved requests are also not overtaken: one back at the top level but refused for
        # its adapter's slot was passed by the top level's requests of resident adapters.
        return seconds_without_progress(seq, now) >= self.options.starvation_s

    def on_token(self, seq: Sequence, now: float) -> None:
        state = self._levels[seq.seq_id]
        state.tokens += 1
        if state.tokens >= self.quanta[state.level] and state.level < len(self.quanta) - 1:
            self._levels[seq.seq_id] = _Level(state.level + 1, 0, now)

    def on_finish(self, seq: Sequence, now: float) -> None:
        self._levels.pop(seq.seq_id, None)
