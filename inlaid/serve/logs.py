"""Structured logs: one JSON object per line on stderr (or plain text for a terminal)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

# Fields a caller passes as `extra={...}` land in the JSON object beside the message.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Line breaks and other control characters (C0, DEL, C1, the Unicode line separators, the
# bidirectional overrides that reorder a line on a terminal): text that holds one is logged
# as its repr, so a value a client chose (a request id with a newline) cannot start a forged
# line of its own (an outside probe, without the admin token).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _one_line(value: object) -> str:
    text = str(value)
    return repr(text) if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={_one_line(v)}" for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        )
        line = (f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: "
                f"{_one_line(record.getMessage())}")
        if extras:
            line += f"  [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RepeatLimit(logging.Filter):
    """At most one record of each message (logger, level, text before its arguments) per
    `interval_s`, for warnings and below; the next one let through carries `repeated`, how
    many were dropped since. uvicorn writes one WARNING per malformed connection: an outside
    probe's unauthenticated flood wrote 41,000 lines (6.5 MB) to the front's log."""

    _MAX_KEYS = 1000  # messages built with their values (f-strings) each make a key: bounded

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.repeated = last[1]
        if len(self._seen) >= self._MAX_KEYS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return True


class _Fields(logging.Filter):
    """Sets fixed fields on every record (an executor's number: several write one stderr)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            setattr(record, key, value)
        return True


def setup_logging(level: str = "INFO", fmt: str = "json", fields: dict[str, Any] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if fields:
        handler.addFilter(_Fields(fields))
    root = logging.getLogger("inlaid")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
