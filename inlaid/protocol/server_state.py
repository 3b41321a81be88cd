"""Coordinator -> client: what the server reports about itself (health, stats, metrics).
Part of the client link (`client.py` re-exports every name here); replies are read leniently,
so a field is added with a default and older clients still decode the reply."""

from __future__ import annotations

import msgspec


class HealthReply(msgspec.Struct, frozen=True, kw_only=True, tag="health_reply"):
    request_id: str
    # ok | starting (executors loading or restarting, the start-up tuning) | stalled (every
    # ready executor's step has run past a quarter of server.step_timeout_s: hung, or far
    # slower than it should be; the step timeout kills it) | shutting_down
    status: str
    executor_ready: bool
    uptime_seconds: float
    # The background re-quantization of added tasks (never part of `status`: serving goes on
    # without it): unavailable (this server cannot re-quantize: ServerStats.requantizer says
    # why) | idle (no job) | starting (a job waits for its process to start or restart) |
    # running. "" from a server that predates it.
    requantizer: str = ""
    step_running_seconds: float = 0.0  # the longest an executor's current step has run (0: between steps)
    executor_restarts: int = 0  # executor processes restarted after a loss, since the server started


class ExecutorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One executor of a server with several (`[executors] count`)."""

    index: int
    ready: bool
    pid: int  # 0 while it is not ready
    restarts: int
    device: str
    requests_running: int
    requests_waiting: int
    kv_blocks_free: int
    # requests that ended on this executor, by task ("__base__": none; "__removed__": tasks
    # removed since, their names dropped, their count kept so the sum never goes back)
    tasks_served: dict[str, int]
    moved_in: int  # waiting requests moved here from another executor
    adapter_admissions: int  # adapter rows admitted (new or recomputed)
    adapter_hits: int  # of those, with their adapter already in a slot
    # How long its current step has run (0 between steps): which executor is hung shows here
    # before the step timeout kills it (the server's figure is the longest of them all).
    step_running_seconds: float = 0.0


class RequantizerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The requantizer process and its jobs (docs/dynamic-tasks.md); counts since the server started."""

    state: str  # as HealthReply.requantizer
    unavailable_because: str  # why this server cannot re-quantize ("" when it can)
    pid: int  # 0 when no process runs
    job: str  # the task whose job runs now ("" none)
    jobs_queued: int  # waiting behind it
    jobs_succeeded: int
    jobs_failed: int
    layers_done: int  # layers a job finished: swapped into every executor, or kept as served
    processes_lost: int  # requantizer processes that died or were killed (a job resumes in the next one)
    jobs_cancelled: int = 0  # by the removal of their task, queued or running (counted nowhere before)


class ServerStats(msgspec.Struct, frozen=True, kw_only=True, tag="stats_reply"):
    request_id: str
    requests_waiting: int
    requests_running: int
    requests_received: int
    requests_finished: int
    requests_failed: int
    requests_rejected_overloaded: int
    steps: int
    tokens_generated: int
    kv_blocks_total: int
    kv_blocks_free: int
    executor_pid: int
    executor_restarts: int
    executor_rss_bytes: int
    executor_device_memory_allocated: int
    mean_step_seconds: float  # plan sent -> result received, over the last steps
    mean_compute_seconds: float  # the executor's own time for those steps
    mean_step_gap_seconds: float  # coordinator time between a result and the next plan
    requests_abandoned: int = 0  # cancelled because their client disconnected
    # Refused at admission for what they asked (invalid, unknown task, too long, shutting
    # down); overloaded ones count apart. received = finished + failed + rejected_overloaded
    # + rejected + abandoned + those in flight.
    requests_rejected: int = 0
    # Frames refused before they became a request (malformed, frame_too_large,
    # unknown_message_type, protocol_version, unauthorized, replies_unread): not in received.
    frames_refused: int = 0
    executors: list[ExecutorInfo] = []  # per executor; the figures above are their sums
    requantizer: RequantizerInfo | None = None  # None from a server that predates it
    # Why the state directory's registry could not be written ("": saved): the added tasks'
    # state is kept in memory and written once it can be; a restart before that loses it.
    state_unsaved: str = ""
    # Requests a starting server holds until it serves (the start-up tuning): not yet received.
    requests_held: int = 0


class MetricsReply(msgspec.Struct, frozen=True, kw_only=True, tag="metrics_reply"):
    request_id: str
    text: str  # Prometheus text exposition format 0.0.4


__all__ = ["ExecutorInfo", "HealthReply", "MetricsReply", "RequantizerInfo", "ServerStats"]
