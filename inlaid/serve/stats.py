"""The `ServerStats` snapshot a client gets for `GetStats`. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence

from inlaid.protocol import RequantizerInfo, ServerStats
from inlaid.serve.executor_pool import ExecutorShard


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def server_stats(
    request_id: str,
    shards: Sequence[ExecutorShard],
    counters: dict[str, int],
    step_gaps: list[float],
    *,
    requantizer: RequantizerInfo | None,
    state_unsaved: str,
    requests_held: int,
) -> ServerStats:
    """counters: the coordinator's request/step/token counts; step_gaps: its recent own
    times between a step's result and the next plan, in seconds. Executor figures are sums
    over the executors (pid: the first ready one's), each also listed on its own.
    requantizer, state_unsaved, requests_held: as `ServerStats` names them (the caller holds
    the dynamic tasks and the start-up hold)."""
    supervisors = [shard.supervisor for shard in shards if shard.supervisor is not None]
    timings = [t for supervisor in supervisors for t in supervisor.timings]
    reports = [supervisor.stats for supervisor in supervisors if supervisor.stats is not None]
    schedulers = [shard.engine.scheduler for shard in shards]
    return ServerStats(
        request_id=request_id,
        requests_waiting=sum(len(s.waiting) for s in schedulers),
        requests_running=sum(len(s.running) for s in schedulers),
        requests_received=counters["received"],
        requests_finished=counters["finished"],
        requests_failed=counters["failed"],
        requests_rejected_overloaded=counters["overloaded"],
        steps=counters["steps"],
        tokens_generated=counters["tokens"],
        kv_blocks_total=sum(s.blocks.num_blocks for s in schedulers),
        kv_blocks_free=sum(s.blocks.num_free_blocks for s in schedulers),
        executor_pid=next((shard.supervisor.pid for shard in shards if shard.ready and shard.supervisor), 0),
        executor_restarts=sum(supervisor.restarts for supervisor in supervisors),
        executor_rss_bytes=sum(report.rss_bytes for report in reports),
        executor_device_memory_allocated=sum(report.device_memory_allocated for report in reports),
        mean_step_seconds=_mean([t.round_trip_seconds for t in timings]),
        mean_compute_seconds=_mean([t.compute_seconds for t in timings]),
        mean_step_gap_seconds=_mean(step_gaps),
        requests_abandoned=counters["abandoned"],
        requests_rejected=counters["rejected"],
        frames_refused=counters["frames_refused"],
        executors=[shard.info() for shard in shards],
        requantizer=requantizer,
        state_unsaved=state_unsaved,
        requests_held=requests_held,
    )
