"""What a request's arguments must be, checked before anything is sent.

A bad argument is an `InvalidRequestError` naming it (its `param`), never a TypeError from
deep inside, and never a request other than the one meant (a str `stop` iterated into its
characters, chat content sent as its Python repr). Chat messages take the OpenAI API's
form, and the HTTP front applies this very rule (`chat_messages`) to its bodies, so the SDK
and the front accept and refuse the same messages.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from inlaid.cli_args import MAX_SECONDS
from inlaid.client.errors import InvalidRequestError
from inlaid.protocol import ChatMessage, SamplingParams, chat_template_role
_TEXT_PART_FIELDS = frozenset({"type", "text"})  # OpenAI's text content part


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One chat message in OpenAI's form, as the HTTP front decodes it and the SDK takes it."""

    role: str
    # A text, or content parts ({"type": "text", "text": ...}; other kinds are refused).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # What an assistant message echoed back from a response may carry: refusal and
    # annotations are accepted and not used; tool calls and audio are refused (below).
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None


ChatMessageArg = Mapping[str, Any] | ChatMessage | ChatMessageIn


def chat_messages(messages: Iterable[ChatMessageArg]) -> list[ChatMessage]:
    """The protocol's messages for OpenAI-style ones (dicts, or `ChatMessageIn` as the front
    decoded them; a `ChatMessage` is checked like the dict of its two fields)."""
    if isinstance(messages, (str, bytes, Mapping, msgspec.Struct)) or not isinstance(messages, Iterable):
        raise InvalidRequestError(f"messages must be a list of chat messages, got {type_name(messages)}",
                                  param="messages")
    converted = [_chat_message(i, _decoded(i, m)) for i, m in enumerate(messages)]
    if not converted:
        raise InvalidRequestError("messages must hold at least one message", param="messages")
    return converted


_MSGSPEC_PATH = re.compile(r" - at `\$([^`]*)`$")
_MSGSPEC_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")


def _decoded(index: int, message: ChatMessageArg) -> ChatMessageIn:
    where = f"messages[{index}]"
    if isinstance(message, ChatMessageIn):  # decoded from JSON by the front: already typed
        return message
    if isinstance(message, ChatMessage):
        # A Struct's constructor checks no types: ChatMessage(5, None) is possible.
        message = {"role": message.role, "content": message.content}
    if not isinstance(message, Mapping):
        raise InvalidRequestError(f"{where} must be a chat message (a dict with role and content), got "
                                  f"{type_name(message)}", param=where)
    try:
        return msgspec.convert(dict(message), ChatMessageIn)
    except msgspec.ValidationError as error:
        text = str(error)
        at = _MSGSPEC_PATH.search(text)
        field = _MSGSPEC_FIELD.match(text)
        param = where + (at.group(1) if at else "") + (f".{field.group(1)}" if field else "")
        raise InvalidRequestError(f"{param}: {_MSGSPEC_PATH.sub('', text)}", param=param) from None


def _chat_message(index: int, message: ChatMessageIn) -> ChatMessage:
    where = f"messages[{index}]"
    try:  # the coordinator applies this same rule to the messages of a raw Generate
        role = chat_template_role(message.role, where)
    except ValueError as error:
        raise InvalidRequestError(str(error), param=f"{where}.role") from None
    if message.tool_calls or message.tool_call_id or message.function_call or message.audio:
        raise InvalidRequestError(f"{where}: tool calls and audio are not supported", param=where)
    content = message.content
    if isinstance(content, list):
        if not content:  # OpenAI refuses it too ("empty array"); it was taken as an empty message
            raise InvalidRequestError(f"{where}.content: an empty list of content parts; give at least one text part",
                                      param=f"{where}.content")
        texts = []
        for j, part in enumerate(content):
            if part.get("type") != "text":
                raise InvalidRequestError(f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                          "supported", param=f"{where}.content")
            if "text" not in part:
                param = f"{where}.content[{j}].text"
                raise InvalidRequestError(f"{param} is required", param=param)
            # Refused by name, as an unknown field of a message is (it was dropped silently).
            extra = sorted(set(part) - _TEXT_PART_FIELDS)
            if extra:
                param = f"{where}.content[{j}].{extra[0]}"
                raise InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
            texts.append(checked_text(part["text"], f"{where}.content[{j}].text"))
        content = "\n".join(texts)
    if content is None:
        raise InvalidRequestError(f"{where}.content is required", param=f"{where}.content")
    return ChatMessage(role=role, content=checked_text(content, f"{where}.content"))


def type_name(value: object) -> str:
    """What a refusal says `value` was: "None" for None (a JSON null: "NoneType" read as jargon)."""
    return "None" if value is None else type(value).__name__


