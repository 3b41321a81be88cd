"""The OpenAI API's JSON bodies that the front reads and writes, as msgspec Structs.

These are OpenAI's formats, not Inlaid's protocol (that is `inlaid/protocol/`, which
the front speaks to the coordinator through the SDK). Requests are decoded strictly: an
argument OpenAI does not define is refused, as OpenAI does; arguments it defines that
Inlaid cannot honour are declared here so that `translate.py` can refuse them by name.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool = False


class GenerationRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; not used
    # Defined by OpenAI, refused unless neutral:
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names): Inlaid's sampling options beyond OpenAI's.
    top_k: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(GenerationRequest):
    # A text, token ids, or a list of texts / of token-id lists (one choice each).
    prompt: str | list[str | int | list[int]]
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: str
    # A text, or content parts ({"type": "text", "text": ...}; other kinds are refused).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # What an assistant message echoed back from a response may carry; refused unless empty.
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None


class LoadLoraAdapterRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's flag; a different path under a known name always replaces


class UnloadLoraAdapterRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


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
