"""A step whose execution raises, in the in-process engine (an outside review, 2026-12-07):
the plan's sequences stayed running with nothing left to compute and their KV blocks held,
`has_unfinished()` stayed true and `while engine.has_unfinished(): engine.step()` spun
forever. Now they go back to the queue (recomputed, as after a preemption) and the step loop
finishes with the tokens of an undisturbed run; `generate()` interrupted ends its own batch.

The fault is injected where a real one strikes (Ctrl-C in an adapter load, an error in the
model's forward); everything else is the real engine on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.scheduling.step_log import StepLogPolicy

PROMPTS = ["The capital of France is a city that", "def add(a, b):"]
TOKENS = 8


def _engine(model_dir, adapter_dirs, step_log: Path | None = None) -> Engine:
    # An 8-token budget: the prompts are chunked, so a step fails with a prompt half computed.
    config = EngineConfig(model_dir=str(model_dir), dtype="float32", max_lora_slots=2, max_lora_rank=32,
                          num_kv_blocks=16, block_size=16, max_num_batched_tokens=8)
    engine = Engine.local(config, StepLogPolicy(SchedulingPolicy(), step_log) if step_log else None)
    engine.register_adapter("attn-r8", str(adapter_dirs["attn-r8"]))
    return engine


def _fail_once(monkeypatch, owner: object, name: str, on_call: int, error: BaseException) -> list[int]:
    real, calls = getattr(owner, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


@pytest.fixture(scope="module")
def reference(model_dir, adapter_dirs) -> list[list[int]]:
    outputs = _engine(model_dir, adapter_dirs).generate(
        PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True), ["attn-r8", None])
    return [output.token_ids for output in outputs]


def test_a_step_interrupted_in_an_adapter_load_is_run_again(model_dir, adapter_dirs, reference, monkeypatch,
                                                             tmp_path) -> None:
    """Ctrl-C while the first step loads the adapter: the slot the scheduler had given it holds
    nothing, so the adapter must be loaded again, or its request runs as the base model. The
    undone sequences wait in their order of arrival, and the step log has no line for the
    step that never ran (nor keeps its record)."""
    engine = _engine(model_dir, adapter_dirs, step_log=tmp_path / "steps.jsonl")
    calls = _fail_once(monkeypatch, engine.runner, "load_adapter", 1, KeyboardInterrupt())
    ids = [engine.add_request(prompt, sampling=SamplingParams(max_tokens=TOKENS, ignore_eos=True), adapter=adapter)
           for prompt, adapter in zip(PROMPTS, ["attn-r8", None])]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    interrupted = steps = 0
    while engine.has_unfinished():
        steps += 1
        assert steps < 200, "the step loop does not end"
        try:
            outputs = engine.step()
        except KeyboardInterrupt:
            interrupted += 1
            waiting = [seq.seq_id for seq in engine.scheduler.waiting]
            assert waiting == sorted(waiting) and len(waiting) == len(ids)
            assert not engine.scheduler.policy._pending
            continue
        for output in outputs:
            tokens[output.request_id] += output.new_token_ids
    assert interrupted == 1 and calls[0] == 2  # loaded again after the interrupt
    assert [tokens[request_id] for request_id in ids] == reference
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == engine.config.num_kv_blocks, blocks.num_free_blocks
    logged = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(logged) == steps - interrupted and [line["step"] for line in logged] == sorted(
        line["step"] for line in logged)


def test_a_forward_that_raises_mid_prefill_leaves_nothing_running(model_dir, adapter_dirs, reference,
                                                                   monkeypatch) -> None:
    engine = _engine(model_dir, adapter_dirs)
    model = engine.runner.model
    _fail_once(monkeypatch, model, "forward", 2, RuntimeError("simulated device fault"))
    with pytest.raises(RuntimeError, match="simulated device fault"):
        engine.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True), ["attn-r8", None])
    # generate() ended its own batch: nothing left running, every block free
    assert not engine.has_unfinished() and engine.begin_step() is None
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks
    # and the engine serves on, with an undisturbed run's tokens
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, ignore_eos=True), ["attn-r8", None])
    assert [output.token_ids for output in outputs] == reference
