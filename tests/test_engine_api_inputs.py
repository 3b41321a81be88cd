"""The in-process engine's Python API takes what a researcher passes it, or refuses it in one
InvalidRequestError naming the field (an outside probe, 2026-12-07, against transformers +
PEFT: every output matched; these inputs did not):

- `SamplingParams` built in Python is not type-checked as a decoded frame is: `stop="ab"` was
  read as the stop strings "a" and "b" (cut at the first "a"), and `top_k=1.5` or `seed=1.5`
  reached the sampler and raised inside the step, failing the whole batch;
- a `generate` refused part-way left the requests added before the bad one queued: the next
  call ran them too and threw their outputs away;
- a prompt with a lone surrogate, a prompt that is an int, and bools as token ids;
- `generate(prompts, messages=...)` ignored the messages; an adapter named None or "";
- `max_tokens=None` ended at the context saying "length", as if a limit had been asked.
"""

from __future__ import annotations

import pytest

from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.engine.engine import InvalidRequestError
from inlaid.protocol import SamplingError

CONTEXT = 64


@pytest.mark.parametrize("values, field", [
    (dict(stop="ab"), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(top_k=1.5, temperature=1.0), "top_k"),
    (dict(seed=1.5, temperature=1.0), "seed"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature="1"), "temperature"),
    (dict(ignore_eos=1), "ignore_eos"),
])
def test_sampling_values_of_the_wrong_type_are_refused_naming_the_field(values, field):
    with pytest.raises(SamplingError) as refused:
        SamplingParams(**values).validate()
    assert refused.value.field == field and str(refused.value).startswith(f"{field}: Expected"), refused.value


def test_values_of_the_right_type_still_pass():
    SamplingParams(max_tokens=None, temperature=1, top_k=3, seed=2**64 - 1, stop=["ab"], stop_token_ids=[2]).validate()


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.local(EngineConfig(model_dir=str(model_dir), max_model_len=CONTEXT, threads=1, num_kv_blocks=64))


def test_a_refused_batch_leaves_nothing_queued(engine):
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        engine.generate(["Hello", "World", ""], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()
    (only,) = engine.generate(["Bye"], SamplingParams(max_tokens=2))
    assert len(only.token_ids) == 2 and not engine.has_unfinished()


@pytest.mark.parametrize("prompt, words", [
    ("ok \ud800", "the prompt is not valid text: surrogates not allowed at character 3"),
    (5, "a prompt is a string or a list of token ids, not int"),
    ([True, 5], "prompt token ids must be integers"),
])
def test_prompts_that_are_no_text_or_token_ids_are_refused(engine, prompt, words):
    with pytest.raises(InvalidRequestError, match=words):
        engine.generate([prompt], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()


def test_prompts_and_messages_together_and_nameless_adapters_are_refused(engine):
    with pytest.raises(InvalidRequestError, match="give prompts or messages, not both"):
        engine.generate(["a"], messages=[[{"role": "user", "content": "b"}]])
    for name in (None, ""):
        with pytest.raises(InvalidRequestError, match="an adapter's name must be a non-empty string"):
            engine.register_adapter(name, "unused")  # type: ignore[arg-type]
    assert engine.adapter_names == []


def test_no_max_tokens_ends_at_the_context_and_says_so(engine):
    prompt = engine.tokenizer.encode("Tell me a story about the sea.")
    room = CONTEXT - len(prompt)
    unbounded, bounded = engine.generate([prompt, prompt], [SamplingParams(max_tokens=None, ignore_eos=True),
                                                            SamplingParams(max_tokens=room, ignore_eos=True)])
    assert (unbounded.finish_reason, len(unbounded.token_ids)) == ("context", room)
    assert (bounded.finish_reason, len(bounded.token_ids)) == ("length", room)
    assert unbounded.token_ids == bounded.token_ids
