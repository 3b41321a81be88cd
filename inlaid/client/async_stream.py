"""The asyncio client's token stream: `async for chunk in stream` over one request's replies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from inlaid.client.errors import ConnectionLostError, InlaidError, RequestTimeoutError
from inlaid.client.messages import GenerateResult, stream_reply
from inlaid.protocol import TextChunk

if TYPE_CHECKING:
    from inlaid.client.async_client import AsyncClient


class AsyncTokenStream:
    """`async for chunk in stream`; `result` holds the GenerateDone at the end.

    Leaving early cancels the request on the server: at once with `aclose()` or
    `async with stream:`, else when the abandoned iterator is finalized."""

    def __init__(self, client: AsyncClient, request_id: str, timeout_s: float) -> None:
        self.client = client
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.result: GenerateResult | None = None
        self._done = False

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        try:
            while not self._done:
                try:
                    reply = await self.client._next(self.request_id, self.timeout_s)
                except RequestTimeoutError:
                    self._finish()
                    self.client._cancel_nowait(self.request_id)
                    self.client._after_timeout(self.request_id)
                    raise
                except ConnectionLostError:
                    self._finish()  # nothing to cancel: the server that had it is gone
                    raise
                try:
                    reply = stream_reply(reply, self.request_id)
                except InlaidError:
                    self._finish()
                    raise
                if isinstance(reply, TextChunk):
                    yield reply
                else:
                    self.result = reply
                    self._finish()
        finally:
            if not self._done:
                await self.aclose()

    async def cancel(self) -> None:
        """Cancel on the server; keep iterating to see the 'cancelled' end."""
        if not self._done:
            await self.client.cancel(self.request_id)

    async def aclose(self) -> None:
        if not self._done:
            self.client._cancel_nowait(self.request_id)
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.client._queues.pop(self.request_id, None)

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else ""

    async def __aenter__(self) -> "AsyncTokenStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
