"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from inlaid.protocol import SamplingParams

_SEED_STRIDE = 1_000_003  # mixes (seed, step) into one generator seed


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], num_generated: list[int]) -> list[int]:
    """logits: float32 [B, V]. Returns one token id per row.

    A seeded request draws its k-th token from a generator seeded with (seed, k), so its
    output does not depend on which other requests share the batch, and a preempted
    request replays exactly.
    """
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, (param, generated) in enumerate(zip(params, num_generated)):
        if param.temperature == 0.0:
            continue
        row_logits = logits[row] / param.temperature
        if param.top_k > 0 and param.top_k < row_logits.shape[-1]:
            kth = torch.topk(row_logits, param.top_k).values[-1]
            row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
        if param.top_p < 1.0:
            sorted_logits, order = torch.sort(row_logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= param.top_p
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            row_logits = torch.full_like(row_logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(row_logits, dim=-1)
        generator = None
        if param.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed((param.seed * _SEED_STRIDE + generated) % (2**63))
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return tokens
