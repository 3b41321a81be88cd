"""What the coordinator's supervisors (`supervisor.py`: executors; `requantizer_supervisor.py`)
know and do about a child process: log lines that name it, its exit awaited (else forced),
and what Linux /proc says of it (running, starved, stopped; its CPU time). Torch-free."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("inlaid.supervisor")


class FieldsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds its fields to each record beside the call's own `extra` (a plain LoggerAdapter
    replaces the call's: `merge_extra` is Python 3.13's)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


async def wait_or_kill(process: asyncio.subprocess.Process, timeout_s: float, what: str,
                       harmless: str = "") -> None:
    """Wait up to `timeout_s` for a child asked to exit, then SIGKILL it; reaped either way.
    `harmless`: why a kill loses nothing, said at INFO instead of a WARNING."""
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except asyncio.TimeoutError:
        if harmless:
            log.info(f"{what} did not exit within {timeout_s:g} s; killing it ({harmless})", extra={"pid": process.pid})
        else:
            log.warning(f"{what} did not exit in time; killing it", extra={"pid": process.pid})
        process.kill()
        await process.wait()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc CPU times' unit

# /proc state letters of a process that is not running, as the kill's reason names them.
NOT_RUNNING = {"T": "stopped (SIGSTOP)", "t": "stopped by a debugger", "S": "asleep without using any CPU",
                "D": "in uninterruptible sleep (I/O)"}


@dataclass(frozen=True)
class ProcessSample:
    """What Linux /proc says of a process at one instant."""

    state: str  # its main thread's state letter (R running or runnable, S sleeping, T stopped, ...)
    runnable: bool  # some thread is R: running, or waiting for a CPU (starved) it will get
    cpu_ticks: int  # user + system CPU time of all its threads, in clock ticks

    @property
    def stopped(self) -> bool:
        return self.state in ("T", "t")


def _stat_fields(path: str | Path) -> list[str]:
    """A /proc stat file's fields after "pid (comm)" (comm may hold spaces): the state is
    the first, utime and stime the 12th and 13th."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def sample_process(pid: int) -> ProcessSample | None:
    """None: no such process, or no /proc (not Linux)."""
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
        state, cpu_ticks = fields[0], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    runnable = state == "R"
    if not runnable:  # with threads > 1 the main thread may wait on workers that are queued for a CPU
        try:
            runnable = any(_stat_fields(Path(task.path, "stat"))[0] == "R" for task in os.scandir(f"/proc/{pid}/task"))
        except (OSError, IndexError):
            pass
    return ProcessSample(state, runnable, cpu_ticks)
