"""What the requantizer is doing, for `health`, `stats` and `/metrics`. Torch-free.

The requantizer runs apart from serving (docs/dynamic-tasks.md): its state never makes the
server unhealthy, but an operator must be able to see a job stuck waiting for a process that
keeps dying, or jobs that fail, without reading the log.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from inlaid.protocol import RequantizerInfo
from inlaid.serve.dynamic_tasks import DynamicTasks

UNAVAILABLE = "unavailable"  # this server cannot re-quantize (DynamicTasks.blocker says why)
IDLE = "idle"
STARTING = "starting"  # a job waits for its process to start, or to restart after a loss
RUNNING = "running"


def requantizer_state(dynamic: DynamicTasks) -> str:
    jobs = dynamic.jobs
    if dynamic.blocker:
        return UNAVAILABLE
    if jobs.current is None and not jobs.queue:
        return IDLE
    supervisor = jobs.supervisor
    return RUNNING if supervisor is not None and supervisor.ready else STARTING


def requantizer_info(dynamic: DynamicTasks) -> RequantizerInfo:
    jobs = dynamic.jobs
    supervisor = jobs.supervisor
    current = jobs.current
    # list() copies the deque in one step: a scrape from the metrics port's thread must not
    # iterate it while the event loop appends
    waiting = [name for name in list(jobs.queue) if name != current]
    return RequantizerInfo(
        state=requantizer_state(dynamic),
        unavailable_because=dynamic.blocker,
        pid=supervisor.pid if supervisor is not None else 0,
        job=current or "",
        jobs_queued=len(waiting),
        jobs_succeeded=jobs.counts.succeeded,
        jobs_failed=jobs.counts.failed,
        jobs_cancelled=jobs.counts.cancelled,
        layers_done=jobs.counts.layers_done,
        processes_lost=supervisor.losses if supervisor is not None else 0,
    )


def requantizer_metrics(dynamic: DynamicTasks) -> Iterator[Metric]:
    """The series `ServerMetrics` adds at scrape time."""
    info = requantizer_info(dynamic)
    supervisor = dynamic.jobs.supervisor
    yield GaugeMetricFamily("inlaid_requantizer_up", "1 while a requantizer process is connected (a job starts one; "
                            "it exits after a minute without a job)",
                            value=int(supervisor is not None and supervisor.ready))
    yield GaugeMetricFamily("inlaid_requantization_jobs_queued", "Re-quantization jobs waiting (the running one "
                            "not counted)", value=info.jobs_queued)
    yield GaugeMetricFamily("inlaid_requantization_job_running", "1 while a task's re-quantization job is under way "
                            "(its process may be restarting)", value=int(bool(info.job)))
    jobs = CounterMetricFamily("inlaid_requantization_jobs", "Re-quantization jobs ended, by outcome",
                               labels=["outcome"])
    jobs.add_metric(["succeeded"], info.jobs_succeeded)
    jobs.add_metric(["failed"], info.jobs_failed)
    jobs.add_metric(["cancelled"], info.jobs_cancelled)
    yield jobs
    yield CounterMetricFamily("inlaid_requantization_layers", "Layers a re-quantization job finished (swapped into "
                              "every executor, or kept as served)", value=info.layers_done)
    store = dynamic.store
    yield GaugeMetricFamily("inlaid_state_dir_unsaved", "1 while the state directory's registry cannot be written "
                            "(full, read-only): added tasks' state is kept in memory until it can be",
                            value=int(bool(store is not None and store.unsaved)))
    yield CounterMetricFamily("inlaid_requantizer_losses", "Requantizer processes that died or were killed (the "
                              "job resumes in a new one, up to requantizer.max_attempts)", value=info.processes_lost)
