"""Bounds on a client's request head (request line and headers): a deadline, and a size.

uvicorn closes idle keep-alive connections, but not one that opened and then sends its head
slowly or never finishes it: each such connection holds a file descriptor for ever, and a
client that opens enough of them (slowloris) leaves the front no descriptor to accept
anyone else with. `HeadDeadlineProtocol` gives every request head `head_timeout_s` from its
first byte (from the connection's opening, for the first request): past it the client gets
408 and the connection closes. The body has its own deadline where it is read
(`bodies.read_json`), where the answer can be an ordinary JSON error.

The head's size is bounded too (`MAX_HEAD_BYTES`): httptools builds a header value by
concatenating each piece the socket delivers to the value so far, so one ~100 MB header
sent in pieces cost quadratic copying on the event loop and stalled every other client for
seconds (and was then accepted). A head that grows past the limit gets 431 and the
connection closes, after at most one socket read beyond it; a head that arrived whole in one
read (parsed before it could be counted: a single 100,000-byte header was accepted) is
measured as parsed, exactly, and refused before its request runs.

A chunked body's trailer fields (headers after its last chunk) are built the same way, after
the head: a 64 MB trailer stalled every other client for 7.7 s, a 200 MB one until the front's
liveness check killed it. Bytes that arrive after a chunk's header without any body following
(only the trailer's) are counted as the head's are, and past `max_head_bytes` the request
gets 431 and the connection closes (its app call sees the client gone).

Both refusals are answered here, before any request reaches the app, so they are counted here
in the front's `inlaid_http_requests_total` (`count_refusal`, wired by `cli.uvicorn_config`), under
route `other`: the URL of a head cut off or refused mid-way is not known to be whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inlaid.http.errors import ApiError

log = logging.getLogger("inlaid.http.slow_clients")  # its refusals rate-limited (cli.uvicorn_config)


# Request line and headers together; browsers and proxies stay far below (nginx's default
# buffers hold 32 KiB), and uvicorn's h11 parser allows 16 KiB.
MAX_HEAD_BYTES = 64 * 1024
_LINGER_S = 1.0
# What a head holds beyond its method, URL and headers: " " and " HTTP/1.1\r\n", the blank line.
_REQUEST_LINE_AND_END_BYTES = len(b" ") + len(b" HTTP/1.1\r\n") + len(b"\r\n")


def head_deadline_protocol(head_timeout_s: float, max_head_bytes: int = MAX_HEAD_BYTES,
                           count_refusal: Callable[[int], None] | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline of `head_timeout_s` and a size limit of
    `max_head_bytes` on each request head (passed to `uvicorn.Config(http=...)`, which
    instantiates it per connection); `count_refusal(status)` counts each head it
    refuses (`HttpMetrics.count_unserved`: no app sees those answers)."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,),
                {"head_timeout_s": head_timeout_s, "max_head_bytes": max_head_bytes,
                 "count_refusal": staticmethod(count_refusal) if count_refusal is not None else None})


class HeadDeadlineProtocol(HttpToolsProtocol):
    head_timeout_s: float = 30.0
    max_head_bytes: int = MAX_HEAD_BYTES
    count_refusal: Callable[[int], None] | None = None
    _head_deadline: asyncio.TimerHandle | None = None
    _linger: asyncio.TimerHandle | None = None  # the close after a refusal (`_write_and_close`)
    # Bytes received since the current head began; the parser tells where a head ends
    # (on_headers_complete), not where one begins inside a read, so a read carrying the end
    # of one request and the start of the next is not counted: the bound is the limit plus
    # at most one read (256 KiB).
    _reading_head: bool = True
    _head_bytes: int = 0
    _head_refused: bool = False
    # The current head's bytes as the parser delivered them (URL, header names and values).
    _parsed_head_bytes: int = 0
    # A chunk header was parsed and no body byte has followed it yet: past the last chunk (size
    # 0) that is the trailer. Bytes of whole reads in that state are counted: the read holding
    # the chunk header is not (at most one read of slack, as for the head).
    _after_chunk_header: bool = False
    _trailer_bytes: int = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._head_refused:  # the connection is closing: the parser must not grow further
            return
        if self._reading_head:
            self._head_bytes += len(data)
        in_trailer = self._after_chunk_header
        super().data_received(data)
        if self._reading_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse_large_head()
        elif in_trailer and self._after_chunk_header and not self._head_refused:
            self._trailer_bytes += len(data)
            if self._trailer_bytes > self.max_head_bytes and not self.transport.is_closing():
                self._refuse_large_trailer()

    def on_chunk_header(self) -> None:
        self._after_chunk_header, self._trailer_bytes = True, 0

    def on_message_begin(self) -> None:
        if self._head_refused:
            return
        super().on_message_begin()
        self._parsed_head_bytes = 0
        self._arm_head_deadline()  # the next request on a kept-alive connection

    def on_url(self, url: bytes) -> None:
        if self._head_refused:
            return
        self._parsed_head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_refused:
            return
        self._parsed_head_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_refused:
            return
        self._cancel_head_deadline()
        self._reading_head = False
        self._head_bytes = 0
        # A head that arrived whole within one read was parsed before data_received could
        # count it: its size as parsed (with the request line's method and version and the
        # blank line) decides here, before the request runs.
        size = self._parsed_head_bytes + len(self.parser.get_method()) + _REQUEST_LINE_AND_END_BYTES
        if size > self.max_head_bytes:
            self._refuse_large_head()
            return
        super().on_headers_complete()

    def _should_upgrade(self) -> bool:
        # A refused head skipped uvicorn's on_headers_complete (no scope): an Upgrade header
        # in it must not start a websocket handshake on that missing scope.
        return not self._head_refused and super()._should_upgrade()

    def on_body(self, body: bytes) -> None:
        self._after_chunk_header = False
        if not self._head_refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._after_chunk_header = False
        if self._head_refused:
            return
        super().on_message_complete()
        self._reading_head = True  # what follows on this connection is the next request's head
        self._head_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _refuse_large_head(self) -> None:
        self._head_refused = True
        self._cancel_head_deadline()
        log.info("refusing a request head over the size limit", extra={"client": self.client,
                                                                     "limit_bytes": self.max_head_bytes})
        if self.cycle is not None and not self.cycle.response_complete:
            # An answer is still being written on this connection: no 431 inside it; the
            # connection closes once that answer is complete.
            self.cycle.keep_alive = False
            return
        body = ApiError(431, f"the request's head (request line and headers) is larger than {self.max_head_bytes} "
                             "bytes", code="request_header_fields_too_large").body()
        self._write_and_close(431, b"Request Header Fields Too Large", body)

    def _refuse_large_trailer(self) -> None:
        """The app is waiting for the body's end: it is told the client left (its answer, if
        it writes one, goes nowhere) and the client gets 431, unless an answer is already
        being written (the connection then closes after it) or was (it closes now)."""
        self._head_refused = True
        log.info("refusing a request whose trailer is over the size limit", extra={
            "client": self.client, "limit_bytes": self.max_head_bytes})
        if self.cycle is not None:
            if self.cycle.response_complete:  # answered already: a 431 would read as the next answer
                self.transport.close()
                return
            if self.cycle.response_started:
                self.cycle.keep_alive = False
                return
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        body = ApiError(431, f"the request's trailer fields (after its last chunk) are larger than "
                             f"{self.max_head_bytes} bytes", code="request_header_fields_too_large").body()
        self._write_and_close(431, b"Request Header Fields Too Large", body)

    def _write_and_close(self, status: int, reason: bytes, body: bytes) -> None:
        """Answer, then close without losing the answer: closing a socket whose received
        data is unread resets the connection, and a client that sent its whole request
        (a head over the limit with its body) could see the reset before the answer. So the
        answer goes out with a FIN (the client reads it, then end of stream), reading stops,
        and the socket closes `_LINGER_S` later (a client still sending is then reset)."""
        if self.count_refusal is not None:  # the app's middleware never sees this answer: counted here
            self.count_refusal(status)
        self.transport.write(b"HTTP/1.1 %d %s\r\n" % (status, reason)
                             + b"content-type: application/json\r\nconnection: close\r\n"
                             + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.transport.pause_reading()
        self._linger = self.loop.call_later(_LINGER_S, self.transport.close)

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_deadline()  # a request is being answered: the next head is judged after it
            return
        body = ApiError(408, f"the request's head (request line and headers) did not arrive within "
                             f"{self.head_timeout_s:g} s", code="request_timeout").body()
        log.debug("closing a connection whose request head did not arrive in time", extra={"client": self.client})
        self._write_and_close(408, b"Request Timeout", body)