def checked_text(value: str, param: str) -> str:
    """`value` if UTF-8 can carry it: a lone surrogate (from a bad decode, or "\\ud800" in
    code) is refused here by name rather than as the encoder's UnicodeEncodeError."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{param} must be a string, got {type_name(value)}", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(f"{param} is not valid text: {value[error.start]!r} at index {error.start} is a "
                                  "lone surrogate, which UTF-8 cannot encode", param=param) from None
    return value


def checked_stop(stop: str | Iterable[str] | None) -> list[str]:
    """A str is one stop string, as in the OpenAI API (a list of its characters was meant by
    nobody); None is none."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, (bytes, Mapping)) or not isinstance(stop, Iterable):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {type_name(stop)}",
                                  param="stop")
    stops = list(stop)
    for i, item in enumerate(stops):
        if not isinstance(item, str):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {type_name(item)} at "
                                      f"index {i}", param="stop")
        checked_text(item, f"stop[{i}]")
    return stops


def checked_token_ids(ids: Iterable[int] | None, param: str) -> list[int]:
    """A list of token ids (None: an empty one). A lone int is refused rather than guessed at;
    a bool is no token id, though Python counts it an int."""
    if ids is None:
        return []
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise InvalidRequestError(f"{param} must be a list of token ids (integers), got {type_name(ids)}",
                                  param=param)
    values = list(ids)
    for i, item in enumerate(values):
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):  # numpy's bool is no Integral
            raise InvalidRequestError(f"{param} must be a list of token ids (integers), got {type_name(item)} "
                                      f"at index {i}", param=param)
        values[i] = int(item)  # numpy's (a tokenizer's array): msgpack has no form for np.int64
    return values


def checked_path(value: str | os.PathLike[str], param: str) -> str:
    """A path on the server's machine, as a str (a pathlib.Path was refused by the encoder)."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidRequestError(f"{param} must be a path (str or os.PathLike), got {type_name(value)}",
                                  param=param)
    path = checked_text(os.fspath(value), param)
    if not path:  # the server would resolve "" to its own working directory
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    return path


def checked_seconds(value: float, param: str, *, zero_ok: bool = False) -> float:
    """A number of seconds, > 0 (>= 0 with `zero_ok`) and at most MAX_SECONDS, the bound the
    command lines, the server config and the HTTP front share. NaN compares false to every
    bound, so without this it got as far as a poll (ValueError) or waited forever; above
    ~2.1e6 s the blocking client's poll (int32 milliseconds) raised OverflowError after its
    request had gone out, while the asyncio client took even 1e300."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 <= value <= MAX_SECONDS if zero_ok else 0 < value <= MAX_SECONDS):
        bound = ">= 0" if zero_ok else "> 0"
        raise InvalidRequestError(f"{param} must be a number of seconds {bound} and <= {MAX_SECONDS:.0f}, "
                                  f"got {value!r}", param=param)
    return float(value)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "null": "None"}


def checked_sampling_forms(sampling: SamplingParams) -> SamplingParams:
    """`sampling` with each value of the type the server's decoder takes (`max_tokens` an int
    or None, `temperature` a number, `ignore_eos` a bool, ...): `max_tokens=1.5` or
    `temperature="hot"` was sent and came back `malformed`, not an InvalidRequestError, and
    with no `param` (an outside probe). The values themselves are the server's to judge."""
    values = {name: _plain_number(value) for name, value in msgspec.structs.asdict(sampling).items()}
    try:
        return msgspec.convert(values, SamplingParams)
    except msgspec.ValidationError as error:
        at = _MSGSPEC_PATH.search(str(error))
        param = re.split(r"[.\[]", at.group(1).lstrip("."))[0] if at else "sampling"
        expected = re.search(r"Expected `([^`]*)`", str(error))
        wanted = " or ".join(_TYPE_WORDS.get(name, name) for name in expected.group(1).split(" | ")) if expected \
            else "of another type"
        raise InvalidRequestError(f"{param} must be {wanted}, got {getattr(sampling, param, None)!r}",
                                  param=param) from None


def _plain_number(value: Any) -> Any:
    """A numpy (or other) number as the Python int or float it stands for: msgpack has no form
    for `np.float64(0.7)` ("cannot be sent"), and "must be a number, got np.float64(0.7)" read
    as nonsense (the reviewer)."""
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def checked_deadline(deadline_s: float | None) -> float | None:
    """A number or None (its value is the server's to judge): a string or a bool was sent and came back `malformed`."""
    if deadline_s is None:
        return None
    if isinstance(deadline_s, numbers.Real) and not isinstance(deadline_s, bool):
        try:
            return float(deadline_s)  # a numpy number too: msgpack has no form for it
        except OverflowError:  # an int past a float's range
            pass
    raise InvalidRequestError(f"deadline_s must be a number of seconds or None, got {deadline_s!r}", param="deadline_s")
