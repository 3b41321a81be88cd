"""The requantizer's calibration NLL (`answer_nll`) in bounded memory, against what an outside
probe found: a float64 log-softmax over the whole vocabulary was held for every answer
position at once, so a 2,500-token reference took the requantizer from 2.18 GB to 4.67 GB
RSS (a 32 KiB calibration line would have needed ~30 GB). The scores are computed in chunks
of positions, with the values of the plain float64 computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inlaid.quant.nll import answer_nll

TESTS_DIR = Path(__file__).resolve().parent


class CharacterTokenizer:
    """One token per character (as the probe's digits were), no chat markup beyond the roles."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool, tokenize: bool) -> str:
        turns = "".join(f"{m['role']}:{m['content']}\n" for m in messages)
        return turns + ("assistant:" if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(character) % self.vocab for character in text]}


class TinyCausalModel(torch.nn.Module):
    """Embeddings then the output projection: the parts answer_nll drives (`layers` marks the
    decoder stack for `_decoder_of`)."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList()
        self.embed = torch.nn.Embedding(vocab, hidden, dtype=dtype)
        self.head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=generator, dtype=dtype))
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=generator, dtype=dtype) * 0.5)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def _example(answer_length: int, index: int) -> dict:
    return {"id": f"e{index}", "messages": [{"role": "user", "content": f"count to {answer_length}"}],
            "reference": "".join(str(digit % 10) for digit in range(answer_length))}


def _float64_reference(model: TinyCausalModel, tokenizer: CharacterTokenizer,
                       example: dict) -> tuple[float, float, int]:
    """(summed NLL, summed impurity, tokens) from one whole-sequence forward, in numpy float64."""
    from inlaid.quant.nll import tokenize_example

    prompt, answer = tokenize_example(example, tokenizer)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt + answer])).last_hidden_state[0]
        logits = model.head(hidden).double().numpy()[len(prompt) - 1: len(prompt) - 1 + len(answer)]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(len(answer)), answer].sum()
    impurity = (1.0 - np.exp(2.0 * log_probs).sum(axis=1)).sum()
    return float(nll), float(impurity), len(answer)


@pytest.mark.parametrize("answer_lengths", [[0], [245, 246, 247], [600, 3, 1000]])
def test_answer_nll_equals_a_plain_float64_computation(answer_lengths: list[int]) -> None:
    """Answers of 10 tokens (the end-of-turn marker alone) to 1,010, alone and batched, across
    chunk boundaries (256 positions) and not at them. A float64 model: any difference is the
    scoring's, not float32 rounding in the projection."""
    vocab = 300
    model = TinyCausalModel(vocab, hidden=16, dtype=torch.float64)
    tokenizer = CharacterTokenizer(vocab)
    examples = [_example(length, index) for index, length in enumerate(answer_lengths)]
    scored = answer_nll(model, tokenizer, examples)
    for example, result in zip(examples, scored):
        nll, impurity, tokens = _float64_reference(model, tokenizer, example)
        assert result.id == example["id"] and result.tokens == tokens
        assert result.nll == pytest.approx(nll, rel=1e-12) and result.impurity == pytest.approx(impurity, rel=1e-12)


def test_chunked_scores_equal_the_float64_reference_on_random_logits() -> None:
    """The scoring alone on random float32 logits (head = identity), at lengths 1, a chunk's,
    around it and several chunks not a multiple of it."""
    from inlaid.quant.nll import SCORED_POSITIONS_PER_CHUNK, answer_token_scores

    generator = torch.Generator().manual_seed(1)
    for length in (1, 17, SCORED_POSITIONS_PER_CHUNK - 1, SCORED_POSITIONS_PER_CHUNK, SCORED_POSITIONS_PER_CHUNK + 1,
                   3 * SCORED_POSITIONS_PER_CHUNK + 45):
        logits = torch.randn(length, 1000, generator=generator) * 6.0
        targets = torch.randint(0, 1000, (length,), generator=generator)
        token_nll, impurity = answer_token_scores(lambda rows: rows, logits, targets)
        assert token_nll.dtype == impurity.dtype == torch.float64 and token_nll.shape == impurity.shape == (length,)
        reference = logits.numpy().astype(np.float64)
        log_probs = reference - reference.max(axis=1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
        # atol: float64 summation order alone, on NLLs near 0
        np.testing.assert_allclose(token_nll.numpy(), -log_probs[np.arange(length), targets.numpy()], rtol=1e-12,
                                   atol=1e-14)
        np.testing.assert_allclose(impurity.numpy(), 1.0 - np.exp(2.0 * log_probs).sum(axis=1), rtol=1e-12,
                                   atol=1e-14)


# Run in a fresh process: its peak RSS (VmHWM, reset just before the call) is this call's alone.
PEAK_RSS_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from test_nll_memory import CharacterTokenizer, TinyCausalModel, _example
from inlaid.quant.nll import answer_nll

def high_water_mark() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

vocab, answer_length = int(sys.argv[2]), int(sys.argv[3])
model = TinyCausalModel(vocab, hidden=32, dtype=torch.float32)
tokenizer = CharacterTokenizer(vocab)
answer_nll(model, tokenizer, [_example(300, 0)])  # warm: allocator, kernels
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets VmHWM to the current RSS
before = high_water_mark()
(result,) = answer_nll(model, tokenizer, [_example(answer_length, 1)])
print(json.dumps({"growth": high_water_mark() - before, "tokens": result.tokens}))
"""


def test_a_long_answer_is_scored_in_bounded_memory() -> None:
    """A 3,000-token answer over an 8,192-entry vocabulary: the old code held ~600 MB of
    float32/float64 vocabulary rows at its peak (3,000 x 8,192 x (4 + 8 + 8) bytes); in
    chunks of 256 positions, ~40 MB. The bound leaves room for a loaded machine's noise."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(TESTS_DIR), "8192", "3000"],
                          capture_output=True, text=True, timeout=300, cwd=TESTS_DIR.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["tokens"] == 3000 + len("<|im_end|>")
    assert measured["growth"] < 150 * 2**20, f"peak RSS grew by {measured['growth'] / 2**20:.0f} MiB"
