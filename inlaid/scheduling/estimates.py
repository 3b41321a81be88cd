"""Predicted output length at arrival, and predicted remaining tokens as a request runs.

A request whose prediction proves too short is re-ranked, never left with a stale or
negative estimate: its predicted total doubles each time it is exceeded (an exponential
search for its length), so its remaining estimate stays positive and grows with its age.
The request's `max_tokens` caps every estimate.
"""

from __future__ import annotations

from typing import Protocol
from collections.abc import Sequence as SequenceType

from inlaid.engine.sequence import FinishReason, Sequence


class LengthModel(Protocol):
    def predict(self, task: str | None, prompt_token_ids: SequenceType[int]) -> float: ...

    def observe(self, task: str | None, prompt_token_ids: SequenceType[int], output_tokens: int) -> None: ...


def predict_on_arrival(model: LengthModel, seq: Sequence) -> None:
    predicted = model.predict(seq.adapter, seq.prompt_token_ids)
    seq.predicted_output_tokens = min(float(seq.sampling.max_tokens), max(1.0, predicted))


def remaining_tokens(seq: Sequence) -> float:
    predicted = seq.predicted_output_tokens or float(seq.sampling.max_tokens)
    generated = seq.num_generated
    while predicted <= generated:
        predicted *= 2.0
    return max(1.0, min(float(seq.sampling.max_tokens - generated), predicted - generated))


def learn_on_finish(model: LengthModel, seq: Sequence) -> None:
    """Only complete outputs teach the model: a cancelled request's length is unknown."""
    if seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and seq.num_generated > 0:
        model.observe(seq.adapter, seq.prompt_token_ids, seq.num_generated)


class ExactLengths:
    """The clairvoyant length model of the simulator's oracle: every request's true output
    length, by (task, prompt). Greedy decoding makes it a function of both."""

    def __init__(self, lengths: dict[tuple[str | None, tuple[int, ...]], int]) -> None:
        self.lengths = lengths

    def predict(self, task: str | None, prompt_token_ids: SequenceType[int]) -> float:
        return float(self.lengths[(task, tuple(prompt_token_ids))])

    def observe(self, task: str | None, prompt_token_ids: SequenceType[int], output_tokens: int) -> None:
        """It knows everything already."""
