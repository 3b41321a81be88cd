"""Paged KV cache behaviour: mixed lengths, block reuse, chunked prefill, preemption."""

from __future__ import annotations

import pytest

from inlaid.engine import Engine, EngineConfig, SamplingParams

PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon who guarded a library of ancient books in the north, and how "
    "a young scholar finally earned its trust after many winters of patient study.",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Explain photosynthesis in simple words for a child of seven years old.",
    "Name a planet.",
]
NEW_TOKENS = 12
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def runner(model_dir):
    from inlaid.engine.runner import ModelRunner

    return ModelRunner(EngineConfig(model_dir=str(model_dir), dtype="float32", num_kv_blocks=256,
                                    block_size=BLOCK_SIZE, max_lora_slots=1, max_lora_rank=8))


def _engine(runner, model_dir, **limits) -> Engine:
    config = EngineConfig(model_dir=str(model_dir), dtype="float32", block_size=BLOCK_SIZE,
                          max_lora_slots=1, max_lora_rank=8, **limits)
    assert config.num_kv_blocks <= runner.config.num_kv_blocks
    return Engine(config, runner=runner)


def _greedy(engine: Engine, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def alone(runner, model_dir) -> list[list[int]]:
    """Each prompt run by itself, with a roomy cache: the reference."""
    return [_greedy(_engine(runner, model_dir, num_kv_blocks=256), [p])[0] for p in PROMPTS]


def test_batch_of_very_different_lengths_equals_each_alone(runner, model_dir, alone):
    engine = _engine(runner, model_dir, num_kv_blocks=256)
    assert _greedy(engine, PROMPTS) == alone


def test_blocks_are_freed_and_reused(runner, model_dir, alone):
    engine = _engine(runner, model_dir, num_kv_blocks=64)
    blocks = engine.scheduler.blocks
    assert _greedy(engine, PROMPTS[:3]) == alone[:3]
    assert blocks.num_free_blocks == blocks.num_blocks
    # The same (now dirty) blocks serve new sequences correctly.
    assert _greedy(engine, PROMPTS[3:]) == alone[3:]
    assert blocks.num_free_blocks == blocks.num_blocks


def test_chunked_prefill_gives_the_same_tokens(runner, model_dir, alone):
    engine = _engine(runner, model_dir, num_kv_blocks=256, max_num_batched_tokens=7)
    assert _greedy(engine, PROMPTS) == alone


def test_preemption_and_resume_give_the_same_tokens(runner, model_dir, alone):
    # Room for the long prompt plus little else: sequences must be preempted and recomputed.
    engine = _engine(runner, model_dir, num_kv_blocks=22)
    ids = [engine.add_request(p, sampling=SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)) for p in PROMPTS]
    sequences = [engine.sequence(i) for i in ids]
    while engine.has_unfinished():
        engine.step()
    assert sum(s.num_preemptions for s in sequences) > 0
    assert [s.output_token_ids for s in sequences] == alone
    assert engine.scheduler.blocks.num_free_blocks == 22


def test_prompt_longer_than_context_is_rejected(runner, model_dir):
    from inlaid.engine import InvalidRequestError

    engine = _engine(runner, model_dir, num_kv_blocks=64, max_model_len=32)
    with pytest.raises(InvalidRequestError, match="context length"):
        engine.add_request(list(range(100, 140)))
