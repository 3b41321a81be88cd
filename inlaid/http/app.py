"""The OpenAI-compatible ASGI app: a thin layer over one `AsyncClient`.

Every task is a model id; the base model's id is the name the server gives in its hello.
Generation responses run as ASGI callables that also watch the connection: when the
client goes away first, the work is cancelled, which cancels the request on the server
(the SDK sends `Cancel` when the task awaiting it is cancelled or a stream is closed), so
its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from inlaid.client import AsyncClient, GenerateResult, InlaidError, RequestTimeoutError
from inlaid.http.errors import ApiError, bad_request, from_decode_error, from_inlaid
from inlaid.http.front_metrics import CLIENT_CLOSED_STATUS, CONTENT_TYPE, DISCONNECTED_SCOPE_KEY, HttpMetrics
from inlaid.http.schema import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
)
from inlaid.http.settings import HttpConfig
from inlaid.http.translate import (
    GenerationCall,
    chat_call,
    chat_response,
    completion_call,
    completion_response,
    finish_reason,
    usage,
)
from inlaid.protocol import HelloReply, TextChunk

log = logging.getLogger("inlaid.http")

_JSON = "application/json"
_HEALTH_TIMEOUT_S = 2.0
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]  # fmt: skip
_DONE_EVENT = b"data: [DONE]\n\n"


class Front:
    """What the endpoints share: the SDK client and the server's identity."""

    def __init__(self, address: str, config: HttpConfig) -> None:
        self.address = address
        self.config = config
        self.client = AsyncClient(address, timeout_s=config.request_timeout_s, client_name="inlaid-http")
        self.started = int(time.time())
        self._hello_lock = asyncio.Lock()

    async def server(self) -> HelloReply:
        """The server's hello (model name, context length), asked once per connection."""
        async with self._hello_lock:
            if self.client.server is None:
                await self.client.handshake(timeout_s=min(self.config.request_timeout_s, 30.0))
            assert self.client.server is not None
            return self.client.server

    def admin_client(self, request: Request) -> AsyncClient:
        """A client carrying the caller's Bearer token: the server alone decides on it."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return AsyncClient(self.address, timeout_s=self.config.request_timeout_s, client_name="inlaid-http-admin",
                           admin_token=token.strip() if scheme.lower() == "bearer" else "")


def create_app(address: str, config: HttpConfig) -> HttpMetrics:
    """The ASGI application (Starlette inside the front's own metrics middleware)."""
    front = Front(address, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await front.client.close()

    routes = [
        Route("/v1/completions", _endpoint(front, _completions), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(front, _chat_completions), methods=["POST"]),
        Route("/v1/models", _endpoint(front, _models), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(front, _model), methods=["GET"]),
        Route("/v1/load_lora_adapter", _endpoint(front, _load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _endpoint(front, _unload_lora_adapter), methods=["POST"]),
        Route("/health", _endpoint(front, _health), methods=["GET"]),
        Route("/metrics", _endpoint(front, _metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_exception, Exception: _internal_error})
    metrics = HttpMetrics(app)
    app.state.http_metrics = metrics
    return metrics


def _endpoint(front: Front, handler: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(front, request)
        except ApiError as error:
            return _error_response(error)
        except InlaidError as error:
            return _error_response(from_inlaid(error))
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=CLIENT_CLOSED_STATUS)

    return endpoint


def _error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error.body(), status_code=error.status, media_type=_JSON,
                    headers={**error.headers(), **(headers or {})})


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     code="not_found" if exc.status_code == 404 else None)
    return _error_response(error, exc.headers)  # a 405 names the allowed methods


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback after this answer.
    return _error_response(ApiError(500, "internal error in the HTTP front", code="internal"))


async def _read_json(request: Request, kind: type[Any], max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    if not body:
        raise bad_request("the request has no JSON body")
    try:
        return msgspec.json.decode(bytes(body), type=kind)
    except msgspec.MsgspecError as error:
        raise from_decode_error(error) from None


# ---------------------------------------------------------------- generation


async def _completions(front: Front, request: Request) -> Response:
    body = await _read_json(request, CompletionRequest, front.config.max_body_bytes)
    server = await front.server()
    return GenerationResponse(front, completion_call(body, server.model), chat=False)


async def _chat_completions(front: Front, request: Request) -> Response:
    body = await _read_json(request, ChatCompletionRequest, front.config.max_body_bytes)
    server = await front.server()
    return GenerationResponse(front, chat_call(body, server.model, server.max_model_len), chat=True)


class GenerationResponse(Response):
    """Runs the generation while watching the connection; answers JSON or an SSE stream."""

    def __init__(self, front: Front, call: GenerationCall, chat: bool) -> None:
        self.front = front
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

    def _generate_kwargs(self, prompt: dict[str, Any]) -> dict[str, Any]:
        return {**prompt, **self.call.options, "task": self.call.task}

    async def _answer(self, send: Send) -> None:
        client = self.front.client
        jobs = [asyncio.ensure_future(client.generate(**self._generate_kwargs(p))) for p in self.call.prompts]
        try:
            results: list[GenerateResult] = list(await asyncio.gather(*jobs))
        except InlaidError as error:
            for job in jobs:
                job.cancel()  # the other prompts' requests are cancelled on the server
            await _send_error(send, from_inlaid(error, self.call.model))
            return
        finally:
            if any(not job.done() for job in jobs):  # this task was cancelled: the client went away
                for job in jobs:
                    job.cancel()
        answer = chat_response(self.call, results[0]) if self.chat else completion_response(self.call, results)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", _JSON.encode())]})
        await send({"type": "http.response.body", "body": msgspec.json.encode(answer)})

    async def _stream(self, send: Send) -> None:
        client = self.front.client
        streams = []
        try:
            try:
                for prompt in self.call.prompts:
                    streams.append(await client.stream(**self._generate_kwargs(prompt)))
                events = _merged(streams)
                # The first piece decides the status: a refused request gets its HTTP error.
                first: tuple[int, TextChunk | GenerateResult] | None = await anext(events)
            except InlaidError as error:
                await _send_error(send, from_inlaid(error, self.call.model))
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
        except InlaidError as error:  # failed mid-stream: OpenAI's error event ends the stream
            await _send_event(send, msgspec.json.decode(from_inlaid(error, self.call.model).body()))
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


async def _merged(streams: list[Any]) -> AsyncIterator[tuple[int, TextChunk | GenerateResult]]:
    """(prompt index, chunk) as they come from several SDK streams, then each one's result.
    Raises the first error a stream meets. Closing it stops reading; the caller closes the
    streams (which cancels those still running on the server)."""
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
    await send({"type": "http.response.body", "body": b"data: " + msgspec.json.encode(event) + b"\n\n",
                "more_body": True})


async def _send_error(send: Send, error: ApiError) -> None:
    headers = [(b"content-type", _JSON.encode())] + [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error.body()})


# ---------------------------------------------------------------- models, admin, health, metrics


async def _model_cards(front: Front) -> list[ModelCard]:
    server = await front.server()
    tasks = await front.client.list_tasks()
    base = ModelCard(id=server.model, created=front.started, owned_by="inlaid", root=server.model, parent=None,
                     max_model_len=server.max_model_len)
    return [base] + [ModelCard(id=task.name, created=front.started, owned_by="inlaid", root=task.adapter_dir,
                               parent=server.model, max_model_len=server.max_model_len)
                     for task in tasks if task.name != server.model]


async def _models(front: Front, request: Request) -> Response:
    return Response(msgspec.json.encode(ModelList(data=await _model_cards(front))), media_type=_JSON)


async def _model(front: Front, request: Request) -> Response:
    wanted = request.path_params["model"]
    for card in await _model_cards(front):
        if card.id == wanted:
            return Response(msgspec.json.encode(card), media_type=_JSON)
    raise ApiError(404, f"The model `{wanted}` does not exist.", code="model_not_found", param="model")


async def _load_lora_adapter(front: Front, request: Request) -> Response:
    body = await _read_json(request, LoadLoraAdapterRequest, front.config.max_body_bytes)
    if body.lora_name == (await front.server()).model:
        raise bad_request(f"{body.lora_name!r} is the base model's id; choose another name", "lora_name")
    async with front.admin_client(request) as client:
        message = await client.add_task(body.lora_name, body.lora_path)
    log.info("adapter loaded over HTTP", extra={"task": body.lora_name, "result": message})
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def _unload_lora_adapter(front: Front, request: Request) -> Response:
    body = await _read_json(request, UnloadLoraAdapterRequest, front.config.max_body_bytes)
    async with front.admin_client(request) as client:
        message = await client.remove_task(body.lora_name)
    log.info("adapter unloaded over HTTP", extra={"task": body.lora_name, "result": message})
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _health(front: Front, request: Request) -> Response:
    try:
        reply = await front.client.health(timeout_s=_HEALTH_TIMEOUT_S)
    except RequestTimeoutError:
        return Response(b'{"status":"unreachable"}', status_code=503, media_type=_JSON)
    body = msgspec.json.encode({"status": reply.status, "executor_ready": reply.executor_ready,
                                "uptime_seconds": reply.uptime_seconds})
    return Response(body, status_code=200 if reply.status == "ok" else 503, media_type=_JSON)


async def _metrics(front: Front, request: Request) -> Response:
    server_text = await front.client.metrics(timeout_s=_HEALTH_TIMEOUT_S)
    own = request.app.state.http_metrics.exposition()
    return Response(server_text + own, media_type=CONTENT_TYPE)
