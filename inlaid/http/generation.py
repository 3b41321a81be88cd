"""Generation responses: run a completion while watching the connection.

Each response is an ASGI callable. It runs the SDK calls (one per prompt) beside a watch
on the connection: when the client goes away first, the work is cancelled, which cancels
the requests on the server (the SDK sends `Cancel` when the task awaiting a generate is
cancelled or a stream is closed), so their KV blocks are freed at once. Streams are
server-sent events in OpenAI's chunk formats; the HTTP status waits for the server's first
reply, so a refused request gets its error status rather than a 200 stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from inlaid.client import AsyncClient, GenerateResult, InlaidError
from inlaid.http.errors import ApiError, from_inlaid
from inlaid.http.front_metrics import DISCONNECTED_SCOPE_KEY
from inlaid.http.schema import ChatChunkChoice, ChatCompletionChunk, ChatDelta, Completion, CompletionChoice
from inlaid.http.translate import GenerationCall, chat_response, completion_response, finish_reason, usage
from inlaid.protocol import ErrorCode, InFlightCounts, TextChunk

log = logging.getLogger("inlaid.http")

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]  # fmt: skip
_DONE_EVENT = b"data: [DONE]\n\n"


class GenerationResponse(Response):
    """Runs the generation while watching the connection; answers JSON or an SSE stream."""

    def __init__(self, client: AsyncClient, call: GenerationCall, chat: bool) -> None:
        self.client = client
        self.call = call
        self.chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._stream(send) if self.call.stream else self._answer(send))
        gone = asyncio.ensure_future(_client_disconnect(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                scope[DISCONNECTED_SCOPE_KEY] = True
                log.debug("client disconnected; cancelling its request", extra={"id": self.call.request_id})
            work.cancel()
            gone.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    def _api_error(self, error: InlaidError, index: int | None = None) -> ApiError:
        """`index`: the prompt whose request failed; named (`prompt[1]`) when the request
        listed several, so that the client knows which one the server refused."""
        one_of_several = index is not None and len(self.call.prompts) > 1
        prompt_param = "messages" if self.chat else f"prompt[{index}]" if one_of_several else "prompt"
        api_error = from_inlaid(error, self.call.model, prompt_param=prompt_param, base_model=self.call.base_model,
                                max_tokens_param=self.call.max_tokens_param)
        if one_of_several and api_error.param == prompt_param:  # the message says which prompt too
            api_error.message = f"{prompt_param}: {api_error.message}"
        counts = error.reply.in_flight if error.reply is not None else None
        queued = error.reply.queued_messages if error.reply is not None else None
        if error.code == ErrorCode.OVERLOADED and queued is not None:
            # The server's "this connection" and "send fewer at once" are the front's, every HTTP
            # client's: this caller may have sent one request.
            api_error.message = (f"the server's queue of messages from this HTTP front (every client's requests) is "
                                 f"full ({queued} waiting): this request was not taken; retry later")
            if one_of_several:
                api_error.message = f"prompt[{index}]: {api_error.message}"
        elif one_of_several and error.code == ErrorCode.OVERLOADED:
            api_error.message = _own_prompts_apart(api_error.message, counts, index, len(self.call.prompts))
        elif error.code == ErrorCode.OVERLOADED and counts is not None and counts.requests < counts.limit:
            # The server's "this connection" is the front's one connection, every HTTP client's.
            api_error.message = (f"{counts.requests} requests in flight, {counts.this_connection} of them through "
                                 f"this HTTP front; the last tenth of the server's {counts.limit} is kept for "
                                 "other clients; retry later")
        return api_error

    def _generate_kwargs(self, prompt: dict[str, Any]) -> dict[str, Any]:
        return {**prompt, **self.call.options, "task": self.call.task}

    async def _answer(self, send: Send) -> None:
        client = self.client
        jobs = [asyncio.ensure_future(client.generate(**self._generate_kwargs(p))) for p in self.call.prompts]
        try:
            results: list[GenerateResult] = list(await asyncio.gather(*jobs))
        except InlaidError as error:
            for job in jobs:
                job.cancel()  # the other prompts' requests are cancelled on the server
            failed = next((i for i, job in enumerate(jobs) if job.done() and not job.cancelled()
                           and job.exception() is error), None)
            await _send_error(send, self._api_error(error, failed))
            return
        finally:
            if any(not job.done() for job in jobs):  # this task was cancelled: the client went away
                for job in jobs:
                    job.cancel()
        answer = chat_response(self.call, results[0]) if self.chat else completion_response(self.call, results)
        await _send_json(send, 200, [], msgspec.json.encode(answer))

    async def _stream(self, send: Send) -> None:
        client = self.client
        streams = []
        try:
            try:
                for prompt in self.call.prompts:
                    streams.append(await client.stream(**self._generate_kwargs(prompt)))
                events = _merged(streams)
                # The first piece decides the status: a refused request gets its HTTP error.
                first: tuple[int, TextChunk | GenerateResult] | None = await anext(events)
            except InlaidError as error:  # refused as it was sent: the prompt after those sent
                await _send_error(send, self._api_error(error, len(streams)))
                return
            except _PromptFailed as failed:
                await _send_error(send, self._api_error(failed.error, failed.index))
                return
            try:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                await self._send_events(send, first, events)
            finally:
                await events.aclose()
        finally:
            for stream in streams:  # a no-op for finished streams; cancels the others on the server
                await stream.aclose()

    async def _send_events(self, send: Send, first: tuple[int, TextChunk | GenerateResult] | None,
                           events: AsyncIterator[tuple[int, TextChunk | GenerateResult]]) -> None:
        results: list[GenerateResult] = []
        try:
            if self.chat:  # OpenAI's first chat chunk names the role
                await _send_event(send, self._chat_chunk(ChatDelta(role="assistant", content=""), None))
            pending = first
            while pending is not None:
                index, item = pending
                if isinstance(item, TextChunk):
                    if item.text:
                        await _send_event(send, self._text_event(index, item.text, None))
                else:
                    results.append(item)
                    await _send_event(send, self._text_event(index, "", finish_reason(item.finish_reason)))
                pending = await anext(events, None)
        except _PromptFailed as failed:  # failed mid-stream: OpenAI's error event ends the stream
            await _send_event(send, self._api_error(failed.error, failed.index).body())
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if self.call.include_usage:
            await _send_event(send, self._usage_event(results))
        await send({"type": "http.response.body", "body": _DONE_EVENT, "more_body": False})

    def _chat_chunk(self, delta: ChatDelta, reason: str | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=f"chatcmpl-{self.call.request_id}", created=self.call.created,
                                   model=self.call.model,
                                   choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=reason)])

    def _text_event(self, index: int, text: str, reason: str | None) -> Any:
        if self.chat:
            return self._chat_chunk(ChatDelta(content=text) if text else ChatDelta(), reason)
        return Completion(id=f"cmpl-{self.call.request_id}", created=self.call.created, model=self.call.model,
                          choices=[CompletionChoice(index=index, text=text, finish_reason=reason)], usage=None)

    def _usage_event(self, results: list[GenerateResult]) -> Any:
        if self.chat:
            return ChatCompletionChunk(id=f"chatcmpl-{self.call.request_id}", created=self.call.created,
                                       model=self.call.model, choices=[], usage=usage(results))
        return Completion(id=f"cmpl-{self.call.request_id}", created=self.call.created, model=self.call.model,
                          choices=[], usage=usage(results))


def _own_prompts_apart(message: str, counts: InFlightCounts | None, index: int | None, count: int) -> str:
    """The server's 429 counts every request of the front's connection as the connection's
    own: a request listing several prompts was told of its own earlier prompts as if they
    were other traffic. `counts`: the server's, when its refusal gave them (the message is
    then said again from them); `index`: the refused prompt (those before it were sent, and
    held their slots, first)."""
    own = index or 0
    if counts is not None:
        own = min(own, counts.this_connection)
        held = (f"{counts.requests} requests in flight, {own} of them this request's own earlier prompts and "
                f"{counts.this_connection - own} other requests through this front")
        message = (f"{held}: the server's limit; retry later" if counts.requests >= counts.limit else
                   f"{held}; the last tenth of the server's {counts.limit} is kept for other clients; retry later")
    elif own:
        message += f" ({own} of the requests in flight are this request's own earlier prompts)"
    if index is None:
        return message
    advice = (f"; this request's {count} prompts each need an admission slot: send fewer prompts per request"
              if own else "")  # its first prompt refused: other traffic holds the slots
    return f"prompt[{index}]: {message}{advice}"


class _PromptFailed(Exception):
    """The SDK error of one prompt's stream, with the prompt's index."""

    def __init__(self, index: int, error: InlaidError) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


async def _merged(streams: list[Any]) -> AsyncIterator[tuple[int, TextChunk | GenerateResult]]:
    """(prompt index, chunk) as they come from several SDK streams, then each one's result.
    Raises the first error a stream meets (an SDK error as `_PromptFailed`). Closing it stops
    reading; the caller closes the streams (which cancels those still running on the server)."""
    queue: asyncio.Queue[tuple[int, TextChunk | GenerateResult | Exception]] = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            async with stream:
                async for chunk in stream:
                    queue.put_nowait((index, chunk))
            queue.put_nowait((index, stream.result))
        except Exception as error:  # the reader must hear of every end, or it would wait forever
            queue.put_nowait((index, error))

    pumps = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, item = await queue.get()
            if isinstance(item, InlaidError):
                raise _PromptFailed(index, item)
            if isinstance(item, Exception):
                raise item
            if not isinstance(item, TextChunk):
                running -= 1
            yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _client_disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_event(send: Send, event: Any) -> None:
    """One server-sent event: a response object, or JSON already encoded."""
    data = event if isinstance(event, bytes) else msgspec.json.encode(event)
    await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})


async def _send_error(send: Send, error: ApiError) -> None:
    await _send_json(send, error.status, [(k.lower().encode(), v.encode()) for k, v in error.headers().items()],
                     error.body())


async def _send_json(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """A whole JSON response. Its length is known, so it is sent with Content-Length: without
    it the server falls back to chunked encoding, which an HTTP/1.0 client reads as garbage."""
    length = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": length + headers})
    await send({"type": "http.response.body", "body": body})
