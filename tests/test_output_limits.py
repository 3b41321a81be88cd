"""Where a completion ends and what its text holds, as OpenAI's API and vLLM have it (found
by an outside probe of the HTTP front, 2026-12-05):

- a `max_tokens` the context cannot hold after the prompt is refused (context_length), not
  run until the context is full and cut with "length"; `max_tokens` None generates until
  the context is full;
- the text of a token in `stop_token_ids` is not in the output (vLLM drops it; a "," stop
  id left "5," where "5" was meant); the token id itself is;
- a character the last token leaves unfinished is dropped, not shown as U+FFFD;
- over HTTP: an empty list of content parts is refused, a bad `max_completion_tokens` is
  named as such, and an unknown model's message says its point once.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from inlaid.client import InvalidRequestError, UnknownTaskError
from inlaid.client.arguments import chat_messages
from inlaid.engine.tokenizer import StreamingDetokenizer, Tokenizer
from inlaid.http.errors import ApiError, from_inlaid
from inlaid.http.schema import ChatCompletionRequest
from inlaid.http.translate import chat_call
from inlaid.protocol import ErrorCode, Generate, SamplingParams

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def coordinator(model_dir, tmp_path_factory):
    """The coordinator's real engine, no processes; replies collected instead of sent."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    made = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path_factory.mktemp("c")))
    made.replies = []
    made.in_flight._send = lambda identity, message: made.replies.append(message)
    return made


def test_a_max_tokens_the_context_cannot_hold_is_refused_and_none_fills_the_context(coordinator):
    in_flight, engine = coordinator.in_flight, coordinator.pool.shards[0].engine
    limit = engine.max_model_len
    prompt = [42] * (limit - 10)

    def generate(request_id: str, max_tokens: int | None) -> None:
        in_flight.generate(b"c", Generate(request_id=request_id, prompt_token_ids=prompt,
                                          sampling=SamplingParams(max_tokens=max_tokens)))

    generate("over", 11)  # the old code admitted it and ended it with "length" after 10 tokens
    refusal = coordinator.replies[-1]
    assert refusal.request_id == "over" and refusal.code == ErrorCode.CONTEXT_LENGTH
    assert f"context length is {limit} tokens" in refusal.message and "at most 10" in refusal.message
    assert (b"c", "over") not in in_flight.requests
    generate("fits", 10)
    generate("fill", None)
    # None: one past the room the prompt leaves, so that the context ends it ("context", not "length")
    for request_id, max_tokens in (("fits", 10), ("fill", 11)):
        request = in_flight.requests[(b"c", request_id)]
        assert engine.sequence(request.engine_id).sampling.max_tokens == max_tokens
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0).validate()
    SamplingParams(max_tokens=None).validate()


@pytest.fixture(scope="module")
def engine(model_dir):
    from inlaid.engine import Engine, EngineConfig

    return Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=2,
                                     max_model_len=256))


def test_a_stop_token_id_ends_the_completion_without_its_text(engine):
    prompt = "Count: 1, 2, 3, 4,"
    free = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    tokens = free.token_ids
    # The first token that is not already among those before it, and has text of its own.
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]
               and engine.tokenizer.decode([tokens[i]]).strip())
    stopped = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True,
                                                       stop_token_ids=[tokens[cut]]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == tokens[: cut + 1]  # the stop token's id is in the output ...
    assert stopped.text == engine.tokenizer.decode(tokens[:cut])  # ... its text is not
    assert free.text.startswith(stopped.text) and len(stopped.text) < len(engine.tokenizer.decode(tokens[: cut + 1]))


def _stop_string_at_the_end(engine, output) -> str:
    """The shortest ending of `output`'s text that the last token completes and that occurs
    nowhere earlier: a stop string met on exactly the last token."""
    before_last = len(engine.tokenizer.decode(output.token_ids[:-1]))
    assert len(output.text) > before_last, "the last token has text of its own"
    for start in range(before_last - 1, -1, -1):
        ending = output.text[start:]
        if output.text.find(ending) == start:
            return ending
    raise AssertionError(f"no ending of {output.text!r} is unique")


def test_a_stop_string_completed_by_the_last_allowed_token_finishes_with_stop(engine):
    """The token that completes a stop string is also the last one max_tokens (or the context)
    allows: the text ends before the stop string and the reason is "stop", as when the stop
    comes earlier (it said "length": a client continuing on "length" went past the stop it
    asked for; vLLM checks stop strings first too)."""
    prompt_ids = engine.tokenizer.encode("Count: 1, 2, 3, 4,")
    filler = engine.tokenizer.encode(" Numbers in order.") * 64
    filling = filler[: engine.max_model_len - 8 - len(prompt_ids)] + prompt_ids  # leaves room for 8
    for prompt, max_tokens, limit in ((prompt_ids, 8, "length"), (filling, 64, "context")):
        free = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
        assert free.finish_reason == limit and len(free.token_ids) == 8
        stop = _stop_string_at_the_end(engine, free)
        stopped = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop=[stop]))[0]
        assert stopped.token_ids == free.token_ids and stopped.text == free.text[: -len(stop)]
        assert stopped.finish_reason == "stop", (max_tokens, stop)


def test_an_unfinished_character_at_the_end_is_dropped_not_shown_as_a_replacement(model_dir):
    tokenizer = Tokenizer(model_dir)
    ids = tokenizer.encode("Hi 🌍")
    partial = ids[:-1]
    assert tokenizer.decode(partial).endswith("\ufffd")  # the earth's last byte is in the last token
    detokenizer = StreamingDetokenizer(tokenizer, stop=[])
    streamed = "".join(detokenizer.add(token) for token in partial) + detokenizer.finish()
    complete = max(k for k in range(len(partial)) if not tokenizer.decode(partial[:k]).endswith("\ufffd"))
    assert streamed == tokenizer.decode(partial[:complete]) == "Hi"  # the old code: "Hi \ufffd"
    whole = StreamingDetokenizer(tokenizer, stop=[])
    assert "".join(whole.add(token) for token in ids) + whole.finish() == "Hi 🌍"


def _chat(**fields) -> ChatCompletionRequest:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


def test_http_chat_limits_and_messages():
    assert chat_call(_chat(), BASE).options["max_tokens"] is None  # until the context is full
    assert chat_call(_chat(max_tokens=9, max_completion_tokens=4), BASE).options["max_tokens"] == 4
    for value in (0, -5):
        with pytest.raises(ApiError) as caught:
            chat_call(_chat(max_tokens=9, max_completion_tokens=value), BASE)
        assert caught.value.param == "max_completion_tokens" and "max_completion_tokens" in caught.value.message
    with pytest.raises(InvalidRequestError) as empty:
        chat_messages([{"role": "user", "content": []}])
    assert empty.value.param == "messages[0].content"
    unknown = from_inlaid(UnknownTaskError("[unknown_task] unknown task 'gpt-4'; this server has: qa, code", "r1"),
                          model="gpt-4", base_model=BASE)
    # The one wording of every unknown model's 404 (errors.model_not_found): the base first, tasks sorted.
    assert unknown.message == f"The model `gpt-4` does not exist; this server has: `{BASE}` (the base model), `code`, `qa`."
    assert unknown.message.count("gpt-4") == 1
