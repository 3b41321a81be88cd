"""A request's prompt as token ids, and the errors a request the engine cannot serve raises.

A prompt is a text, a list of token ids or chat messages (rendered by the tokenizer's chat
template). Each is checked before any work scales with its size: a text past the context is
refused from its beginning, ids and messages from their count.
"""

from __future__ import annotations

from inlaid.engine.chat import template_messages
from inlaid.engine.tokenizer import Tokenizer
from inlaid.protocol import ChatMessage


class InvalidRequestError(ValueError):
    """A request the engine cannot serve (bad prompt, unknown adapter, bad sampling values);
    `field` names the request's field at fault when one is (the HTTP front's `param`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PromptTooLongError(InvalidRequestError):
    """A prompt known to exceed the context before it was read whole: a text from its
    beginning alone, chat messages from their count, token ids from theirs (`exact`: then
    `at_least_tokens` is the prompt's length itself)."""

    def __init__(self, at_least_tokens: int, max_model_len: int, *, exact: bool = False) -> None:
        length = f"{at_least_tokens} tokens" if exact else f"more than {at_least_tokens - 1} tokens"
        super().__init__(f"the prompt has {length}; the context length is {max_model_len} and at least one new "
                         "token must fit", "prompt")
        self.at_least_tokens = at_least_tokens


# A text longer than this many characters per context token is first tokenized only up to
# there: past the context already, it is refused without tokenizing the rest (a 1 MB prompt
# takes ~0.5 s to tokenize, on the loop every client shares).
_PROMPT_PREFIX_CHARS_PER_TOKEN = 16


def prompt_token_ids(tokenizer: Tokenizer, max_model_len: int, vocab_size: int, prompt: str | list[int] | None,
                     messages: list[ChatMessage] | list[dict[str, str]] | None) -> list[int]:
    """The token ids of a text prompt, of token ids (checked against the vocabulary) or of
    chat messages (dicts or the protocol's, through the chat template); InvalidRequestError
    for anything else."""
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("give exactly one of a prompt or chat messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", "messages")
        if len(messages) >= max_model_len:
            # Each message renders to a token at least (its role's marker): refused before
            # rendering 40k of them (~150 ms on the loop every client shares).
            raise PromptTooLongError(len(messages), max_model_len)
        try:
            chat = template_messages(messages)
        except ValueError as error:
            raise InvalidRequestError(str(error), "messages") from None
        try:
            prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        except (ValueError, TypeError) as error:  # TypeError: a lone surrogate, which no tokenizer encodes
            raise InvalidRequestError(f"the messages cannot be tokenized: {error}", "messages") from error
    if isinstance(prompt, str):
        try:  # a lone surrogate ("\ud800") has no UTF-8: the tokenizer raised a bare TypeError
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidRequestError(f"the prompt is not valid text: {error.reason} at character "
                                      f"{error.start}", "prompt") from None
        prefix_chars = max_model_len * _PROMPT_PREFIX_CHARS_PER_TOKEN
        if len(prompt) > prefix_chars:
            # Cutting the text can change how its last word splits, by a token at most.
            at_least = len(tokenizer.encode(prompt[:prefix_chars])) - 1
            if at_least >= max_model_len:
                raise PromptTooLongError(at_least, max_model_len)
        token_ids = tokenizer.encode(prompt)
    elif not isinstance(prompt, (list, tuple)):
        raise InvalidRequestError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}",
                                  "prompt")
    else:
        token_ids = list(prompt)
        if len(token_ids) >= max_model_len:  # refused before checking each of 1M ids
            raise PromptTooLongError(len(token_ids), max_model_len, exact=True)
        bad = next((i for i, t in enumerate(token_ids)
                    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size}), got "
                                      f"{token_ids[bad]!r:.40} at index {bad}")
    if not token_ids:
        raise InvalidRequestError("the prompt is empty")
    return token_ids

