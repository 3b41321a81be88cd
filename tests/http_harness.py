"""Shared by the HTTP front's end-to-end tests (test_http_server.py, test_http_front_process.py):
a real `inlaid serve` with `[http]` and `[metrics]` on free loopback ports, and the raw-HTTP,
stats and `/metrics` helpers both files use. The fixtures are module-scoped: each test module
that imports them starts its own server."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inlaid.serve.launcher import ServerProcess, free_tcp_port

ADMIN_TOKEN = "http-test-admin-token-0123456789"
MAX_MODEL_LEN = 512
MAX_PENDING = 32  # above the 24 requests the SDK-vs-HTTP tests send at once (past nine tenths a connection may be held to its share)
MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "def add(a, b):", "List three fruits:"]
CHATS = [
    [{"role": "user", "content": "Name a planet."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 3 + 4?"}],
]


def start_server(model_dir: Path, adapter_dirs: dict[str, Path], workdir: Path) -> ServerProcess:
    config = {
        "model": {"dir": str(model_dir)},
        "executor": {"dtype": "float32", "threads": 1, "max_num_seqs": 64, "num_kv_blocks": 1024, "block_size": 16,
                     "max_lora_slots": 4, "max_lora_rank": 32, "max_model_len": MAX_MODEL_LEN},
        "server": {"admin_token": ADMIN_TOKEN, "max_pending_requests": MAX_PENDING, "shutdown_grace_s": 3.0},
        "tasks": {name: str(path) for name, path in adapter_dirs.items()},
        # Not the defaults: the prompt cap must reach the front's process; a stopped front
        # is replaced within 9 s, not 60.
        "http": {"max_prompts_per_request": 12, "front_liveness_s": 9.0},
        "metrics": {"port": free_tcp_port()},
    }
    process = ServerProcess(config, workdir=workdir)
    process.wait_ready(timeout_s=300)
    return process


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory, request):  # noqa: ANN001, ANN201
    process = start_server(model_dir, adapter_dirs, tmp_path_factory.mktemp(request.module.__name__))
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def base_model(server: ServerProcess) -> str:
    with server.client() as client:
        return client.handshake().model


def http_request(server, method: str, path: str, body: object = None, headers: dict | None = None,
          raw: bytes | None = None) -> tuple[int, dict, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"{server.http_url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def post_head_only(server, path: str, content_length: int) -> tuple[int, bytes]:
    """POST a request head that declares `content_length` body bytes and send none of them."""
    host, port = server.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def error_of(body: bytes) -> dict:
    document = json.loads(body)
    assert set(document) == {"error"}, document
    assert set(document["error"]) == {"message", "type", "param", "code"}, document
    assert document["error"]["message"], document
    return document["error"]


def open_generation(server, body: dict) -> socket.socket:
    """A request on a raw connection, so that the test can drop the connection itself."""
    payload = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", int(server.http_url.rsplit(":", 1)[1])), timeout=60)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return connection


def drop(connection: socket.socket) -> None:
    """Close the connection for good (a file made from it would keep it open otherwise)."""
    connection.shutdown(socket.SHUT_RDWR)
    connection.close()


def wait_idle(server, timeout_s: float = 30.0):
    with server.client() as client:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = client.stats()
            if stats.requests_running == stats.requests_waiting == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


def wait_running(server, count: int, timeout_s: float = 60.0):
    with server.client() as client:
        deadline = time.monotonic() + timeout_s
        while (stats := client.stats()).requests_running < count and time.monotonic() < deadline:
            time.sleep(0.05)
    assert stats.requests_running >= count, stats
    return stats


def scrape(server, url: str | None = None) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url or f"{server.http_url}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)
