"""Turning a client's raw ZeroMQ frames into a message, or into the precise error to send back.

Pure functions, no sockets: whatever bytes arrive, the result is a ClientRequest or an
ErrorReply; nothing here raises.
"""

from __future__ import annotations

import re
from typing import Union

import msgspec

from inlaid.protocol import (
    MAX_REQUEST_ID_CHARS, Cancel, ClientRequest, ErrorCode, ErrorReply, Generate, excerpt, reply_id,
)

CLIENT_TAGS = frozenset(cls.__struct_config__.tag for cls in ClientRequest.__args__)  # type: ignore[attr-defined]
_decoder = msgspec.msgpack.Decoder(ClientRequest)


class _Head(msgspec.Struct):
    """The two fields a refusal names, kept undecoded: every other field is skipped, not
    built. Decoding a malformed frame whole to read them took 0.3-0.5 s of the event loop
    for 1 MB of nested arrays (an outside probe: other clients' calls waited seconds)."""

    type: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil: absent
    request_id: msgspec.Raw = msgspec.Raw(b"\xc0")


_head = msgspec.msgpack.Decoder(_Head)
# A map with other scalar keys than strings (which _Head refuses): its values kept undecoded.
_scalar_keyed_head = msgspec.msgpack.Decoder(dict[Union[str, int, float, bool, None], msgspec.Raw])
_MSGPACK_STRING_FIRST_BYTES = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


def _read_head(payload: bytes) -> tuple[str | None, str | None]:
    """(type, request_id) of a frame that is a map, each None unless a string; raises
    msgspec.ValidationError for a frame that is no map (or keyed by arrays or maps), and
    DecodeError for one that is no msgpack."""
    try:
        head = _head.decode(payload)
        kind, request_id = head.type, head.request_id
    except msgspec.ValidationError:
        fields = _scalar_keyed_head.decode(payload)
        kind, request_id = fields.get("type"), fields.get("request_id")
    return _string_or_none(kind), _string_or_none(request_id)


def _string_or_none(raw: msgspec.Raw | None) -> str | None:
    """The value when it is a msgpack string (its first byte says so): anything else is not
    decoded (1 MB of nested arrays in `type` cost what the whole frame did)."""
    data = bytes(raw) if raw is not None else b""
    if not data or data[0] not in _MSGPACK_STRING_FIRST_BYTES:
        return None
    try:
        return msgspec.msgpack.decode(data, type=str)
    except (msgspec.DecodeError, ValueError):
        return None


def decode_client_frames(body: list[bytes], max_frame_bytes: int) -> ClientRequest | ErrorReply:
    """`body`: the frames after the ROUTER's identity frame."""
    if len(body) != 1:
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED,
                          message=f"expected one frame per message, got {len(body)}")
    payload = body[0]
    if len(payload) > max_frame_bytes:
        # Still name the request if we can, so the sender's wait ends: reading one field is
        # cheap next to what the limit guards (tokenizing, queueing).
        return ErrorReply(request_id=readable_request_id(payload), code=ErrorCode.FRAME_TOO_LARGE,
                          message=f"frame of {len(payload)} bytes; the limit is {max_frame_bytes}")
    try:
        message = _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8
        return _explain(payload, error)
    if len(message.request_id) > MAX_REQUEST_ID_CHARS and not isinstance(message, (Generate, Cancel)):
        # Every reply echoes its id: a 1 MB id made each Health answer 1 MB, and a client
        # that never read held gigabytes in the coordinator (an outside probe: 0.5 -> 2.2 GB).
        # Generate's admission refuses it the same way (and counts it); a Cancel is never answered.
        return ErrorReply(request_id="", code=ErrorCode.INVALID_REQUEST, field="request_id",
                          message=f"request_id {excerpt(message.request_id)} is too long: at most "
                                  f"{MAX_REQUEST_ID_CHARS} characters")
    return message


def _explain(payload: bytes, error: Exception) -> ErrorReply:
    # Say as precisely as we can what was wrong, and name the request when possible.
    try:
        kind, request_id = _read_head(payload)
    except msgspec.ValidationError:  # no map, or keyed by arrays: nothing to name; the decoder's words say why
        # ("Expected `object`, got `int`" alone, for bytes that happen to read as a msgpack int: a probe)
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED,
                          message=f"invalid message: a message is one msgpack map with a string `type` "
                                  f"({_bounded(str(error))})")
    except Exception as unreadable:  # invalid msgpack, or nesting too deep in some field: no id reads
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED,
                          message=f"the frame cannot be read: {_bounded(str(unreadable))}")
    request_id = reply_id(request_id)
    if isinstance(kind, str) and kind not in CLIENT_TAGS:
        return ErrorReply(request_id=request_id, code=ErrorCode.UNKNOWN_MESSAGE,
                          message=f"unknown message type {excerpt(kind)}; known: {sorted(CLIENT_TAGS)}")
    # msgspec's words name the field (an unknown one as the client spelled it: bounded).
    return ErrorReply(request_id=request_id, code=ErrorCode.MALFORMED,
                      message=f"invalid message: {_bounded(str(error))}", field=_field_at_fault(str(error)))


_FIELD_CHARS = 128
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED_FIELD = re.compile(r"^Object (?:contains unknown|missing required) field `(?P<name>[^`]*)`")


def _field_at_fault(decoder_message: str) -> str | None:
    """The field msgspec's refusal names, as a path ("sampling.temperature", "prompt_token_ids[1]"),
    or None: a program reads ErrorReply.field, not the message (it was set for `invalid_request`
    alone, an outside probe)."""
    at, named = _AT_PATH.search(decoder_message), _NAMED_FIELD.match(decoder_message)
    path = at.group("path") if at else ""
    if named:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    if len(path) > _FIELD_CHARS:  # a client's 1 MB field name
        path = path[:_FIELD_CHARS] + "..."
    return path or None


def readable_request_id(payload: bytes) -> str:
    """The frame's request_id when that field alone decodes (and is not past the limit), else ""."""
    return readable_head(payload)[1]


def readable_head(payload: bytes) -> tuple[str | None, str]:
    """(type, request_id) of a frame, read as cheaply as `readable_request_id`: (None, "") where
    they cannot be read."""
    try:
        kind, request_id = _read_head(payload)
    except Exception:  # noqa: BLE001  (whatever the bytes: nothing to name)
        return None, ""
    return kind, reply_id(request_id)


_MAX_ERROR_TEXT = 512


def _bounded(text: str) -> str:
    """A decoder's message, which quotes what the client sent (an unknown field's name), cut to
    a bounded length: a 1 MB field name came back whole."""
    return text if len(text) <= _MAX_ERROR_TEXT else f"{text[:_MAX_ERROR_TEXT]}... ({len(text)} characters)"
