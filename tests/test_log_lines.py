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
