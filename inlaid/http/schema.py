"""The OpenAI API's JSON bodies that the front reads and writes, as msgspec Structs.

These are OpenAI's formats, not Inlaid's protocol (that is `inlaid/protocol/`, which
the front speaks to the coordinator through the SDK). Requests are decoded strictly: an
argument OpenAI does not define is refused, as OpenAI does; arguments it defines that
Inlaid cannot honour are declared here so that `translate.py` can refuse them by name ("...
is not supported"), and those whose value cannot change the answer (`user`, `metadata`, the
prompt-cache hints) are declared and not used. Every argument the installed `openai` client
can send must be declared: `tests/test_http_openai_params.py` checks its signatures.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

# The chat message's form is the SDK's too (it takes OpenAI-style messages by the same rule).
from inlaid.client.arguments import ChatMessageIn

# Every integer a request carries goes on to the coordinator in msgpack, which carries 64
# bits: larger ones are refused here, by field, as any other bad value.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A task's name has at most 128 characters (serve/config.check_task_name): a longer lora_name
# is refused by name here; sent, a 20 KB one got the frame's 413 "send a shorter prompt".
TaskName = Annotated[str, msgspec.Meta(max_length=128)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool = False
    # OpenAI pads stream events with a random `obfuscation` field (against size side channels)
    # unless this is false. Either value is accepted and not used: the front never sends the
    # field, and no client reads it (it is padding, not content).
    include_obfuscation: bool | None = None


class GenerationRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: str
    # UNSET (omitted) and None (an explicit null) differ: /v1/completions gives an omitted
    # max_tokens OpenAI's default (16), and null "until the context is full" (as vLLM does).
    max_tokens: Int64 | None | msgspec.UnsetType = msgspec.UNSET
    temperature: float | None = None
    top_p: float | None = None
    n: Int64 | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; not used
    # OpenAI's successors to `user` (its abuse detection and cache bucketing): not used either.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None  # OpenAI's billing tier; there is one tier here, not used
    # Defined by OpenAI, refused unless neutral:
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names): Inlaid's sampling options beyond OpenAI's.
    top_k: Int64 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int64] | None = None


class CompletionRequest(GenerationRequest):
    # A text, token ids, or a list of texts / of token-id lists (one choice each).
    prompt: str | list[str | Int64 | list[Int64]]
    suffix: str | None = None
    echo: bool | None = None
    logprobs: Int64 | None = None
    best_of: Int64 | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessageIn]
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # Bookkeeping for OpenAI's stored completions: nothing is stored here, so accepted and not used.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # OpenAI's prompt-cache hints: caching changes what a request costs, never its answer
    # (the server's prefix cache, if any, is its own), so accepted and not used.
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    # Defined by OpenAI, refused unless neutral (text output, no reasoning, no audio):
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None  # a moderation model may block the answer: refused
    # "low" / "high" ask a reasoning model for a shorter / longer answer; "medium" is OpenAI's
    # default, the answer as the model gives it, so only it (or null) is accepted.
    verbosity: str | None = None


class LoadLoraAdapterRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    lora_name: TaskName
    lora_path: str
    load_inplace: bool = False  # vLLM's flag; a different path under a known name always replaces


class UnloadLoraAdapterRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    lora_name: TaskName
    lora_int_id: Int64 | None = None  # vLLM's; names identify adapters here


# ---------------------------------------------------------------- responses


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"
    system_fingerprint: None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"
    system_fingerprint: None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    owned_by: str
    root: str  # the base model, or the adapter's directory
    parent: str | None  # None for the base model; the base for a task
    max_model_len: int
    object: str = "model"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody
