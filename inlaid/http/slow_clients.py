"""A deadline for a client to send a request's head (request line and headers).

uvicorn closes idle keep-alive connections, but not one that opened and then sends its head
slowly or never finishes it: each such connection holds a file descriptor for ever, and a
client that opens enough of them (slowloris) leaves the front no descriptor to accept
anyone else with. `HeadDeadlineProtocol` gives every request head `head_timeout_s` from its
first byte (from the connection's opening, for the first request): past it the client gets
408 and the connection closes. The body has its own deadline where it is read
(`app._read_json`), where the answer can be an ordinary JSON error.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inlaid.http.errors import ApiError

log = logging.getLogger("inlaid.http")


def head_deadline_protocol(head_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline of `head_timeout_s` on each request head
    (passed to `uvicorn.Config(http=...)`, which instantiates it per connection)."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": head_timeout_s})


class HeadDeadlineProtocol(HttpToolsProtocol):
    head_timeout_s: float = 30.0
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

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
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()
