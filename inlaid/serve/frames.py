"""Turning a client's raw ZeroMQ frames into a message, or into the precise error to send back.

Pure functions, no sockets: whatever bytes arrive, the result is a ClientRequest or an
ErrorReply; nothing here raises.
"""

from __future__ import annotations

import msgspec

from inlaid.protocol import ClientRequest, ErrorCode, ErrorReply, excerpt, reply_id

CLIENT_TAGS = frozenset(cls.__struct_config__.tag for cls in ClientRequest.__args__)  # type: ignore[attr-defined]
_decoder = msgspec.msgpack.Decoder(ClientRequest)


class _RequestIdOnly(msgspec.Struct):
    request_id: str = ""


_request_id_only = msgspec.msgpack.Decoder(_RequestIdOnly)


class _Head(msgspec.Struct):
    """The two fields a refusal names, kept undecoded: every other field is skipped, not
    built. Decoding a malformed frame whole to read them took 0.3-0.5 s of the event loop
    for 1 MB of nested arrays (an outside probe: other clients' calls waited seconds)."""

    type: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil: absent
    request_id: msgspec.Raw = msgspec.Raw(b"\xc0")


_head = msgspec.msgpack.Decoder(_Head)


def decode_client_frames(body: list[bytes], max_frame_bytes: int) -> ClientRequest | ErrorReply:
    """`body`: the frames after the ROUTER's identity frame."""
    if len(body) != 1:
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED,
                          message=f"expected one frame per message, got {len(body)}")
    payload = body[0]
    if len(payload) > max_frame_bytes:
        # Still name the request if we can, so the sender's wait ends: reading one field is
        # cheap next to what the limit guards (tokenizing, queueing).
        return ErrorReply(request_id=_readable_request_id(payload), code=ErrorCode.FRAME_TOO_LARGE,
                          message=f"frame of {len(payload)} bytes; the limit is {max_frame_bytes}")
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8
        return _explain(payload, error)


def _explain(payload: bytes, error: Exception) -> ErrorReply:
    # Say as precisely as we can what was wrong, and name the request when possible.
    try:
        head = _head.decode(payload)
        request_id, kind = (msgspec.msgpack.decode(head.request_id), msgspec.msgpack.decode(head.type))
    except msgspec.ValidationError:  # readable, but no map: nothing to name; the decoder's words say why
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED, message=f"invalid message: {_bounded(str(error))}")
    except Exception as unreadable:  # invalid msgpack, bad UTF-8 or nesting too deep in some field
        # Still name the request when its id alone reads (bad UTF-8 in the prompt left the id
        # fine, and the sender waited for its timeout), and say what could not be read.
        return ErrorReply(request_id=_readable_request_id(payload), code=ErrorCode.MALFORMED,
                          message=f"the frame cannot be read: {_bounded(str(unreadable))}")
    request_id = reply_id(request_id)
    if isinstance(kind, str) and kind not in CLIENT_TAGS:
        return ErrorReply(request_id=request_id, code=ErrorCode.UNKNOWN_MESSAGE,
                          message=f"unknown message type {excerpt(kind)}; known: {sorted(CLIENT_TAGS)}")
    # msgspec's words name the field (an unknown one as the client spelled it: bounded).
    return ErrorReply(request_id=request_id, code=ErrorCode.MALFORMED, message=f"invalid message: {_bounded(str(error))}")


def _readable_request_id(payload: bytes) -> str:
    """The frame's request_id when that field alone decodes (and is not past the limit), else ""."""
    try:
        request_id = _request_id_only.decode(payload).request_id
    except Exception:  # noqa: BLE001  (whatever the bytes: no id to name)
        return ""
    return reply_id(request_id)


_MAX_ERROR_TEXT = 512


def _bounded(text: str) -> str:
    """A decoder's message, which quotes what the client sent (an unknown field's name), cut to
    a bounded length: a 1 MB field name came back whole."""
    return text if len(text) <= _MAX_ERROR_TEXT else f"{text[:_MAX_ERROR_TEXT]}... ({len(text)} characters)"
