"""A request's prompt as token ids, and the errors a request the engine cannot serve raises.

A prompt is a text, a list of token ids or chat messages (rendered by the tokenizer's chat
template). Each is checked before any work scales with its size: a text past the context is
refused from its beginning, ids and messages from their count.
"""

from __future__ import annotations

import secrets

import jinja2

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
                     messages: list[ChatMessage] | list[dict[str, str]] | None,
                     literal_special_tokens: bool = False) -> list[int]:
    """The token ids of a text prompt, of token ids (checked against the vocabulary) or of
    chat messages (dicts or the protocol's, through the chat template); InvalidRequestError
    for anything else. `literal_special_tokens`: the tokenizer's markers' strings in a text
    prompt or the messages' contents are read as text (`special_tokens_in_text = "text"`); the
    chat template's own markers stay control tokens, and token ids stay what they are."""
    pieces: list[tuple[str, bool]] | None = None
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
            # the contents joined: a marker split across two messages a template puts side by side
            if literal_special_tokens and tokenizer.holds_marker("".join(m["content"] for m in chat)):
                pieces = _chat_pieces(tokenizer, chat)
                prompt = "".join(text for text, _ in pieces)
            else:
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
        if pieces is not None:
            token_ids = _literal_chat_ids(tokenizer, pieces)
        elif literal_special_tokens and messages is None and tokenizer.holds_marker(prompt):
            token_ids = _checked_literal(tokenizer, prompt, "prompt")
        else:
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


_NOT_AS_GIVEN = ("this model's chat template does not place each message's text once, as given, so special-token "
                 "strings in it cannot be read as text (special_tokens_in_text = \"text\")")


def literal_mode_problem(tokenizer: Tokenizer) -> str | None:
    """Why `special_tokens_in_text = "text"` cannot be served exactly with this tokenizer, or
    None. Checked at start on probe conversations without any marker, forced through the cut
    path: where it gives other ids than the default path (markers that absorb the spaces
    around them, a prefix added to each encoded piece), text without markers would change
    with the setting."""
    tokenizer.enable_literal()
    if tokenizer.markers_normalized:
        return ("this tokenizer matches some of its markers after normalizing the text, so a marker can hide "
                "in text that does not show it; use special_tokens_in_text = \"control\"")
    if not tokenizer.has_chat_template:
        return None  # text prompts only: encoded whole, as transformers' split_special_tokens does
    # Plain contents first (a template that trims refuses edge spaces), then edge spaces.
    probes = [[{"role": "user", "content": "Hi there"}],
              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
              [{"role": "user", "content": " two  spaces\n and a line "}],
              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\nHi "},
               {"role": "assistant", "content": " Hello."}, {"role": "user", "content": "Bye"}]]
    checked = 0
    for chat in probes:
        try:
            default = tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
            cut = _literal_chat_ids(tokenizer, _chat_pieces(tokenizer, chat))
        except (ValueError, TypeError, jinja2.TemplateError):  # a template that wants other turns, or trims
            continue
        checked += 1
        if cut != default:
            return ("this tokenizer encodes a chat cut at its markers otherwise than whole (its markers strip "
                    "the spaces around them, or each piece gets a prefix), so text mode would change prompts "
                    "without markers; use special_tokens_in_text = \"control\"")
    if not checked:
        return ("its chat template renders none of the probe conversations as given, so text mode cannot be "
                "checked; use special_tokens_in_text = \"control\"")
    return None


def _chat_pieces(tokenizer: Tokenizer, chat: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is a message's content) pieces, in order: the template is
    rendered with a mark in place of each content, and the text cut at the marks, so that the
    template's own markers can be told from strings a content holds. The marks hold a random
    nonce: no content can hold one. ValueError where the template does not place each content
    once, as given (it drops or repeats a message)."""
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{index}\ue001" for index in range(len(chat))]
    rest = tokenizer.apply_chat_template([{**message, "content": mark} for message, mark in zip(chat, marks)],
                                         add_generation_prompt=True)
    pieces: list[tuple[str, bool]] = []
    for message, mark in zip(chat, marks):
        before, found, after = rest.partition(mark)
        if not found or mark in after:
            raise ValueError(_NOT_AS_GIVEN)
        pieces += [(before, False), (message["content"], True)]
        rest = after
    pieces.append((rest, False))
    # A template that changes a content (trims it, strips a reasoning part) placed the mark
    # as given but would render the text otherwise: served so, the prompt was not the default's.
    if "".join(text for text, _ in pieces) != tokenizer.apply_chat_template(chat, add_generation_prompt=True):
        raise ValueError(_NOT_AS_GIVEN)
    return pieces


def _literal_chat_ids(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]) -> list[int]:
    """The ids of the rendered chat with the template's markers as control tokens and the rest,
    contents included, as text. The text between two of the template's markers is encoded
    whole, as the tokenizer encodes the text between markers anyway: a content cut from the
    template text around it tokenized otherwise at its edge ("user\n" + "  two" merged "\n ")."""
    token_ids: list[int] = []
    run: list[str] = []
    for text, is_content in pieces:
        if is_content:
            run.append(text)
            continue
        for index, part in enumerate(tokenizer.marker_pattern.split(text)):
            if index % 2:  # one of the template's own markers
                token_ids += _checked_literal(tokenizer, "".join(run), "messages")
                run = []
                token_ids.append(tokenizer.token_id(part))  # type: ignore[arg-type]
            else:
                run.append(part)
    return token_ids + _checked_literal(tokenizer, "".join(run), "messages")


def _checked_literal(tokenizer: Tokenizer, text: str, field: str) -> list[int]:
    """`encode_literal`, refused where the tokenizer's model itself gives a marker's id (a
    Unigram vocabulary holding "</s>", BPE merges that rebuild "<s>"): read as text, the
    string still ended the turn (an outside review)."""
    token_ids = tokenizer.encode_literal(text)
    if any(token in tokenizer.marker_ids for token in token_ids):
        raise InvalidRequestError("this model's tokenizer encodes a control token's string in this text as the "
                                  "control token even when read as text (special_tokens_in_text = \"text\"); "
                                  "remove it", field)
    return token_ids
