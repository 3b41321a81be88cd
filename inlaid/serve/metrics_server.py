"""The `[metrics]` port: the coordinator's registry at `/metrics`, in a thread of its own.

prometheus_client's `start_http_server` answers the exposition for any path (`/foo` too)
and refuses HEAD with 405. This port answers as the HTTP front's `/metrics` does, so that a
check written against one holds for the other: GET and HEAD `/metrics` (200; HEAD without
the body), another method there 405 naming GET and HEAD, any other path 404, both errors in
the front's JSON error form. The exposition itself is prometheus_client's (it honours
`Accept` for OpenMetrics, `Accept-Encoding: gzip` and `name[]` filters).

The port serves in the coordinator's process, a thread per connection: at most
`MAX_CONNECTIONS` at once (one more is closed at once: a scraper retries at its next
interval), each cut off after `CLIENT_TIMEOUT_S` without a byte. Unbounded, an outside probe's
11,000 connections that each sent half a request line left the coordinator with 11,000
threads, deaf to its clients and to SIGTERM, until it was killed.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH = "/metrics"
MAX_CONNECTIONS = 32  # a few scrapers and people: far below what costs the coordinator
CLIENT_TIMEOUT_S = 10.0  # a request's bytes must keep coming (Prometheus' scrape timeout is 10 s)
_ALLOWED = "GET, HEAD"  # as Starlette's Allow for a GET route

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def metrics_app(registry: CollectorRegistry) -> WsgiApp:
    """The WSGI app of the metrics port."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path != METRICS_PATH:
            return _error(start_response, "404 Not Found", f"{method} {path}: Not Found; this port serves "
                          f"{METRICS_PATH} only", "not_found")
        if method not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", f"{method} {path}: Method Not Allowed", None,
                          [("Allow", _ALLOWED)])
        if method == "GET":
            return exposition(environ, start_response)
        # HEAD: GET's status and headers (its length included), no body.
        answer: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer.update(status=status, headers=headers)

        body = b"".join(exposition({**environ, "REQUEST_METHOD": "GET"}, keep))
        start_response(answer["status"], [*answer["headers"], ("Content-Length", str(len(body)))])
        return [b""]

    return app


def _error(start_response: StartResponse, status: str, message: str, code: str | None,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    # The HTTP front's error JSON (inlaid/http/errors.py), without importing the front.
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            *(headers or [])])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # a scrape every few seconds would flood stderr, outside the server's JSON log


def start_metrics_server(port: int, host: str, registry: CollectorRegistry, max_connections: int = MAX_CONNECTIONS,
                         client_timeout_s: float = CLIENT_TIMEOUT_S) -> WSGIServer:
    """Bind `host:port` (OSError when impossible) and serve the registry in a daemon thread;
    stop it with `shutdown()` then `server_close()`."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    slots = threading.BoundedSemaphore(max_connections)

    class Handler(_QuietHandler):
        timeout = client_timeout_s  # the socket's: a stalled read ends the request (quietly: handle_error)

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family  # a class attribute: IPv6 hosts need AF_INET6 before binding
        daemon_threads = True  # a scrape's thread must not hold the process at exit

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started: its slot is free again
                slots.release()
                raise

        def handle_error(self, request: Any, client_address: Any) -> None:
            """A client cut off or gone (timeout, reset) is no error: socketserver printed a
            traceback to stderr for each, beside the server's JSON log. Others keep it."""
            if not isinstance(sys.exc_info()[1], OSError):  # TimeoutError and ConnectionError are
                super().handle_error(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    server = make_server(address[0], port, metrics_app(registry), Server, handler_class=Handler)
    threading.Thread(target=server.serve_forever, name="inlaid-metrics-port", daemon=True).start()
    return server
