"""Turning a client's raw ZeroMQ frames into a message, or into the precise error to send back.

Pure functions, no sockets: whatever bytes arrive, the result is a ClientRequest or an
ErrorReply; nothing here raises.
"""

from __future__ import annotations

import msgspec

from inlaid.protocol import ClientRequest, ErrorCode, ErrorReply

CLIENT_TAGS = frozenset(cls.__struct_config__.tag for cls in ClientRequest.__args__)  # type: ignore[attr-defined]
_decoder = msgspec.msgpack.Decoder(ClientRequest)


class _RequestIdOnly(msgspec.Struct):
    request_id: str = ""


_request_id_only = msgspec.msgpack.Decoder(_RequestIdOnly)


def decode_client_frames(body: list[bytes], max_frame_bytes: int) -> ClientRequest | ErrorReply:
    """`body`: the frames after the ROUTER's identity frame."""
    if len(body) != 1:
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED,
                          message=f"expected one frame per message, got {len(body)}")
    payload = body[0]
    if len(payload) > max_frame_bytes:
        # Still name the request if we can, so the sender's wait ends: reading one field is
        # cheap next to what the limit guards (tokenizing, queueing).
        try:
            request_id = _request_id_only.decode(payload).request_id
        except Exception:
            request_id = ""
        return ErrorReply(request_id=request_id, code=ErrorCode.FRAME_TOO_LARGE,
                          message=f"frame of {len(payload)} bytes; the limit is {max_frame_bytes}")
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8
        return _explain(payload, error)


def _explain(payload: bytes, error: Exception) -> ErrorReply:
    # Say as precisely as we can what was wrong, and name the request when possible.
    try:
        loose = msgspec.msgpack.decode(payload)
    except Exception:  # invalid msgpack, bad UTF-8, nesting too deep: all just garbage
        return ErrorReply(request_id="", code=ErrorCode.MALFORMED, message="the frame is not valid msgpack")
    request_id = loose.get("request_id", "") if isinstance(loose, dict) else ""
    request_id = request_id if isinstance(request_id, str) else ""
    kind = loose.get("type") if isinstance(loose, dict) else None
    if isinstance(kind, str) and kind not in CLIENT_TAGS:
        return ErrorReply(request_id=request_id, code=ErrorCode.UNKNOWN_MESSAGE,
                          message=f"unknown message type {kind[:64]!r}; known: {sorted(CLIENT_TAGS)}")
    return ErrorReply(request_id=request_id, code=ErrorCode.MALFORMED, message=f"invalid message: {error}")
