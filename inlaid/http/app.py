"""The OpenAI-compatible ASGI app: routes over one `AsyncClient` shared by every request.

Every task is a model id; the base model's id is the name the server gives in its hello.
Generation endpoints decode and check the body, then hand over to `generation.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from inlaid.client import AsyncClient, ConnectionLostError, InlaidError, RequestTimeoutError
from inlaid.http.bodies import read_json
from inlaid.http.errors import ApiError, bad_request, from_inlaid, model_not_found
from inlaid.http.front_metrics import CLIENT_CLOSED_STATUS, CONTENT_TYPE, HttpMetrics
from inlaid.http.generation import GenerationResponse
from inlaid.http.reachability import refuses_connections
from inlaid.http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
)
from inlaid.http.settings import HttpConfig
from inlaid.http.translate import chat_call, completion_call
from inlaid.protocol import MAX_ADMIN_TOKEN_CHARS, HelloReply, ReplacedConfigEntry

log = logging.getLogger("inlaid.http")

_JSON = "application/json"
_HEALTH_TIMEOUT_S = 2.0


class Front:
    """What the endpoints share: the SDK client and the server's identity.

    `client` replaces the SDK client with another of the same methods (the Ray ingress
    routes each call to a replica); `admin_client(token)` then gives the admin calls' client."""

    def __init__(self, address: str, config: HttpConfig, client: Any = None,
                 admin_client: Callable[[str], Any] | None = None) -> None:
        self.address = address
        self.config = config
        self.client = client or AsyncClient(address, timeout_s=config.request_timeout_s, client_name="inlaid-http",
                                            reachability_check=self.refuse_when_unreachable)
        # /health and /metrics ask on a connection of their own: on the generations' one they
        # waited behind up to a thousand queued frames (the coordinator handles each
        # connection's frames in order, connections in turn), and a busy server read
        # "unreachable" to a readiness probe (an outside probe: 503 after 3.5 s).
        self.info_client = AsyncClient(address, timeout_s=config.request_timeout_s, client_name="inlaid-http-info",
                                       reachability_check=self.refuse_when_unreachable) if client is None else client
        self._admin_client = admin_client or self._sdk_admin_client
        self.started = int(time.time())
        self._hello_lock = asyncio.Lock()
        self._unreachable_logged = False
        self.stopping = False  # the front closes: requests still reading their body get 503
        self._body_reads: set[asyncio.Task[Any]] = set()
        self._stopped_reads: set[asyncio.Task[Any]] = set()  # cancelled by stop_body_reads, not by others

    def stop_body_reads(self) -> None:
        """Answer every request still receiving its body with 503 `unavailable`, before
        uvicorn's graceful shutdown cancels it into a bare plain-text 500 (with an ERROR
        traceback): such a request waits on its client, not on the SDK client that
        `cli._answer_before_the_grace_ends` closes."""
        self.stopping = True
        for task in list(self._body_reads):
            self._stopped_reads.add(task)
            task.cancel()

    @contextlib.contextmanager
    def body_read(self) -> Iterator[None]:
        """Around the wait for a request's body: 503 `unavailable` when the front is stopping, at
        once or when `stop_body_reads` cancels the wait. Only its own cancel is answered: one of
        uvicorn's or an outer timeout's, before or after it, goes on (uncancel() counts them)."""
        if self.stopping:
            raise _front_stopping()
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._body_reads.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._stopped_reads or task.uncancel() > 0:
                raise
            raise _front_stopping() from None
        finally:
            self._body_reads.discard(task)
            self._stopped_reads.discard(task)

    async def refuse_when_unreachable(self) -> None:
        """The `reachability_check` of the front's SDK clients: 503 `unavailable` at once
        when nothing accepts connections at the server's address, where a request sent with
        no hello held (the hello, a health ask) would wait its whole bound for no server
        (`reachability.py`). In the SDK, right where a call finds the connection lost: a
        request sent a moment after the coordinator was killed found the hello still held,
        then its call found the connection lost and greeted the dead server (under `inlaid
        serve`, until its front's shutdown cut it off: a plain-text 500; `/health`: its 2-s
        bound). While a hello is held, the SDK's socket monitor reports a lost connection at
        once, so nothing is asked."""
        if not await refuses_connections(self.address):
            self._unreachable_logged = False
            return
        if not self._unreachable_logged:  # once per outage, not per request
            self._unreachable_logged = True
            log.warning("the inference server refuses connections; answering 503", extra={"server": self.address})
        # An SDK error, as the SDK's own calls raise it: every caller maps it to 503 `unavailable`.
        raise ConnectionLostError("the inference server is unreachable: nothing accepts connections at its address "
                                  "(it was stopped, killed or is restarting); retry later")

    async def hello(self) -> HelloReply:
        """The server's hello (model name, context length), asked once per connection. A
        request waits for it (another request's hello included) at most the hello's bound,
        not that bound once per request queued ahead of it."""
        loop = asyncio.get_running_loop()
        bound = min(self.config.request_timeout_s, 30.0)
        deadline = loop.time() + bound
        # The 504 names this bound: the one for generations (http.request_timeout_s) is not it.
        late = ApiError(504, f"the server did not answer the front's hello within {bound:g} s (http.request_timeout_s, "
                             "at most 30 s); retry later", code="timeout")
        try:
            await asyncio.wait_for(self._hello_lock.acquire(), deadline - loop.time())
        except asyncio.TimeoutError:
            raise late from None
        try:
            if self.client.server is None:
                left = deadline - loop.time()
                if left <= 0:
                    raise late
                try:
                    await self.client.handshake(timeout_s=left)
                except RequestTimeoutError:
                    raise late from None
            assert self.client.server is not None
            return self.client.server
        finally:
            self._hello_lock.release()

    async def close_clients(self) -> None:
        await self.client.close()
        if self.info_client is not self.client:
            await self.info_client.close()

    def admin_client(self, request: Request) -> Any:
        """A client carrying the caller's Bearer token: the server alone decides on it."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if len(token) > MAX_ADMIN_TOKEN_CHARS:  # sent, it made the call's frame too large: a 413 about prompts
            raise ApiError(401, f"the Bearer token has {len(token)} characters; an admin token has at most "
                                f"{MAX_ADMIN_TOKEN_CHARS}", code="unauthorized")
        return self._admin_client(token)

    def _sdk_admin_client(self, token: str) -> AsyncClient:
        return AsyncClient(self.address, timeout_s=self.config.request_timeout_s, client_name="inlaid-http-admin",
                           admin_token=token, reachability_check=self.refuse_when_unreachable)


def create_app(address: str, config: HttpConfig, client: Any = None,
               admin_client: Callable[[str], Any] | None = None) -> HttpMetrics:
    """The ASGI application (Starlette inside the front's own metrics middleware); `client`
    and `admin_client` as in `Front`."""
    front = Front(address, config, client, admin_client)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await front.close_clients()

    routes = [
        Route("/v1/completions", _endpoint(front, _completions), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(front, _chat_completions), methods=["POST"]),
        Route("/v1/models", _endpoint(front, _models), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(front, _model), methods=["GET"]),
        Route("/v1/load_lora_adapter", _endpoint(front, _load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _endpoint(front, _unload_lora_adapter), methods=["POST"]),
        Route("/health", _endpoint(front, _health), methods=["GET"]),
        Route("/livez", _livez, methods=["GET"]),
        Route("/metrics", _endpoint(front, _metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_exception, Exception: _internal_error})
    # `/v1/completions/` is an unknown path (a JSON 404), not a 307 to the path without the
    # slash: a redirected POST is a second request the official clients do not make.
    app.router.redirect_slashes = False
    metrics = HttpMetrics(app)
    app.state.http_metrics = metrics
    app.state.front = front  # its SDK client: `cli.serve` closes it before uvicorn's grace ends
    return metrics


def _front_stopping() -> ApiError:
    return ApiError(503, "the HTTP front is stopping and the request body had not arrived; retry",
                    code="unavailable")


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


# ---------------------------------------------------------------- endpoints


async def _completions(front: Front, request: Request) -> Response:
    body = await read_json(request, CompletionRequest, front)
    server = await front.hello()
    call = completion_call(body, server.model, front.config.prompts_per_request_limit)
    return GenerationResponse(front.client, call, chat=False)


async def _chat_completions(front: Front, request: Request) -> Response:
    body = await read_json(request, ChatCompletionRequest, front)
    server = await front.hello()
    return GenerationResponse(front.client, chat_call(body, server.model), chat=True)


async def _model_cards(front: Front) -> list[ModelCard]:
    server = await front.hello()
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
    if not wanted:  # `/v1/models/`: an unknown path, as `/v1/completions/` is (no model is named "")
        raise HTTPException(404, "Not Found")
    cards = await _model_cards(front)
    for card in cards:
        if card.id == wanted:
            return Response(msgspec.json.encode(card), media_type=_JSON)
    raise model_not_found(wanted, cards[0].id, [card.id for card in cards[1:]])


async def _load_lora_adapter(front: Front, request: Request) -> Response:
    body = await read_json(request, LoadLoraAdapterRequest, front)
    if not body.lora_path:
        raise bad_request("lora_path must not be empty", "lora_path")
    if not body.lora_path.startswith("/"):  # the server refuses it too, naming its own field
        raise bad_request("lora_path must be an absolute path on the server's machine (a relative one would depend "
                          "on the server's working directory)", "lora_path")
    if body.lora_name == (await front.hello()).model:
        raise bad_request(f"{body.lora_name!r} is the base model's id; choose another name", "lora_name")
    async with front.admin_client(request) as client:
        try:
            reply = await client.add_task_reply(body.lora_name, body.lora_path)
        except InlaidError as error:
            api_error = from_inlaid(error)
            if api_error.status == 400 and api_error.param is None:  # not the name: the adapter at lora_path
                api_error.param = "lora_path"
            raise api_error from None
    log.info("adapter loaded over HTTP", extra={"task": body.lora_name, "result": reply.message})
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully."
                             + _replacement_notice(reply.replaces_config_entry, reply.hessians_dropped,
                                                   reply.already_served))


def _replacement_notice(replaced: ReplacedConfigEntry | None, hessians_dropped: bool, already_served: bool) -> str:
    """What the server's add_task answer says beyond "added" that the caller must not miss (the
    SDK and the CLI print the whole answer): a configured task replaced, and for how long; the
    stored Hessians of the adapter it replaced leaving the re-quantization's aggregate; files
    it served already, unchanged (changed ones are loaded again, `load_inplace` or not)."""
    notice = ""
    if already_served:
        notice += " Note: it already served these files; nothing was loaded again."
    if replaced is not None:
        until = ("until it is removed, restarts included (the state directory keeps it)"
                 if replaced.kept_across_restarts else "until the server restarts (no server.state_dir)")
        notice += f" Note: it replaces the config's [tasks] entry ({replaced.adapter_dir}) {until}."
    if hessians_dropped:
        notice += (" Note: the Hessians stored for this name were computed with the adapter it replaces and leave "
                   "the base's re-quantization (load it through the SDK or CLI with its calibration file to "
                   "re-quantize for it).")
    return notice


async def _unload_lora_adapter(front: Front, request: Request) -> Response:
    body = await read_json(request, UnloadLoraAdapterRequest, front)
    async with front.admin_client(request) as client:
        try:
            reply = await client.remove_task_reply(body.lora_name)
        except InlaidError as error:  # an unknown adapter: the 404 names the field that named it
            raise from_inlaid(error, not_found_param="lora_name") from None
    log.info("adapter unloaded over HTTP", extra={"task": body.lora_name, "result": reply.message})
    # Said as the SDK and the CLI say it (they print the server's whole message): a bare
    # "removed" hid that the server's config serves the name again at its next start.
    notice = (f" Note: it is in the server config's [tasks]: the next restart serves it again "
              f"({reply.returns_at_restart}).") if reply.returns_at_restart else ""
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.{notice}")


async def _livez(request: Request) -> Response:
    """The front itself answers: asks nothing of the server (its supervisor's liveness check,
    or a container's, must not fail because the server is busy or restarting)."""
    return Response(b'{"status":"ok"}', media_type=_JSON)


async def _health(front: Front, request: Request) -> Response:
    try:
        reply = await front.info_client.health(timeout_s=_HEALTH_TIMEOUT_S)
    except (RequestTimeoutError, ConnectionLostError):  # nothing listens: at once (`refuse_when_unreachable`)
        return _unhealthy(b'{"status":"unreachable"}')
    body = msgspec.json.encode({"status": reply.status, "executor_ready": reply.executor_ready,
                                "uptime_seconds": reply.uptime_seconds,
                                **({"requantizer": reply.requantizer} if reply.requantizer else {})})
    return Response(body, media_type=_JSON) if reply.status == "ok" else _unhealthy(body)


def _unhealthy(body: bytes) -> Response:
    """A 503 health answer (starting, shutting down, unreachable): as every 503, with the
    Retry-After the error answers carry (load balancers and clients poll again after it)."""
    return Response(body, status_code=503, media_type=_JSON, headers=ApiError(503, "").headers())


_SERVER_PART = ("# HELP inlaid_http_server_metrics_missing 1 when the server's series are left out of this scrape "
                "(it did not answer within {bound:g} s, or the front has none: a Ray ingress, whose replicas keep "
                "theirs); the front's own follow either way\n"
                "# TYPE inlaid_http_server_metrics_missing gauge\ninlaid_http_server_metrics_missing {missing}\n")


async def _metrics(front: Front, request: Request) -> Response:
    """The server's series and the front's own. A server that does not answer in time (hung,
    busy) costs only its part: a 504 lost the front's series, its 503 and 504 counts, just
    when they tell most (an outside probe: a SIGSTOPped coordinator). One that nothing serves
    (stopped, killed) is a 503 at once, as on every route."""
    try:
        server_text = await front.info_client.metrics(timeout_s=_HEALTH_TIMEOUT_S)
        missing = 0 if server_text else 1  # none at all (a Ray ingress's) read 0, "all there" (a probe)
    except RequestTimeoutError:
        server_text, missing = "", 1
    own = request.app.state.http_metrics.exposition()
    return Response(server_text + _SERVER_PART.format(bound=_HEALTH_TIMEOUT_S, missing=missing) + own,
                    media_type=CONTENT_TYPE)
