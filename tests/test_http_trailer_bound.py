"""A chunked request's trailer fields (after its last chunk) are bounded as its head is: an
outside probe's 64 MB trailer stalled every other client of the front for 7.7 s (httptools
builds a field's value by concatenation, piece by piece) and was answered 200; a 200 MB one
hung the front until its liveness check killed it. Now past 64 KiB the request gets 431 and
its connection closes; bodies sent in many chunks and small trailers are served as before.
On a real uvicorn with a stand-in SDK client (no model)."""

from __future__ import annotations

import json
import socket
import threading
import time

from test_http_probe_fixes import BASE, _exchange, _uvicorn

from inlaid.http.slow_clients import MAX_HEAD_BYTES

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
BODY = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1}).encode()


def _chunked(body: bytes, piece: int) -> bytes:
    chunks = [body[i:i + piece] for i in range(0, len(body), piece)]
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n"


def _send_slowly(port: int, request: bytes, piece: int, replies: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            for start in range(0, len(request), piece):
                connection.sendall(request[start:start + piece])
                time.sleep(0.001)
        except OSError:  # refused and closed while it still sent: the answer came first
            pass
        reply = b""
        try:
            while chunk := connection.recv(65536):
                reply += chunk
        except OSError:
            pass
        replies.append(reply)


def test_a_trailer_over_the_head_limit_gets_431_and_others_are_served() -> None:
    trailer = b"X-Trailer: " + b"t" * (4 * MAX_HEAD_BYTES) + b"\r\n\r\n"
    with _uvicorn(head_timeout_s=30) as port:
        replies: list[bytes] = []
        sender = threading.Thread(target=_send_slowly, args=(port, HEAD + b"Connection: close\r\n\r\n"
                                                             + _chunked(BODY, 16) + trailer, 8192, replies))
        sender.start()
        served = _exchange(port, HEAD + b"Connection: close\r\n\r\n" + _chunked(BODY, 1000) + b"\r\n")
        sender.join(timeout=60)
        assert served.startswith(b"HTTP/1.1 200"), served[:200]
        assert replies and replies[0].startswith(b"HTTP/1.1 431"), replies[:1]
        answer = json.loads(replies[0].partition(b"\r\n\r\n")[2])
        assert answer["error"]["code"] == "request_header_fields_too_large" and "trailer" in answer["error"]["message"]


def test_bodies_in_many_chunks_and_small_trailers_are_served() -> None:
    padded = json.dumps({"model": BASE, "prompt": "hi " * 40_000, "max_tokens": 1}).encode()  # ~120 KB
    with _uvicorn(head_timeout_s=30) as port:
        for body, piece, trailer in ((BODY, 1, b"X-Trailer: ok\r\n\r\n"), (padded, 7, b"\r\n"),
                                     (padded, len(padded), b"X-A: 1\r\nX-B: 2\r\n\r\n")):
            replies: list[bytes] = []
            _send_slowly(port, HEAD + b"Connection: close\r\n\r\n" + _chunked(body, piece) + trailer, 4096, replies)
            assert replies[0].startswith(b"HTTP/1.1 200"), (piece, replies[0][:300])
