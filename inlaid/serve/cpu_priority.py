"""How the requantizer process stays out of serving's way on the CPU: a duty cycle that keeps
its CPU time at a share of the wall time while the machine is busy, and the lowest scheduling
priority the OS offers (nice, Linux SCHED_IDLE). docs/dynamic-tasks.md measures both."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("inlaid.requantizer")


class DutyCycle:
    """Keeps this process's CPU time at about `share` of the wall time while the rest of the
    machine is busy (serving), and at `idle_share` while it is not: `pace()` (called at every
    input group) sleeps in proportion to the CPU time used since the last call. Beside an
    executor on a small machine the requantizer slows serving while it computes, even at idle
    priority: the core it runs on is also the coordinator's and the clients'
    (docs/dynamic-tasks.md measures it); when nobody is served there is nothing to slow, so
    the job may run at full speed.

    "Busy" = the CPU time the other processes used during the last work interval (Linux
    /proc/stat, whole machine) reaches `busy_cores` cores. Where /proc/stat cannot be read
    (not Linux) the machine counts as busy: `share` always."""

    def __init__(self, share: float, idle_share: float = 1.0, busy_cores: float = 0.25,
                 stat_path: Path = Path("/proc/stat"), sleep: Callable[[float], None] = time.sleep) -> None:
        self.share = share
        self.idle_share = idle_share
        self.busy_cores = busy_cores
        self.stat_path = stat_path
        self.sleep = sleep
        self.busy_intervals = 0  # intervals paced at `share` (reported in the job's log)
        self.idle_intervals = 0
        self._clock_ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark()

    def _machine_busy_seconds(self) -> float | None:
        """CPU seconds every CPU of the machine spent not idle since boot (None: unknown)."""
        try:
            fields = self.stat_path.read_text().split("\n", 1)[0].split()
            ticks = [int(value) for value in fields[1:]]
        except (OSError, ValueError, IndexError):
            return None
        if fields[0] != "cpu" or len(ticks) < 5:
            return None
        idle_ticks = ticks[3] + ticks[4]  # idle + iowait
        counted = ticks[:8]  # user nice system idle iowait irq softirq steal (guest is inside user)
        return (sum(counted) - idle_ticks) / self._clock_ticks

    def _mark(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()
        self._machine = self._machine_busy_seconds()

    def _others_busy_cores(self, own_seconds: float) -> float | None:
        """Cores the other processes kept busy since the last mark, given this process's CPU
        seconds over the same interval (None: unknown)."""
        machine = self._machine_busy_seconds()
        wall = time.monotonic() - self._wall
        if machine is None or self._machine is None or wall <= 0:
            return None
        return max(0.0, machine - self._machine - own_seconds) / wall

    def pace(self) -> None:
        used = time.process_time() - self._cpu
        others = self._others_busy_cores(used)
        busy = others is None or others >= self.busy_cores
        share = self.share if busy else self.idle_share
        if busy:
            self.busy_intervals += 1
        else:
            self.idle_intervals += 1
        if used > 0 and share < 1:
            self.sleep(used * (1.0 - share) / share)
        self._mark()


def lower_priority(niceness: int, idle: bool) -> bool:
    """nice + (Linux) SCHED_IDLE for this process; returns whether SCHED_IDLE took."""
    os.nice(max(0, niceness - os.nice(0)))
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return True
        except OSError:
            log.warning("SCHED_IDLE refused; running at nice only")
    return False
