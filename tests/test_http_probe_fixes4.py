"""Defects a fourth outside probe of the HTTP front found, checked on a real uvicorn and on the
ASGI app with a stand-in SDK client (no server, no model):

* The 408 for a request head that did not arrive in time and the 431 for one over the size
  limit are answered by the protocol, before any request reaches the metrics middleware:
  they were missing from `inlaid_http_requests_total` (slowloris traffic was invisible).
* A non-string `metadata` value was refused with msgspec's path placeholder for the key
  (`param: "metadata[...]"`).
* A text part whose text is not a string was refused as "only text parts are supported".
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from test_http_probe_fixes import BASE, _app, _exchange, _post, _uvicorn
from test_http_probe_fixes2 import _Client

from inlaid.http.slow_clients import MAX_HEAD_BYTES

_CHAT = "/v1/chat/completions"


def _requests_total(port: int) -> dict[tuple[str, str], float]:
    """`inlaid_http_requests_total` by (route, status), as a scrape of the front's /metrics reads it."""
    reply = _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, text = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply
    counts = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "inlaid_http_requests_total":
                counts[(sample.labels["route"], sample.labels["status"])] = sample.value
    return counts


def test_refused_request_heads_are_counted_in_the_requests_metric():
    with _uvicorn(head_timeout_s=0.5, client=_Client()) as port:
        before = _requests_total(port)
        stalled = [  # what a connection sends before it stalls
            b"",  # nothing at all
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
            b"GET /livez",  # the URL may go on ("/livezzz")
            b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /livez",  # a served request, then the next one's head
        ]
        for sent in stalled:
            assert b"HTTP/1.1 408 " in _exchange(port, sent), sent
        oversized = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * MAX_HEAD_BYTES + b"\r\n\r\n"
        assert _exchange(port, oversized).startswith(b"HTTP/1.1 431 ")
        # A body that stalls is answered by the app: counted by its middleware, as before.
        body_start = (f"POST {_CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100\r\n\r\n{")
        assert _exchange(port, body_start.encode()).startswith(b"HTTP/1.1 408 ")
        after = _requests_total(port)
    # the refused heads under `other` (their URLs not known to be whole), the rest by route
    expected = {("/metrics", "200"): 1.0, ("/livez", "200"): 1.0, ("other", "431"): 1.0, (_CHAT, "408"): 1.0,
                ("other", "408"): float(len(stalled))}
    grown = {labels: value - before.get(labels, 0.0) for labels, value in after.items()
             if value != before.get(labels, 0.0)}
    assert grown == expected


def _error(body: dict[str, Any], path: str = _CHAT) -> dict[str, Any]:
    status, answer = _post(_app(_Client()), path, json.dumps({"model": BASE, **body}).encode())
    assert status == 400, answer
    return json.loads(answer)["error"]


def test_a_metadata_value_that_is_not_a_string_is_named_by_its_key():
    error = _error({"messages": [{"role": "user", "content": "Hi"}], "metadata": {"ok": "x", "tag": 5}})
    assert error["param"] == "metadata.tag", error
    assert error["message"] == "Expected `str`, got `int` - at `$.metadata.tag`", error
    error = _error({"prompt": "x", "logit_bias": {"1": 0, "a\\b": "z"}}, "/v1/completions")
    assert (error["param"], error["message"]) == ('logit_bias["a\\\\b"]',
                                                  'Expected `float`, got `str` - at `$.logit_bias["a\\\\b"]`'), error


def test_a_text_part_whose_text_is_not_a_string_says_so():
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]
    error = _error({"messages": [{"role": "user", "content": content}]})
    assert error["param"] == "messages[0].content[1].text", error
    assert error["message"] == "messages[0].content[1].text must be a string, got int", error
    # A null is called None, not NoneType (Python's jargon).
    error = _error({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
    assert error["message"] == "messages[0].content[0].text must be a string, got None", error
    # A part of another kind is still refused as one.
    error = _error({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert error["param"] == "messages[0].content" and "only text parts" in error["message"], error


def test_sigterm_answers_what_is_still_open_before_the_grace_ends() -> None:
    """A front stopped with requests open answered them, after uvicorn's grace, with a bare
    `500 Internal Server Error` (a stream: cut mid-body). Now 503 `unavailable` JSON (a
    started stream: its error event), and the front exits 0. The server is a stand-in that
    answers the hello and never a generate (tests/test_cli_leftovers_wait.py)."""
    import http.client
    import signal
    import subprocess
    import sys
    import threading
    import time

    from test_cli_leftovers_wait import StandInServer

    from inlaid.serve.launcher import free_tcp_port

    address, port = f"tcp://127.0.0.1:{free_tcp_port()}", free_tcp_port()
    stand_in = StandInServer(address)
    front = subprocess.Popen([sys.executable, "-m", "inlaid.cli", "http", "--address", address, "--port", str(port),
                              "--log-format", "text"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    answers: dict[str, tuple[int, str]] = {}

    def ask(name: str, body: dict[str, Any]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answers[name] = (response.status, response.read().decode())  # a cut stream raised IncompleteRead here

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/livez")
                break
            except OSError:
                assert front.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        asking = [threading.Thread(target=ask, args=(name, {"model": "none", "prompt": "x", "max_tokens": 4,
                                                            "stream": name == "stream"}))
                  for name in ("plain", "stream")]
        for thread in asking:
            thread.start()
        time.sleep(1.0)  # both wait for the server's answer now
        front.send_signal(signal.SIGTERM)
        for thread in asking:
            thread.join(30)
        assert front.wait(30) == 0
    finally:
        if front.poll() is None:
            front.kill()
        stand_in.stop()
    status, body = answers["plain"]
    assert status == 503 and json.loads(body)["error"]["code"] == "unavailable", answers
    status, body = answers["stream"]
    assert (status == 503 and json.loads(body)["error"]["code"] == "unavailable") or (
        status == 200 and '"code":"unavailable"' in body.replace(" ", "")), answers
