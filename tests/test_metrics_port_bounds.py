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


def _closed_by_the_server(holder: socket.socket) -> bool:
    try:
        return holder.recv(1) == b""
    except ConnectionResetError:
        return True


def test_stalled_connections_hold_a_bounded_number_of_threads_and_are_cut_off() -> None:
    registry = CollectorRegistry()
    Counter("probe", "a counter", registry=registry).inc()
    threads_before = threading.active_count()
    server = start_metrics_server(0, "127.0.0.1", registry, max_connections=8, client_timeout_s=1.0)
    holders: list[socket.socket] = []
    try:
        for _ in range(40):
            holder = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
            holder.sendall(b"GET /metr")
            holders.append(holder)
        time.sleep(0.3)
        # the serving thread and 8 handlers at most (40 before: one a connection)
        assert threading.active_count() - threads_before <= 1 + 8, threading.active_count() - threads_before
        started = time.monotonic()
        assert all(_closed_by_the_server(holder) for holder in holders)  # the refused at once, the held at 1 s
        assert time.monotonic() - started < 10
        status, body = _scrape(server.server_port)
        assert status == 200 and b"probe_total 1.0" in body
        deadline = time.monotonic() + 10
        while threading.active_count() - threads_before > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() - threads_before <= 1  # every handler's thread ended
    finally:
        for holder in holders:
            holder.close()
        server.shutdown()
        server.server_close()
