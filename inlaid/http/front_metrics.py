"""The front's own metrics (HTTP requests by route and status), as ASGI middleware.

They are served by the front's /metrics after the coordinator's. A request whose client
went away before its answer was complete counts with status 499 (nginx's "client closed
request"); the generation endpoints mark that in the ASGI scope. A request head refused before
it became a request (408 too slow, 431 too large: `slow_clients.py`) never reaches this
middleware; the protocol that refused it counts it here (`count_unserved`), in the counter
only (no duration: nothing was received to time).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Text exposition format 0.0.4: what every Prometheus version scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
DISCONNECTED_SCOPE_KEY = "inlaid.client_disconnected"
CLIENT_CLOSED_STATUS = 499
ROUTES = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/health", "/livez", "/metrics",
})  # fmt: skip
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


def route_label(path: str, root_path: str = "") -> str:
    """A bounded label for a request path (client-chosen paths must not create series).
    `root_path`: the prefix the app is mounted under (ASGI's `path` includes it: behind Ray
    Serve's `route_prefix` every request was counted `other`)."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):] or "/"
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class HttpMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = Counter("inlaid_http_requests", "HTTP requests by route and response status "
                                "(499: the client went away first)", ["route", "status"], registry=self.registry)
        self.duration = Histogram("inlaid_http_request_duration_seconds", "Request received to response complete",
                                  ["route"], buckets=_DURATION_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("inlaid_http_requests_in_flight", "HTTP requests being answered",
                               registry=self.registry)

    def count_unserved(self, status: int) -> None:
        """A request the server answered before any app saw it (a request head too slow or too
        large): under route `other`, its URL not known to be whole."""
        self.requests.labels("other", str(status)).inc()

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server sends when the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.in_flight.dec()
            route = route_label(scope["path"], scope.get("root_path", ""))
            if scope.get(DISCONNECTED_SCOPE_KEY):
                status = CLIENT_CLOSED_STATUS
            self.requests.labels(route, str(status)).inc()
            self.duration.labels(route).observe(time.perf_counter() - started)
