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


def test_a_mixed_step_puts_decode_tokens_first(runner):
    """Decode tokens come before prompt chunks whatever order the plan lists them in (each
    low-bit projection multiplies the two parts by their own routes); within each part the
    tokens of one adapter stay together; the decode tokens form one span of queries with
    their context lengths (the native decode attention's input, where it is built); a whole
    prompt attends itself alone (a span), a prompt's later chunk through the cache (a group)."""
    from inlaid.kernels.attention_native import native_attention_available
    from inlaid.protocol import ChunkPlan, SamplingParams as WireSampling

    def chunk(seq_id: int, tokens: int, start: int, slot: int) -> ChunkPlan:
        return ChunkPlan(seq_id=seq_id, token_ids=list(range(100, 100 + tokens)), start_pos=start,
                         block_table=list(range(8 * seq_id, 8 * seq_id + 8)), adapter_slot=slot, sample=True,
                         sampling=WireSampling(), num_generated=0)

    from inlaid.engine.runner import step_order

    plan = [chunk(0, 5, 0, 0), chunk(1, 1, 9, -1), chunk(2, 7, 3, -1), chunk(3, 1, 4, 0), chunk(4, 1, 12, -1)]
    assert runner._build_batch(plan)[0].prompt_rows_start is None  # not in step order: no split claimed
    batch, last_rows = runner._build_batch(step_order(plan))
    assert batch.prompt_rows_start == 3  # three decode tokens, then the two prompt chunks
    assert batch.input_ids[:3].tolist() == [100, 100, 100] and len(batch.input_ids) == 3 + 7 + 5
    decode, prompts = batch.groups
    assert decode.query_span == (0, 3) and prompts.query_span is None
    assert prompts.batch_size == 1 and prompts.max_queries == 7  # seq 2's chunk from position 3
    assert batch.fresh_prompt_spans == [(10, 15)]  # seq 0's whole prompt
    # adapter-less tokens first in each part (slot -1 < 0): decode seqs 1, 4, then 3; prompts 2, then 0
    assert batch.positions[:3].tolist() == [9, 12, 4]
    assert batch.positions[3:].tolist() == list(range(3, 10)) + list(range(0, 5))
    if native_attention_available():
        assert decode.context_lens.tolist() == [10, 13, 5] and prompts.context_lens is None
    assert batch.lora is not None and batch.lora.segment_slots.tolist() == [-1, 0, -1, 0]
    assert sorted(last_rows) == [0, 1, 2, 9, 14]
