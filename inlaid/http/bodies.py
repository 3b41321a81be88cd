"""A request's JSON body as the HTTP front reads it: within the size and time limits of
`[http]`, uncompressed, UTF-8 (a byte-order mark allowed), and answered 503 when the front
stops while it still arrives (`Front.body_read`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request

from inlaid.http.errors import ApiError, bad_request, from_decode_error

if TYPE_CHECKING:
    from inlaid.http.app import Front

_UTF8_BOM = b"\xef\xbb\xbf"


async def read_json(request: Request, kind: type[Any], front: Front) -> Any:
    """The request's body decoded as `kind`; ApiError (413, 408, 415, 400, 503 while the front
    stops) naming what is wrong."""
    max_bytes, send_timeout_s = front.config.body_bytes_limit, front.config.client_send_timeout_s
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":  # a compressed body would be read as (invalid) JSON
        raise ApiError(415, f"request bodies with Content-Encoding {encoding!r} are not accepted; send it uncompressed",
                       code="unsupported_content_encoding")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    try:
        with front.body_read():  # 503 when the front stops meanwhile
            async with asyncio.timeout(send_timeout_s):
                async for piece in request.stream():
                    body += piece
                    if len(body) > max_bytes:
                        raise ApiError(413, f"the request body is larger than {max_bytes} bytes",
                                       code="request_too_large")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {send_timeout_s:g} s",
                       code="request_timeout") from None
    if body.startswith(_UTF8_BOM):  # RFC 8259 lets a parser ignore it; some clients (.NET, PowerShell) send it
        del body[:len(_UTF8_BOM)]
    if not body:
        raise bad_request("the request has no JSON body")
    try:
        return msgspec.json.decode(bytes(body), type=kind)
    except msgspec.MsgspecError as error:
        raise from_decode_error(error, bytes(body)) from None
    except UnicodeDecodeError:  # msgspec raises it for bytes that are not UTF-8, with a position in a part of them
        raise bad_request(f"the request body is not UTF-8 JSON: {_utf8_problem(bytes(body))}") from None
    except RecursionError:  # msgspec's decoder recurses on the fields typed Any
        raise bad_request("the request body's JSON is nested too deeply") from None


def _utf8_problem(body: bytes) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"{error.reason} at byte {error.start}"
    return "invalid UTF-8"
