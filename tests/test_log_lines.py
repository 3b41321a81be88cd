"""A text log line stays one line whatever a client put in it: a request id with a newline
wrote a forged CRITICAL line into an outside probe's text logs, without the admin token.
Values with control characters are logged as their repr; JSON logs escape them already."""

from __future__ import annotations

import json
import logging

from inlaid.serve.logs import JsonFormatter, TextFormatter

FORGED = "r1\n02:21:00 CRITICAL inlaid.coordinator: INJECTED [token=fake]"


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("inlaid.coordinator", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_value_with_a_line_break_stays_on_its_line_as_its_repr() -> None:
    for separator in ("\n", "\r", "\x85", "\u2028", "\x1b[2J"):
        value = FORGED.replace("\n", separator)
        line = TextFormatter().format(_record("request failed", request_id=value, task=None, code="x"))
        assert len(line.splitlines()) == 1, repr(line)
        assert f"request_id={value!r} task=None code=x" in line


def test_a_message_with_a_line_break_stays_on_its_line_and_plain_values_are_unchanged() -> None:
    line = TextFormatter().format(_record(f"unknown task {FORGED}", task="math", tokens=12))
    assert len(line.splitlines()) == 1
    assert line.endswith(f"inlaid.coordinator: {('unknown task ' + FORGED)!r}  [task=math tokens=12]")


def test_json_lines_keep_the_value_whole_and_escaped() -> None:
    line = JsonFormatter().format(_record("request failed", request_id=FORGED))
    assert len(line.splitlines()) == 1 and json.loads(line)["request_id"] == FORGED


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeat_limit_lets_one_of_each_warning_through_per_interval_and_counts_the_rest() -> None:
    from inlaid.serve.logs import RepeatLimit

    clock = _Clock()
    limit = RepeatLimit(10.0, clock=clock)

    def invalid() -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, "Invalid HTTP request received.", (), None)

    assert limit.filter(invalid())
    assert [limit.filter(invalid()) for _ in range(500)] == [False] * 500
    other = logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, "another message", (), None)
    assert limit.filter(other)  # each message has its own allowance
    error = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Invalid HTTP request received.", (), None)
    assert limit.filter(error)  # errors always pass
    clock.now = 10.5
    record = invalid()
    assert limit.filter(record) and record.repeated == 500
    assert limit.filter(invalid()) is False


def _send_each(port: int, request: bytes, connections: int) -> None:
    """`request` on `connections` fresh connections, one after the other, each read to its close."""
    from test_http_probe_fixes import _exchange

    for _ in range(connections):
        try:
            _exchange(port, request, timeout_s=10)
        except OSError:  # a refusal may reset the connection before its answer is read
            pass


def test_a_flood_of_malformed_connections_logs_one_line_on_a_real_front(caplog) -> None:
    """The front's own uvicorn (`uvicorn_config`), 200 connections sending garbage."""
    from test_http_probe_fixes import _uvicorn

    with caplog.at_level(logging.WARNING, logger="uvicorn.error"), _uvicorn(head_timeout_s=5.0) as port:
        _send_each(port, b"\x16\x03\x01 not http at all\r\n\r\n", connections=200)
    invalid = [r for r in caplog.records if r.getMessage() == "Invalid HTTP request received."]
    assert len(invalid) == 1, len(invalid)


def test_a_flood_of_heads_over_the_size_limit_logs_one_line(caplog) -> None:
    """Each head over 64 KiB wrote its own INFO line (a confirming probe: 100 connections, 100
    lines, no token needed)."""
    from test_http_probe_fixes import _uvicorn

    with caplog.at_level(logging.INFO, logger="inlaid.http"), _uvicorn(head_timeout_s=5.0) as port:
        _send_each(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", connections=30)
    refused = [r for r in caplog.records if r.getMessage() == "refusing a request head over the size limit"]
    assert len(refused) == 1, len(refused)


def test_bidirectional_overrides_are_escaped_too() -> None:
    line = TextFormatter().format(_record("adding", adapter_dir="/tmp/\u202eRTL"))
    assert "adapter_dir='/tmp/\\u202eRTL'" in line
