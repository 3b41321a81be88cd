"""The asyncio client's token stream: `async for chunk in stream` over one request's replies."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from inlaid.client.errors import ClientClosedError, ConnectionLostError, InlaidError, RequestTimeoutError
from inlaid.client.messages import GenerateResult, second_iterator_error, stream_reply
from inlaid.protocol import TextChunk

if TYPE_CHECKING:
    from inlaid.client.async_client import AsyncClient


class AsyncTokenStream:
    """`async for chunk in stream`; `result` holds the GenerateDone at the end.

    Leaving early cancels the request on the server: at once with `aclose()` or
    `async with stream:`, else when the abandoned iterator is finalized, or the stream
    itself when it is dropped without being iterated."""

    def __init__(self, client: AsyncClient, request_id: str, timeout_s: float) -> None:
        self.client = client
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.result: GenerateResult | None = None
        self._done = False
        self._iterating = False  # an iterator of this stream is open (a stream has one)
        self._left_early = False  # closed before its end: its request was cancelled
        self._error: Exception | None = None  # how it ended, when it ended in an error
        # A dropped stream's finalizer may run on any thread, inside or outside the loop: it
        # only schedules the cancel on the stream's loop (see `_stream_dropped`). Detached by
        # `_finish`; not run at exit, when the loop that could send it is gone.
        self._finalizer = weakref.finalize(self, _stream_dropped, client, request_id, asyncio.get_running_loop())
        self._finalizer.atexit = False

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        if self._iterating or self._left_early:
            raise second_iterator_error(self.request_id, left_early=self._left_early, asynchronous=True)
        if self._error is not None:  # a second loop over a failed stream fails alike, not empty
            raise self._error
        self._iterating = True
        try:
            while not self._done:
                try:
                    reply = await self.client._next(self.request_id, self.timeout_s)
                except RequestTimeoutError as error:
                    self._error = error
                    self._finish()
                    self.client._cancel_nowait(self.request_id)
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
            if not self._done:
                await self.aclose()

    async def cancel(self) -> None:
        """Cancel on the server; keep iterating to see the 'cancelled' end."""
        if not self._done:
            await self.client.cancel(self.request_id)

    async def aclose(self) -> None:
        if not self._done:
            self._left_early = True
            self.client._cancel_nowait(self.request_id)
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._finalizer.detach()
        self.client._queues.pop(self.request_id, None)

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else ""

    async def __aenter__(self) -> "AsyncTokenStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _stream_dropped(client: AsyncClient, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
    """The finalizer of a stream dropped before its end: must not block or raise. The client's
    socket and queues belong to its loop, so the cancel runs there (thread-safely scheduled);
    with the loop closed there is nothing left to cancel with."""
    try:
        if not loop.is_closed():
            loop.call_soon_threadsafe(_forget_stream, client, request_id)
    except Exception:  # noqa: BLE001  (the loop closed meanwhile, or the interpreter is exiting)
        pass


def _forget_stream(client: AsyncClient, request_id: str) -> None:
    # Only a request still queued here runs on the server; a closed client has no socket.
    if client._queues.pop(request_id, None) is not None:
        client._cancel_nowait(request_id)
