"""The `[metrics]` port serves inside the coordinator, a thread per connection: an outside
probe's ~11,000 connections that each sent half a request line and waited left the coordinator
with ~11,000 threads, answering neither its clients nor SIGTERM until it was killed. Now at
most `max_connections` are served at once (one more is closed at once) and a connection that
stops sending is cut off after `client_timeout_s`; scrapes are answered as before."""

from __future__ import annotations

import http.client
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter

from inlaid.serve.metrics_server import start_metrics_server


def _scrape(port: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _closed_by_the_server(holder: socket.socket, wait_s: float) -> bool:
    holder.settimeout(wait_s)
    try:
        return holder.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _handler_threads() -> int:
    """Threads serving a connection of a metrics port (socketserver names their target)."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def test_stalled_connections_hold_a_bounded_number_of_threads_and_are_cut_off(capfd) -> None:
    registry = CollectorRegistry()
    Counter("probe", "a counter", registry=registry).inc()
    server = start_metrics_server(0, "127.0.0.1", registry, max_connections=4, client_timeout_s=3.0)
    holders: list[socket.socket] = []
    try:
        for _ in range(12):  # one at a time: past the listen backlog (5) the kernel would hold some back
            holder = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
            holder.sendall(b"GET /metr")
            holders.append(holder)
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while _handler_threads() < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # time to take more, were there no bound
        assert _handler_threads() == 4  # 12 before: one a connection
        refused = [holder for holder in holders if _closed_by_the_server(holder, wait_s=0.1)]
        assert len(refused) == 8, len(refused)  # closed at once
        assert all(_closed_by_the_server(holder, wait_s=10) for holder in holders)  # the held ones after 3 s
        status, body = _scrape(server.server_port)
        assert status == 200 and b"probe_total 1.0" in body
        deadline = time.monotonic() + 10
        while _handler_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _handler_threads() == 0  # every handler's thread ended
        assert "Traceback" not in capfd.readouterr().err  # a cut-off client is no error
    finally:
        for holder in holders:
            holder.close()
        server.shutdown()
        server.server_close()
