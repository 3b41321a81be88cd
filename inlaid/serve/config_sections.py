"""The `inlaid serve` config's smaller sections ([server]'s limits, [metrics], [executors],
[requantizer]), each a dataclass with its range checks; `config.py` reads the file and
holds them together. Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from inlaid.cli_args import MAX_SECONDS
from inlaid.engine.config import MAX_THREADS, check_device, check_range
from inlaid.protocol import DEFAULT_MAX_FRAME_BYTES
from inlaid.serve.config_parsing import ConfigError
from inlaid.serve.placement import PLACEMENT_RULES, PlacementRule


MAX_EXECUTORS = 64  # one per device: more than any box has (Ray replicas scale further)
MAX_FRAME_BYTES = 1 << 30  # a frame is held whole in memory while it is decoded


def check_seconds(name: str, value: Any, allow_zero: bool = False) -> None:
    check_range(name, value, 0, MAX_SECONDS, low_open=not allow_zero, what="a finite number of seconds")


# ZeroMQ's high-water marks are C ints and the front's is a few times this (peers.py): a
# larger value passed the check and crashed the start with an OverflowError.
MAX_PENDING_REQUESTS = 10_000_000


@dataclass
class ServerLimits:
    max_pending_requests: int = 1024  # waiting + running; beyond it: 'overloaded'
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    step_timeout_s: float = 300.0  # a step running longer means a hung executor: restart it
    executor_start_timeout_s: float = 600.0  # model load
    shutdown_grace_s: float = 30.0  # SIGTERM: how long in-flight requests may finish

    def validate(self) -> None:
        check_range("server.max_pending_requests", self.max_pending_requests, 1, MAX_PENDING_REQUESTS, integer=True)
        check_range("server.max_frame_bytes", self.max_frame_bytes, 1024, MAX_FRAME_BYTES, integer=True)
        check_seconds("server.step_timeout_s", self.step_timeout_s)
        check_seconds("server.executor_start_timeout_s", self.executor_start_timeout_s)
        check_seconds("server.shutdown_grace_s", self.shutdown_grace_s, allow_zero=True)


@dataclass
class MetricsConfig:
    """Prometheus metrics served by the coordinator itself on host:port (path /metrics)."""

    port: int
    host: str = "127.0.0.1"


@dataclass
class ExecutorsConfig:
    """Several executors under this coordinator (docs/scale-out.md): one per device."""

    count: int = 1
    # One device per executor ("cuda:0", "cuda:1", ...); None (absent): [executor].device for all.
    devices: list[str] | None = None
    placement: PlacementRule = "pack"  # "pack" (fill the busiest that fits) or "spread" (the least busy)
    overdue_s: float = 5.0  # waiting longer than this: moved first to any executor with room

    def validate(self, quant_kernel: str | None) -> None:
        """quant_kernel: the quantized base's kernel, which may run on one kind of device only."""
        check_range("executors.count", self.count, 1, MAX_EXECUTORS, integer=True)
        # [] is refused too: it was taken as absent, and every executor ran on [executor].device
        if self.devices is not None and (not isinstance(self.devices, list) or len(self.devices) != self.count
                                         or not all(isinstance(d, str) and d for d in self.devices)):
            raise ConfigError(f"executors.devices must list one device string per executor ({self.count}), "
                              f"got {self.devices!r}")
        for device in self.devices or []:
            check_device("executors.devices", device, quant_kernel)
        if self.placement not in PLACEMENT_RULES:
            raise ConfigError(f"executors.placement must be one of {list(PLACEMENT_RULES)}, got {self.placement!r}")
        check_seconds("executors.overdue_s", self.overdue_s)


@dataclass
class RequantizerSettings:
    """The background re-quantization of the base when a task is added (docs/dynamic-tasks.md)."""

    enabled: bool = True
    threads: int = 1  # torch/OpenMP threads: beside the executor on a small CPU, one
    niceness: int = 19
    idle_priority: bool = True  # Linux SCHED_IDLE: the CPU only when nothing else wants it
    change_threshold: float = 0.01  # relative aggregate change at or below which a linear is kept (as
    # IncrementalSettings: a re-run on a 1 % move re-rolled every task's rounding for no gain, an outside probe)
    quality_tolerance: float = 1.0  # relative error an existing task may gain on a linear; < 0: no gate
    max_samples: int = 0  # calibration samples of the new task; 0: the checkpoint's setting
    # The share of one core's time a job may use while the machine is busy serving: it sleeps
    # the rest, in steps of one input group (docs/dynamic-tasks.md measures what it costs
    # serving); and the share while nothing else uses the CPU.
    duty_cycle: float = 0.5
    idle_duty_cycle: float = 1.0
    max_attempts: int = 3  # requantizer deaths during one task before that task is marked failed
    start_timeout_s: float = 120.0
    # A requantizer that owes a layer yet does not run for this long (stopped, or asleep
    # without using CPU beyond what its duty cycle may sleep) is killed and restarted, counted
    # like a death. Starved time at SCHED_IDLE never counts (requantizer_supervisor._liveness),
    # so this need not cover a slow layer (1.7 s CPU, minutes starved, on the default model):
    # it bounds how long a hang (SIGSTOP, a deadlock) holds the job queue.
    progress_timeout_s: float = 120.0

    def validate(self) -> None:
        # The types are checked as the section is read (config_from_dict): ints are ints here.
        check_range("requantizer.threads", self.threads, 1, MAX_THREADS, integer=True)
        if not 0 <= self.niceness <= 19:
            raise ConfigError("requantizer.niceness must be in 0..19")
        check_range("requantizer.change_threshold", self.change_threshold, 0)
        tolerance = self.quality_tolerance
        if not math.isfinite(tolerance):  # any finite value is a setting: < 0 turns the gate off
            raise ConfigError(f"requantizer.quality_tolerance must be a finite number, got {tolerance!r}")
        check_range("requantizer.max_samples", self.max_samples, 0, integer=True)
        for name in ("duty_cycle", "idle_duty_cycle"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"requantizer.{name} must be in (0, 1], got {value!r}")
        check_range("requantizer.max_attempts", self.max_attempts, 1, integer=True)
        check_seconds("requantizer.start_timeout_s", self.start_timeout_s)
        check_seconds("requantizer.progress_timeout_s", self.progress_timeout_s)
