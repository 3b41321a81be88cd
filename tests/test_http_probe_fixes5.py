"""Defects a fifth outside probe of the HTTP front found, checked on the ASGI app with a
stand-in SDK client (no server, no model):

* A server slower than 2 s to answer a scrape (a SIGSTOPped coordinator) made the front's
  `/metrics` a 504 naming `http.request_timeout_s`: the front's own series were lost with
  it, its 503 and 504 counts among them. They are served now, the server's part marked
  missing (`inlaid_http_server_metrics_missing 1`).
* A hello the server did not answer was a 504 naming `http.request_timeout_s`, not its own
  bound (that, at most 30 s).
* A stream cut by the front's shutdown said "the client was closed before the answer came"
  (the SDK's words: read as the caller's own client).
* `GET /v1/models/` was answered as the model "" not existing; it is an unknown path.
* `top_k: -2` was refused as "top_k must be >= 0" though -1 (vLLM's off) is taken.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from test_http_probe_fixes import BASE, _app, _post
from test_http_probe_fixes2 import _Client

from inlaid.client import ClientClosedError, RequestTimeoutError
from inlaid.http.settings import HttpConfig


class _SilentServer(_Client):
    """A server that answers nothing: every call runs into its timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.server = None  # no hello yet

    async def metrics(self, timeout_s: float | None = None) -> str:
        raise RequestTimeoutError("no answer from tcp://127.0.0.1:1 in time", "m")

    async def handshake(self, timeout_s: float | None = None) -> Any:
        raise RequestTimeoutError("no answer from tcp://127.0.0.1:1 in time", "h")


def _families(text: bytes) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def test_a_server_that_does_not_answer_a_scrape_costs_only_its_own_series():
    app = _app(_SilentServer())
    assert _post(app, "/v1/models", b"", method="GET")[0] == 504  # counted by the front
    status, text = _post(app, "/metrics", b"", method="GET")
    assert status == 200, text
    families = _families(text)
    assert families["inlaid_http_server_metrics_missing"].samples[0].value == 1
    counted = {(s.labels["route"], s.labels["status"]): s.value for s in families["inlaid_http_requests"].samples
               if s.name == "inlaid_http_requests_total"}
    assert counted[("/v1/models", "504")] == 1
    assert not any(name.startswith("inlaid_") and not name.startswith("inlaid_http_") for name in families)
    # A server that answers: its part comes first, marked present.
    status, text = _post(_app(_Client()), "/metrics", b"", method="GET")
    assert status == 200 and text.startswith(b"# server metrics\n")
    assert _families(text)["inlaid_http_server_metrics_missing"].samples[0].value == 0


def test_an_unanswered_hello_names_its_own_bound():
    for timeout_s, bound in ((600.0, "30"), (12.5, "12.5")):
        app = _app(_SilentServer(), HttpConfig(request_timeout_s=timeout_s))
        status, answer = _post(app, "/v1/completions", json.dumps({"model": BASE, "prompt": "hi"}).encode())
        error = json.loads(answer)["error"]
        assert (status, error["code"], error["type"]) == (504, "timeout", "server_error")
        assert error["message"] == (f"the server did not answer the front's hello within {bound} s "
                                    "(http.request_timeout_s, at most 30 s); retry later")


def test_a_stream_cut_by_the_fronts_shutdown_says_so():
    from inlaid.http.errors import from_inlaid

    error = from_inlaid(ClientClosedError("the client was closed before the answer came", "r"))
    assert (error.status, error.code) == (503, "unavailable")
    assert error.message == ("the HTTP front is shutting down (its connection to the server closed before the "
                             "answer came); retry")


def test_the_model_list_path_with_a_slash_is_an_unknown_path():
    status, answer = _post(_app(_Client()), "/v1/models/", b"", method="GET")
    error = json.loads(answer)["error"]
    assert (status, error["code"], error["param"]) == (404, "not_found", None), answer
    assert error["message"] == "GET /v1/models/: Not Found"


def test_a_top_k_below_minus_one_is_refused_in_the_apis_terms():
    """-1 (vLLM's off) is taken, so "top_k must be >= 0" (the server's words) contradicted it."""
    client = _Client()
    for top_k, status in ((-1, 200), (0, 200), (5, 200), (-2, 400)):
        got, answer = _post(_app(client), "/v1/completions",
                            json.dumps({"model": BASE, "prompt": "hi", "top_k": top_k}).encode())
        assert got == status, answer
    error = json.loads(answer)["error"]
    assert (error["param"], error["message"]) == ("top_k", "top_k must be -1 or 0 (off) or a positive number of "
                                                            "tokens, got -2")
    assert [call["top_k"] for call in client.generated] == [0, 0, 5]
