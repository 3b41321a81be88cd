"""The blocking client's stream of one generate (`Client.stream`)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from inlaid.client.errors import (ClientClosedError, ClientInUseError, ConnectionLostError, InlaidError,
                                  RequestTimeoutError)
from inlaid.client.messages import GenerateResult, second_iterator_error, stream_reply
from inlaid.protocol import TextChunk

if TYPE_CHECKING:
    from inlaid.client.sync_client import Client


class TokenStream:
    """Iterates TextChunks of one generate; `result` holds the GenerateDone at the end.

    Leaving the iteration early (break, exception, close()) cancels the request, and so does
    dropping the stream unread (when it is garbage-collected): the server stops computing
    for nobody and the client stops keeping its replies.
    `timeout_s` bounds the wait for each next message, not the whole stream.
    """

    def __init__(self, client: "Client", request_id: str, timeout_s: float) -> None:
        self.client = client
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.result: GenerateResult | None = None
        self._done = False
        self._iterating = False  # an iterator of this stream is open (a stream has one)
        self._left_early = False  # closed before its end: its request was cancelled
        self._error: Exception | None = None  # how it ended, when it ended in an error
        # A weakref.finalize, not __del__: it holds no reference to the stream, and `_finish`
        # detaches it, so a stream read to its end costs nothing when collected. Not at exit:
        # the sockets are closed with no linger then, and a cancel would be lost anyway.
        self._finalizer = weakref.finalize(self, client._stream_dropped, request_id, threading.get_ident())
        self._finalizer.atexit = False

    def __iter__(self) -> Iterator[TextChunk]:
        if self._iterating or self._left_early:
            raise second_iterator_error(self.request_id, left_early=self._left_early, asynchronous=False)
        if self._error is not None:  # a second loop over a failed stream fails alike, not empty
            raise self._error
        self._iterating = True
        refused = False  # another thread's call runs on the client: a moment's refusal, not an end
        try:
            while not self._done:
                try:
                    reply = self.client._next_reply(self.request_id, time.monotonic() + self.timeout_s)
                except ClientInUseError:
                    refused = True
                    raise
                except RequestTimeoutError as error:
                    self._error = error
                    self._finish()
                    self.client._cancel_quietly(self.request_id)
                    self.client._after_timeout(self.request_id)
                    raise
                except (ConnectionLostError, ClientClosedError) as error:
                    self._error = error
                    self._finish()  # nothing to cancel: the server that had it, or our socket, is gone
                    raise
                try:
                    reply = stream_reply(reply, self.request_id)
                except InlaidError as error:
                    self._error = error
                    self._finish()
                    raise
                if isinstance(reply, TextChunk):
                    yield reply
                else:
                    self.result = reply
                    self._finish()
        finally:
            self._iterating = False
            if not self._done and not refused:  # left early: nobody will read the rest
                self.close()

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else ""

    def cancel(self) -> None:
        """Cancel on the server; the stream stays readable up to its 'cancelled' end."""
        if not self._done:
            self.client.cancel(self.request_id)

    def close(self) -> None:
        if not self._done:
            self._left_early = True
            self.client._cancel_quietly(self.request_id)
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._finalizer.detach()
        self.client._inbox.pop(self.request_id, None)

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
