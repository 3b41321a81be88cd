"""The `ServerStats` snapshot a client gets for `GetStats`. Torch-free."""

from __future__ import annotations

from inlaid.engine.engine import Engine
from inlaid.protocol import ServerStats
from inlaid.serve.supervisor import ExecutorSupervisor


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def server_stats(
    request_id: str,
    engine: Engine,
    supervisor: ExecutorSupervisor | None,
    counters: dict[str, int],
    step_gaps: list[float],
) -> ServerStats:
    """counters: the coordinator's request/step/token counts; step_gaps: its recent own
    times between a step's result and the next plan, in seconds."""
    timings = list(supervisor.timings) if supervisor else []
    executor_stats = supervisor.stats if supervisor else None
    blocks = engine.scheduler.blocks
    return ServerStats(
        request_id=request_id,
        requests_waiting=len(engine.scheduler.waiting),
        requests_running=len(engine.scheduler.running),
        requests_received=counters["received"],
        requests_finished=counters["finished"],
        requests_failed=counters["failed"],
        requests_rejected_overloaded=counters["overloaded"],
        steps=counters["steps"],
        tokens_generated=counters["tokens"],
        kv_blocks_total=blocks.num_blocks,
        kv_blocks_free=blocks.num_free_blocks,
        executor_pid=supervisor.pid if supervisor and supervisor.ready.is_set() else 0,
        executor_restarts=supervisor.restarts if supervisor else 0,
        executor_rss_bytes=executor_stats.rss_bytes if executor_stats else 0,
        executor_device_memory_allocated=executor_stats.device_memory_allocated if executor_stats else 0,
        mean_step_seconds=_mean([t.round_trip_seconds for t in timings]),
        mean_compute_seconds=_mean([t.compute_seconds for t in timings]),
        mean_step_gap_seconds=_mean(step_gaps),
        requests_abandoned=counters["abandoned"],
    )
