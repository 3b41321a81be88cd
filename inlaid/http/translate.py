"""OpenAI requests -> the SDK's generate arguments, and the SDK's results -> OpenAI responses.

Only what OpenAI defines and Inlaid cannot do is checked here (n > 1, logprobs, penalties,
tools, images, ...), and OpenAI's own ranges where they are narrower than Inlaid's
(temperature in [0, 2], top_p in [0, 1]): other sampling values go to the server unchanged
and come back as the server's own typed errors, so the front and the SDK refuse the same.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from inlaid.client import GenerateResult, InvalidRequestError
from inlaid.client.arguments import chat_messages
from inlaid.http.errors import bad_request
from inlaid.http.schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
    GenerationRequest,
)
from inlaid.http.settings import DEFAULT_MAX_PROMPTS

# OpenAI's default for the legacy completions endpoint; chat completions default to "as
# many as fit in the context".
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_MAX_TEMPERATURE = 2.0  # OpenAI's bound
# Inlaid's finish reasons -> OpenAI's (the context limit is a length limit to a client).
_FINISH_REASON = {"stop": "stop", "length": "length", "context": "length"}


@dataclass
class GenerationCall:
    """What the front asks the server for: one SDK generate per prompt, the same options."""

    model: str
    task: str | None
    prompts: list[dict[str, Any]]  # each: {"prompt": ...} or {"prompt_token_ids": ...} or {"messages": ...}
    options: dict[str, Any]  # the SDK's sampling keyword arguments
    stream: bool
    include_usage: bool
    base_model: str = ""  # the base's id: a valid `model` too, so an unknown model's 404 names it
    # The field the request's limit came from: the server's refusals name `max_tokens`, the
    # client's answer names the field it sent (`max_completion_tokens` in chat).
    max_tokens_param: str = "max_tokens"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def completion_call(request: CompletionRequest, base_model: str, max_prompts: int = DEFAULT_MAX_PROMPTS
                    ) -> GenerationCall:
    """`max_prompts`: the most prompts one request may list (http.max_prompts_per_request);
    each runs as a request of its own, so a longer list could hold every admission slot."""
    _refuse_if(request.suffix, "suffix", "suffix (insertion) is not supported")
    _refuse_if(request.echo, "echo", "echo is not supported")
    _refuse_if(request.logprobs is not None, "logprobs", "logprobs are not supported")
    _refuse_if(request.best_of not in (None, 1), "best_of", "best_of must be 1")
    prompts = _completion_prompts(request.prompt)
    _refuse_if(len(prompts) > max_prompts, "prompt",
               f"{len(prompts)} prompts in one request; at most {max_prompts} (http.max_prompts_per_request): "
               "send the rest in other requests")
    # Omitted: OpenAI's default (16); null: no limit but the context (vLLM's reading), as in chat.
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if request.max_tokens is msgspec.UNSET else request.max_tokens
    return _call(request, prompts, max_tokens, base_model)


def chat_call(request: ChatCompletionRequest, base_model: str) -> GenerationCall:
    # Each refusal names the argument the client sent (a deprecated name is its own param).
    _refuse_if(request.logprobs, "logprobs", "logprobs are not supported")
    _refuse_if(request.top_logprobs, "top_logprobs", "top_logprobs is not supported (no log probabilities)")
    _refuse_if(request.tools, "tools", "tools are not supported")
    _refuse_if(request.functions, "functions", "functions are not supported")
    _refuse_if(request.tool_choice not in (None, "none"), "tool_choice", "tool calls are not supported")
    _refuse_if(request.function_call not in (None, "none"), "function_call", "function calls are not supported")
    _refuse_if(request.response_format not in (None, {"type": "text"}), "response_format",
               "only the text response format is supported")
    _refuse_if(request.modalities not in (None, ["text"]), "modalities", "only text output is supported")
    _refuse_if(request.audio is not None, "audio", "audio output is not supported")
    _refuse_if(request.reasoning_effort is not None, "reasoning_effort", "reasoning_effort is not supported")
    _refuse_if(request.prediction is not None, "prediction", "predicted outputs are not supported")
    _refuse_if(request.web_search_options is not None, "web_search_options", "web search is not supported")
    _refuse_if(request.moderation is not None, "moderation", "moderation is not supported")
    _refuse_if(request.verbosity not in (None, "medium"), "verbosity",
               f"verbosity {request.verbosity!r} is not supported: only 'medium' (the default)")
    try:  # the SDK's own rule, so that both accept and refuse the same messages
        messages = chat_messages(request.messages)
    except InvalidRequestError as error:
        raise bad_request(error.message, error.param) from None
    # max_completion_tokens is OpenAI's newer name, and names itself in a refusal. Without a
    # limit (None), generate until the context is full (finish_reason "length").
    max_tokens = None if request.max_tokens is msgspec.UNSET else request.max_tokens
    if request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
        _refuse_if(max_tokens < 1, "max_completion_tokens", f"max_completion_tokens must be >= 1, got {max_tokens}")
        return _call(request, [{"messages": messages}], max_tokens, base_model, "max_completion_tokens")
    return _call(request, [{"messages": messages}], max_tokens, base_model)


def _call(
    request: GenerationRequest, prompts: list[dict[str, Any]], max_tokens: int | None, base_model: str,
    max_tokens_param: str = "max_tokens",
) -> GenerationCall:
    _refuse_if(request.n not in (None, 1), "n", "n must be 1 (send several requests for several choices)")
    _refuse_if(request.presence_penalty not in (None, 0), "presence_penalty", "presence_penalty is not supported")
    _refuse_if(request.frequency_penalty not in (None, 0), "frequency_penalty", "frequency_penalty is not supported")
    _refuse_if(request.logit_bias, "logit_bias", "logit_bias is not supported")
    _refuse_if(request.stream_options is not None and not request.stream, "stream_options",
               "stream_options is only allowed with stream=true")
    # OpenAI's ranges: the SDK and the server take any finite temperature >= 0, but a client
    # of this API expects what OpenAI refuses to be refused, not run with another meaning.
    _refuse_if(request.temperature is not None and not 0 <= request.temperature <= _MAX_TEMPERATURE, "temperature",
               f"temperature must be between 0 and {_MAX_TEMPERATURE:g}, got {request.temperature!r}")
    _refuse_if(request.top_p is not None and not 0 <= request.top_p <= 1, "top_p",
               f"top_p must be between 0 and 1, got {request.top_p!r}")
    # (the server's refusal, "top_k must be >= 0 (0 disables it)", is wrong here: -1 is taken)
    _refuse_if(request.top_k is not None and request.top_k < -1, "top_k",
               f"top_k must be -1 or 0 (off) or a positive number of tokens, got {request.top_k!r}")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,  # OpenAI's default
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "top_k": 0 if request.top_k in (None, -1) else request.top_k,  # vLLM's -1 and Inlaid's 0: off
        "seed": request.seed,
        "stop": stop,
        "stop_token_ids": list(request.stop_token_ids or []),
        "ignore_eos": bool(request.ignore_eos),
    }
    return GenerationCall(
        model=request.model,
        task=None if request.model == base_model else request.model,
        prompts=prompts,
        options=options,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        base_model=base_model,
        max_tokens_param=max_tokens_param,
    )


def _refuse_if(condition: object, param: str, message: str) -> None:
    if condition:
        raise bad_request(message, param)


def _completion_prompts(prompt: str | list[Any]) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")  # the server's words for "" and [[]]
    if all(isinstance(item, int) for item in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(item, str) for item in prompt):
        return [{"prompt": item} for item in prompt]
    if all(isinstance(item, list) for item in prompt):
        return [{"prompt_token_ids": item} for item in prompt]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of those lists",
                      "prompt")


# ---------------------------------------------------------------- results


def finish_reason(reason: str) -> str:
    return _FINISH_REASON.get(reason, reason)


def usage(results: list[GenerateResult]) -> Usage:
    prompt = sum(r.num_prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_response(call: GenerationCall, results: list[GenerateResult]) -> Completion:
    choices = [CompletionChoice(index=i, text=r.text, finish_reason=finish_reason(r.finish_reason))
               for i, r in enumerate(results)]
    return Completion(id=f"cmpl-{call.request_id}", created=call.created, model=call.model, choices=choices,
                      usage=usage(results))


def chat_response(call: GenerationCall, result: GenerateResult) -> ChatCompletion:
    choice = ChatChoice(index=0, message=AssistantMessage(content=result.text),
                        finish_reason=finish_reason(result.finish_reason))
    return ChatCompletion(id=f"chatcmpl-{call.request_id}", created=call.created, model=call.model,
                          choices=[choice], usage=usage([result]))
