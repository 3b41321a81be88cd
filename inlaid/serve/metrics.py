"""The coordinator's Prometheus metrics. Torch-free.

`ServerMetrics` owns one private `CollectorRegistry`. The coordinator calls it at four
points of a request's life: admitted or rejected (`on_admitted` / `on_rejected`), every
step (`on_step`, before the step's text is delivered) and the end of an admitted request
(`on_finished`). Gauges (queue depth, KV blocks, executor state) are not updated by hooks:
a collector reads them from the engine and the supervisor when scraped.

Scrapes come from the event loop (the `GetMetrics` message the HTTP front sends) or from
the optional metrics port's thread. Counters and histograms are thread-safe; the
collector reads only sizes and integers (single, atomic reads under the GIL), so a scrape
from the thread never sees a half-updated structure.

Label values are bounded: `task` is a registered task's name, `__base__` for the base
model, or `__unknown__` for a request naming no registered task (client-chosen names must
not create series). Task names of that reserved form are refused when registered.

A removed task's series go once its last request in flight has ended (`forget_task`, called
when the registry unregisters it): names of added and removed tasks must not pile up series
for the life of the process. No remainder series takes over their counts: it would jump by
the task's lifetime totals at once, which `rate()` reads as a burst of traffic; a series that
ends is what Prometheus expects of a counter whose label value is gone (docs/serving.md).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from inlaid.engine.engine import Engine, RequestOutput
from inlaid.protocol import BatchPlan, ErrorCode, StepResult
from inlaid.serve.requests import ActiveRequest
from inlaid.serve.supervisor import ExecutorSupervisor


class ExecutorView(Protocol):
    """One executor as the metrics read it (`executor_pool.ExecutorShard`)."""

    engine: Engine
    supervisor: ExecutorSupervisor | None

    def step_running_seconds(self) -> float: ...

BASE_TASK_LABEL = "__base__"
UNKNOWN_TASK_LABEL = "__unknown__"
# Outcomes after which a request's latency figures are observed (it ran to its end).
COMPLETED = frozenset({"stop", "length", "context"})
# inlaid_frames_refused's reasons: the codes a frame is refused with before it becomes a
# request, and frames dropped from a connection cut off for leaving its replies unread.
REPLIES_UNREAD = "replies_unread"
FRAMES_QUEUED = "frames_queued"  # a connection with too many frames waiting to be handled (front_inbox.py)
FRAME_REFUSAL_REASONS = (ErrorCode.MALFORMED, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNKNOWN_MESSAGE,
                         ErrorCode.PROTOCOL_VERSION, ErrorCode.UNAUTHORIZED, REPLIES_UNREAD, FRAMES_QUEUED)

# Bucket bounds span CPU serving (seconds per token) and GPU serving (milliseconds).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TASK_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


@dataclass
class _TaskSeries:
    """One task's children of the per-task families, bound once (label lookups cost more
    than the increments themselves)."""

    prompt_tokens: Counter
    generation_tokens: Counter
    duration: Histogram
    queue: Histogram
    first_token: Histogram
    per_output_token: Histogram


class ServerMetrics:
    def __init__(
        self,
        executors: Sequence[ExecutorView],
        registered_tasks: Mapping[str, str],
        requests_by_engine_id: Mapping[str, ActiveRequest],
        server_info: Mapping[str, str],
        scraped: Callable[[], Iterable[Metric]] = tuple,
        per_task_histograms: bool = True,
    ) -> None:
        """executors: each executor's engine and supervisor (its supervisor is set once the
        coordinator runs); registered_tasks: the registry's accepting tasks (name -> adapter
        dir); requests_by_engine_id: the coordinator's in-flight requests, read in `on_step`;
        scraped: more series read at scrape time (the requantizer's); per_task_histograms
        False (`server.task_histograms`): the four latency histograms without a `task` label,
        one series set for all tasks (each task's cost 78 series, 4.9 MB an exposition at
        ~900 tasks serving: an outside probe; its counters keep their `task`)."""
        self._executors = executors
        self._tasks = registered_tasks
        self._requests = requests_by_engine_id
        # Keyed by the task as requests name it (None: the base model), never by a label:
        # keyed by "__base__", a request naming the task "__base__" took the base's label.
        self._series: dict[str | None, _TaskSeries] = {}
        # Each executor's adapter slots as the plans filled them, and its restarts seen.
        self._slot_holder: dict[int, dict[int, str]] = {}
        self._restarts_seen: dict[int, int] = {}
        # `_created` series double the exposition and no dashboard reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        registry = self.registry
        task = ["task"]
        per_task = task if per_task_histograms else []
        self.requests = Counter("inlaid_requests", "Generate requests by how they ended: a finish reason "
                                "(stop, length, context, cancelled) or the error code they were answered with",
                                ["task", "outcome"], registry=registry)
        self.frames_refused = Counter("inlaid_frames_refused", "Client frames refused before they became a "
                                      "request, by the error code answered (malformed, frame_too_large, "
                                      "unknown_message_type, protocol_version, unauthorized) or replies_unread "
                                      "(dropped: the connection left its replies unread)", ["reason"],
                                      registry=registry)
        for reason in FRAME_REFUSAL_REASONS:  # each series from 0, so rate() sees the first refusal
            self.frames_refused.labels(reason)
        self.prompt_tokens = Counter("inlaid_prompt_tokens", "Prompt tokens of admitted requests", task,
                                     registry=registry)
        self.generation_tokens = Counter("inlaid_generation_tokens", "Tokens generated", task, registry=registry)
        self.duration = Histogram("inlaid_request_duration_seconds", "Receipt to the last token, completed requests",
                                  per_task, buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("inlaid_request_queue_seconds", "Receipt to first scheduled, completed requests",
                               per_task, buckets=_LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("inlaid_time_to_first_token_seconds", "Receipt to the first generated token",
                                     per_task, buckets=_FIRST_TOKEN_BUCKETS, registry=registry)
        self.per_output_token = Histogram(
            "inlaid_time_per_output_token_seconds",
            "Per completed request with 2+ tokens: (last token - first token) / (tokens - 1)",
            per_task, buckets=_PER_TOKEN_BUCKETS, registry=registry)  # fmt: skip
        self.step_duration = Histogram("inlaid_step_duration_seconds", "Plan sent to result received, per step",
                                       buckets=_STEP_BUCKETS, registry=registry)
        self.batch_size = Histogram("inlaid_step_batch_size", "Sequences in a step (the running batch)",
                                    buckets=_BATCH_BUCKETS, registry=registry)
        self.step_tasks = Histogram("inlaid_step_tasks", "Distinct task adapters in a step (base rows not counted)",
                                    buckets=_TASK_BUCKETS, registry=registry)
        self.computed_tokens = Counter("inlaid_computed_tokens", "Tokens the executor computed (prefill + decode, "
                                       "recomputation after preemption included)", registry=registry)
        self.adapter_loads = Counter("inlaid_adapter_loads", "Adapters loaded into an executor slot",
                                     registry=registry)
        self.adapter_hits = Counter("inlaid_adapter_hits", "Admissions whose adapter was already in a slot",
                                    registry=registry)
        self.adapter_evictions = Counter("inlaid_adapter_evictions", "Loads that displaced another registered "
                                         "adapter from its slot", registry=registry)
        # Every family with a `task` label: a removed task's series go from each (forget_task).
        self._histograms = (self.duration, self.queue, self.first_token, self.per_output_token)
        self._per_task_families = (self.requests, self.prompt_tokens, self.generation_tokens,
                                   *(self._histograms if per_task_histograms else ()))
        self._per_task_histograms = per_task_histograms
        registry.register(_StateCollector(executors, registered_tasks, dict(server_info), scraped))

    # ------------------------------------------------------------------ hooks
    def on_admitted(self, request: ActiveRequest) -> None:
        self._task_series(request.task).prompt_tokens.inc(request.num_prompt_tokens)

    def on_rejected(self, task: str | None, code: str) -> None:
        # A refused request of a task that no longer accepts (removed, its last requests
        # draining) counts under __unknown__: under its name, the drain's end dropped the
        # count with the task's series (an outside probe: Prometheus lost 5 refusals that
        # `stats` kept).
        label = task if task is None or task in self._tasks else UNKNOWN_TASK_LABEL
        self.requests.labels(self._label(label), code).inc()

    def on_frame_refused(self, reason: str) -> None:
        """reason: a server-chosen code (never client text), so the label stays bounded."""
        self.frames_refused.labels(reason).inc()

    def on_step(self, plan: BatchPlan, result: StepResult, outputs: list[RequestOutput], executor: int = 0) -> None:
        """After `Engine.finish_step` of executor `executor`, before the outputs are
        delivered (first tokens are recognised by the requests' `first_token_at` still being unset)."""
        supervisor = self._executors[executor].supervisor
        timings = supervisor.timings if supervisor is not None else ()
        self.step_duration.observe(timings[-1].round_trip_seconds if timings else result.compute_seconds)
        self.batch_size.observe(len(plan.chunks))
        self.step_tasks.observe(len({chunk.adapter_slot for chunk in plan.chunks if chunk.adapter_slot >= 0}))
        self.computed_tokens.inc(result.num_tokens)
        self._count_adapter_slots(plan, executor)
        now = time.monotonic()
        generated: Tally[str | None] = Tally()
        for output in outputs:
            request = self._requests.get(output.request_id)
            if request is None or not output.new_token_ids:
                continue
            generated[request.task] += len(output.new_token_ids)
            if request.first_token_at is None:
                self._task_series(request.task).first_token.observe(now - request.received_at)
        for task, count in generated.items():
            self._task_series(task).generation_tokens.inc(count)

    def on_finished(self, request: ActiveRequest, outcome: str) -> None:
        """An admitted request ended: a finish reason, or the error code it failed with."""
        self.requests.labels(self._label(request.task), outcome).inc()
        if outcome not in COMPLETED:
            return
        now = time.monotonic()
        series = self._task_series(request.task)
        series.duration.observe(now - request.received_at)
        series.queue.observe((request.scheduled_at or now) - request.received_at)
        if request.first_token_at is not None and len(request.token_ids) >= 2:
            series.per_output_token.observe((now - request.first_token_at) / (len(request.token_ids) - 1))

    def forget_task(self, task: str) -> None:
        """Drop every series labelled with `task`, which the registry no longer holds (removed,
        its last request ended): nothing of it can be counted again, and a task added later
        under the name starts its series afresh, as Prometheus reads a counter reset. Per-task
        gauges would go here too: none exists (the collector's gauges are sums over tasks)."""
        if task in (BASE_TASK_LABEL, UNKNOWN_TASK_LABEL):  # never a registered name; theirs stay
            return
        self._series.pop(task, None)
        for family in self._per_task_families:
            family.remove_by_labels({"task": task})

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()

    # ------------------------------------------------------------------ internals
    def _label(self, task: str | None) -> str:
        if task is None:
            return BASE_TASK_LABEL
        # A task with a series was admitted while registered: it may be draining now.
        return task if task in self._tasks or task in self._series else UNKNOWN_TASK_LABEL

    def _task_series(self, task: str | None) -> _TaskSeries:
        """Only for admitted requests, whose task is registered (or draining)."""
        series = self._series.get(task)
        if series is None:
            key = BASE_TASK_LABEL if task is None else task
            histograms = ([family.labels(key) for family in self._histograms] if self._per_task_histograms
                          else self._histograms)
            series = self._series[task] = _TaskSeries(
                self.prompt_tokens.labels(key), self.generation_tokens.labels(key), *histograms)
        return series

    def _count_adapter_slots(self, plan: BatchPlan, executor: int) -> None:
        # A plan admits a sequence with a chunk starting at position 0 (a new sequence, or
        # one recomputed after preemption); each adapter load serves one such admission, the
        # other admissions of adapter rows found their adapter resident.
        admissions = sum(1 for chunk in plan.chunks if chunk.start_pos == 0 and chunk.adapter_slot >= 0)
        loads = plan.adapter_loads
        self.adapter_loads.inc(len(loads))
        self.adapter_hits.inc(max(0, admissions - len(loads)))
        view = self._executors[executor]
        restarts = view.supervisor.restarts if view.supervisor is not None else 0
        holders = self._slot_holder.setdefault(executor, {})
        if restarts != self._restarts_seen.get(executor, 0):  # a new executor starts with empty slots
            self._restarts_seen[executor] = restarts
            holders.clear()
        registered = view.engine.scheduler.adapters.paths
        for load in loads:
            previous = holders.get(load.slot)
            if previous is not None and previous != load.name and previous in registered:
                self.adapter_evictions.inc()
            holders[load.slot] = load.name


class _StateCollector(Collector):
    """Gauges read at scrape time from the engines and the supervisors (sums over executors)."""

    def __init__(
        self,
        executors: Sequence[ExecutorView],
        registered_tasks: Mapping[str, str],
        server_info: dict[str, str],
        scraped: Callable[[], Iterable[Metric]],
    ) -> None:
        self._executors = executors
        self._tasks = registered_tasks
        self._info = server_info
        self._scraped = scraped

    def collect(self) -> Iterator[Metric]:
        schedulers = [view.engine.scheduler for view in self._executors]
        supervisors = [view.supervisor for view in self._executors if view.supervisor is not None]
        reports = [supervisor.stats for supervisor in supervisors if supervisor.stats is not None]
        info = GaugeMetricFamily("inlaid_server_info", "Constant 1; the labels describe the server",
                                 labels=sorted(self._info))
        info.add_metric([self._info[key] for key in sorted(self._info)], 1)
        yield info
        yield _gauge("inlaid_requests_waiting", "Requests queued, not yet admitted to the running batch",
                     sum(len(s.waiting) for s in schedulers))
        yield _gauge("inlaid_requests_running", "Requests in the running batch", sum(len(s.running) for s in schedulers))
        yield _gauge("inlaid_kv_blocks_capacity", "KV-cache blocks", sum(s.blocks.num_blocks for s in schedulers))
        yield _gauge("inlaid_kv_blocks_used", "KV-cache blocks held by sequences",
                     sum(s.blocks.num_blocks - s.blocks.num_free_blocks for s in schedulers))
        yield _gauge("inlaid_adapter_slots_capacity", "Executor adapter slots",
                     sum(s.adapters.num_slots for s in schedulers))
        yield _gauge("inlaid_tasks", "Tasks accepting requests", len(self._tasks))
        yield _gauge("inlaid_executor_up", "Executors connected and ready",
                     sum(int(supervisor.ready.is_set()) for supervisor in supervisors))
        yield CounterMetricFamily("inlaid_executor_restarts", "Executor processes restarted after a loss",
                                  value=sum(supervisor.restarts for supervisor in supervisors))
        yield _gauge("inlaid_executor_step_running_seconds", "How long the longest current step on an executor has "
                     "run (0 between steps); the step timeout kills an executor at server.step_timeout_s",
                     max((view.step_running_seconds() for view in self._executors), default=0.0))
        yield _gauge("inlaid_executor_rss_bytes", "Executor resident memory (their last reports)",
                     sum(report.rss_bytes for report in reports))
        yield _gauge("inlaid_executor_device_memory_bytes", "CUDA memory the executors allocated (their last reports)",
                     sum(report.device_memory_allocated for report in reports))
        yield from self._scraped()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
