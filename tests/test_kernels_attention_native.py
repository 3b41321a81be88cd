"""The native CPU decode attention (kernels/attention_native.c) against a float64 computation
from the cache itself, on fresh random inputs with the output poisoned and every cache entry it
must not read (other blocks, keys past each context inside its last block) set to NaN; its
refusals; and the engine's decode steps through it against torch's gather + SDPA route."""

from __future__ import annotations

import pytest
import torch

import inlaid.engine.model as model_module
from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.kernels import attention_native
from inlaid.kernels.attention_native import (
    AttentionArgumentError,
    decode_attention,
    decode_attention_reference,
    native_attention_available,
    native_attention_unavailable_reason,
)

pytestmark = pytest.mark.skipif(not native_attention_available(),
                                reason=f"native attention not built here: {native_attention_unavailable_reason()}")

SHAPES = [  # (heads, kv_heads, head_dim, block_size)
    (9, 3, 64, 16),  # the default model's
    (8, 8, 128, 8),  # no grouping, wide heads
    (4, 1, 16, 4),  # every query head on one kv head
    (16, 1, 32, 32),  # the widest group the kernel holds
]
CONTEXTS = [1, 15, 16, 17, 300, 4, 33]  # one key, around a 16-float vector, a long one


def _case(heads: int, kv_heads: int, head_dim: int, block_size: int, contexts: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-length // block_size) for length in contexts)
    num_blocks = max_blocks * len(contexts) + 3
    key_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    order = torch.randperm(num_blocks, generator=generator)  # blocks scattered through the cache
    tables = torch.zeros(len(contexts), max_blocks, dtype=torch.int64)
    for b, length in enumerate(contexts):
        blocks = order[b * max_blocks : b * max_blocks + -(-length // block_size)]
        tables[b, : len(blocks)] = blocks
        tables[b, len(blocks):] = num_blocks - 1 if len(blocks) < max_blocks else 0  # padding: never read
        for position in range(length):  # only the keys the context reaches hold numbers
            block, offset = blocks[position // block_size], position % block_size
            key_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=generator) * 2
            value_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=generator)
    queries = torch.randn(len(contexts), heads * head_dim, generator=generator)
    return queries, key_cache, value_cache, tables, torch.tensor(contexts, dtype=torch.int64)


def _float64_reference(queries, key_cache, value_cache, tables, lengths, scale) -> torch.Tensor:
    clean = [torch.nan_to_num(cache.double(), nan=0.0) for cache in (key_cache, value_cache)]
    return decode_attention_reference(queries.double(), *clean, tables, lengths, scale)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_attention_equals_float64(heads: int, kv_heads: int, head_dim: int, block_size: int, seed: int) -> None:
    contexts = CONTEXTS[seed:] + CONTEXTS[:seed]
    queries, key_cache, value_cache, tables, lengths = _case(heads, kv_heads, head_dim, block_size, contexts, seed)
    scale = head_dim**-0.5
    out = torch.full((len(contexts), heads * head_dim), float("nan"))  # poisoned: written whole
    got = decode_attention(queries, key_cache, value_cache, tables, lengths, scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = _float64_reference(queries, key_cache, value_cache, tables, lengths, scale)
    assert torch.isfinite(got).all()  # no NaN entry of the cache was read
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    # A context of one key returns that key's value exactly, for each of its query heads.
    one = contexts.index(1)
    first_value = value_cache[tables[one, 0], 0]  # [kv_heads, head_dim]
    expected = first_value.repeat_interleave(heads // kv_heads, dim=0).reshape(-1)
    torch.testing.assert_close(got[one], expected, rtol=0, atol=1e-6)


def test_large_scores_do_not_overflow() -> None:
    """Scores in the thousands (the max is subtracted before exp) give the float64 softmax."""
    queries, key_cache, value_cache, tables, lengths = _case(9, 3, 64, 16, [40, 3], seed=5)
    out = torch.full((2, 9 * 64), float("nan"))  # poisoned: written whole
    got = decode_attention(queries * 300, key_cache, value_cache, tables, lengths, 0.125, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    want = _float64_reference(queries * 300, key_cache, value_cache, tables, lengths, 0.125)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_decode_attention_refuses_what_it_cannot_take() -> None:
    queries, key_cache, value_cache, tables, lengths = _case(9, 3, 64, 16, [20, 5], seed=2)
    out = torch.zeros(2, 9 * 64)
    refusals = {
        "context length": (queries, key_cache, value_cache, tables, torch.tensor([20, 0])),
        "past its table": (queries, key_cache, value_cache, tables, torch.tensor([20, 33])),
        "block outside": (queries, key_cache, value_cache, tables.clone().fill_(key_cache.shape[0]), lengths),
        "bf16": (queries.bfloat16(), key_cache, value_cache, tables, lengths),
        "table dtype": (queries, key_cache, value_cache, tables.int(), lengths),
    }
    for what, arguments in refusals.items():
        with pytest.raises(AttentionArgumentError):
            decode_attention(*arguments, 0.125, out=out)
        assert torch.equal(out, torch.zeros(2, 9 * 64)), what  # nothing written by a refused call
    with pytest.raises(AttentionArgumentError, match="multiple of 16"):
        odd = key_cache[..., :24].contiguous()
        decode_attention(queries[:, : 9 * 24].contiguous(), odd, odd, tables, lengths, 0.2)
    with pytest.raises(AttentionArgumentError, match="out must be"):
        decode_attention(queries, key_cache, value_cache, tables, lengths, 0.125, out=torch.zeros(2, 10))


PROMPTS = ["Hi", "Tell me a long story about a dragon who guarded a library of ancient books in the north.",
           "1, 2, 3, 4,", "The quick brown fox"]


def test_engine_decode_steps_take_it_and_match_the_sdpa_route(model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same greedy requests (mixed lengths, block size 4: contexts cross many blocks) with
    the kernel on and off: identical tokens, and the kernel served every decode step's layers
    when on and none when off."""
    calls: list[int] = []
    real = model_module.decode_attention

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "decode_attention", counted)
    config = EngineConfig(model_dir=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=128,
                          max_lora_slots=1, max_lora_rank=8)
    engine = Engine.local(config)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outputs = {}
    for native in (True, False):
        monkeypatch.setattr(attention_native, "USE_NATIVE", native)
        calls.clear()
        outputs[native] = [o.token_ids for o in engine.generate(PROMPTS, params)]
        num_layers = len(engine.runner.model.layers)
        if native:  # every layer of every step took each decode token (7 a request) through it,
            # and each prompt of one token (its prefill is one query too)
            one_token_prompts = sum(len(engine.tokenizer.encode(prompt)) == 1 for prompt in PROMPTS)
            assert one_token_prompts == 1  # "Hi"
            assert len(calls) % num_layers == 0
            assert sum(calls) == (7 * len(PROMPTS) + one_token_prompts) * num_layers
            assert max(calls) > 1  # decode tokens of several requests in one call
        else:
            assert calls == []
    assert outputs[True] == outputs[False]
