"""What the coordinator's supervisors (`supervisor.py`: executors; `requantizer_supervisor.py`)
share about a child process: log lines that name it, and its exit awaited, else forced.
Torch-free."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("inlaid.supervisor")


class FieldsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds its fields to each record beside the call's own `extra` (a plain LoggerAdapter
    replaces the call's: `merge_extra` is Python 3.13's)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


async def wait_or_kill(process: asyncio.subprocess.Process, timeout_s: float, what: str) -> None:
    """Wait up to `timeout_s` for a child asked to exit, then SIGKILL it; reaped either way."""
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except asyncio.TimeoutError:
        log.warning(f"{what} did not exit in time; killing it", extra={"pid": process.pid})
        process.kill()
        await process.wait()
