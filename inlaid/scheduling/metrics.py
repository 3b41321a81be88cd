"""Serving metrics from per-request and per-step records (simulated or measured alike).

A `RequestRecord` is what a client (or the simulator) sees of one request: arrival,
first scheduled, every token's time, finish. A `StepRecord` is one executor step. From
them `summarize` computes throughput, latency / first-token latency / time per output
token (mean, p50, p99), job completion time per task, SLO attainment (latency within a
multiple of the request's isolated latency, and S-LoRA's absolute first-token SLO), the
longest wait before a request was first scheduled and the longest stall between two of
its tokens (starvation shows here), tasks touched per step, adapter loads per second, and
the VTC fairness figure (`ServiceGapMeter`): the largest gap in service (input + 2 x
output tokens) between two backlogged tasks, with VTC's lift for tasks that return.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SLO_SCALES = (2.0, 5.0, 10.0, 20.0)
DEFAULT_TTFT_SLO_S = 5.0


@dataclass
class RequestRecord:
    request_id: str
    task: str | None
    prompt_tokens: int
    arrival_s: float
    admitted_s: float | None = None  # first scheduled
    token_times: list[float] = field(default_factory=list)
    finish_s: float | None = None
    isolated_s: float | None = None  # latency alone on the server (the SLO's unit); None: not known (a replay)
    preemptions: int | None = None  # times paused for KV room; None: not known (a replay sees no pauses)
    error: str = ""
    token_ids: list[int] = field(default_factory=list)  # what the server answered (replay); empty in simulations

    @property
    def finished(self) -> bool:
        return self.finish_s is not None and not self.error

    @property
    def latency_s(self) -> float:
        assert self.finish_s is not None
        return self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def wait_s(self) -> float:
        return (self.admitted_s if self.admitted_s is not None else self.token_times[0]) - self.arrival_s

    @property
    def max_stall_s(self) -> float:
        """Longest time between two consecutive tokens."""
        if len(self.token_times) < 2:
            return 0.0
        return float(np.max(np.diff(self.token_times)))


@dataclass
class StepRecord:
    start_s: float
    seconds: float
    num_seqs: int
    num_tokens: int
    adapters: int  # distinct adapters computed
    loads: int  # adapters loaded into a slot before it


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p99": float(np.percentile(array, 99)), "max": float(array.max())}


def summarize(
    requests: Sequence[RequestRecord],
    steps: Sequence[StepRecord] = (),
    slo_scales: Iterable[float] = DEFAULT_SLO_SCALES,
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S,
    warmup_fraction: float = 0.0,
    service_gap: float | None = None,
) -> dict[str, Any]:
    """Every metric of one run. `warmup_fraction`: leave the first arrivals out of the
    latency figures (the queue starts empty); throughput uses every request.
    `service_gap`: the run's `ServiceGapMeter.worst` (the simulator measures it)."""
    done = [r for r in requests if r.finished and r.token_times]
    ordered = sorted(done, key=lambda r: r.arrival_s)
    measured = ordered[int(len(ordered) * warmup_fraction):]
    # Requests that failed (an error, a timeout, a lost connection) after the warm-up: misses
    # in the attainment figures. Left out, the worst requests of a replay vanished from them
    # (9 answered in 1.1 s and one timed out read 100 % first tokens within the SLO).
    window_start = measured[0].arrival_s if measured else -math.inf
    failed_measured = sum(1 for r in requests if not (r.finished and r.token_times) and r.arrival_s >= window_start)
    start = min((r.arrival_s for r in requests), default=0.0)
    end = max((r.finish_s for r in done if r.finish_s is not None), default=start)
    span = max(end - start, 1e-9)
    output_tokens = sum(len(r.token_times) for r in done)
    summary: dict[str, Any] = {
        "requests": len(requests),
        "finished": len(done),
        "failed": len(requests) - len(done),
        "makespan_s": span,
        "throughput_rps": len(done) / span,
        "throughput_tokens_s": output_tokens / span,
        "latency_s": _percentiles([r.latency_s for r in measured]),
        "ttft_s": _percentiles([r.ttft_s for r in measured]),
        "tpot_s": _percentiles([t for r in measured if (t := r.tpot_s) is not None]),
        "normalized_latency": _percentiles([r.latency_s / r.isolated_s for r in measured if _known(r.isolated_s)]),
        "max_wait_s": max((r.wait_s for r in done), default=0.0),
        "max_stall_s": max((r.max_stall_s for r in done), default=0.0),
        # null for a replay: it summed the records' default 0, as if none had been paused
        "preemptions": None if any(r.preemptions is None for r in requests) else sum(
            r.preemptions for r in requests if r.preemptions is not None),
        # Over the requests whose isolated latency is known only: a replay knows none,
        # and counting those as misses reported 0 % attainment (NaN now: not measured).
        "slo_attainment": {
            f"{scale:g}x": _share([r.latency_s <= scale * r.isolated_s for r in measured if _known(r.isolated_s)],
                                  failed_measured if any(_known(r.isolated_s) for r in measured) else 0)
            for scale in slo_scales
        },
        "ttft_slo_attainment": _share([r.ttft_s <= ttft_slo_s for r in measured], failed_measured),
        "ttft_slo_s": ttft_slo_s,
        "jct_by_task": _jct_by_task(measured),
        "fairness_max_service_gap": math.nan if service_gap is None else service_gap,
    }
    if steps:
        adapters = [s.adapters for s in steps]
        busy = sum(s.seconds for s in steps)
        summary.update(
            steps=len(steps),
            busy_fraction=busy / span,
            mean_batch_seqs=float(np.mean([s.num_seqs for s in steps])),
            tasks_per_step={"mean": float(np.mean(adapters)), "p99": float(np.percentile(adapters, 99)),
                            "max": int(max(adapters))},
            adapter_loads_per_s=sum(s.loads for s in steps) / span,
        )
    else:  # a replay sees no steps: not measured (null), not missing (the server's /metrics has them)
        summary.update(steps=None, busy_fraction=None, mean_batch_seqs=None, tasks_per_step=None,
                       adapter_loads_per_s=None)
    return summary


def json_safe(value: Any) -> Any:
    """`value` (a summary) with every NaN or infinity, a figure that could not be computed,
    as None: JSON has no NaN (`json.dumps(..., allow_nan=False)` then holds)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _known(isolated_s: float | None) -> bool:
    # None: not known (a replay); 0.0 meant the same in records written before 2026-12-05
    return isolated_s is not None and isolated_s > 0


def _share(flags: list[bool], misses: int = 0) -> float:
    return sum(flags) / (len(flags) + misses) if flags or misses else math.nan


def _jct_by_task(requests: Sequence[RequestRecord]) -> dict[str, float]:
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        by_task["<base>" if r.task is None else r.task].append(r.latency_s)
    return {task: float(np.mean(values)) for task, values in sorted(by_task.items())}


class ServiceGapMeter:
    """VTC's fairness figure, measured step by step: the largest difference of service
    (input + 2 x output tokens) between two backlogged tasks, read at most once per
    `sample_every_s` of simulated time (the simulator's 1 s: a gap that opens and closes
    within it can be missed; 0 reads every step).

    A task is backlogged while one of its unfinished requests was not computed in a step
    (queued, or paused by the scheduler): VTC's definition, with pauses counted as waits.
    A prompt is charged when its request is first computed, each token when sampled. A
    task that becomes backlogged again is lifted to the least counter of the backlogged
    tasks (or of the last task that left the backlog), as VTC does. Only the simulator
    sees every step; a client cannot see pauses."""

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0, sample_every_s: float = 1.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.sample_every_s = sample_every_s
        self.counters: dict[str, float] = defaultdict(float)
        self._backlogged: set[str] = set()
        self._last_left: str | None = None
        self._next_sample = -math.inf
        self.worst = 0.0

    def step(self, now: float, backlogged: set[str], prompts: dict[str, int], tokens: dict[str, int]) -> None:
        """After a step: tasks with a request left out of it; prompt tokens first computed
        and tokens sampled in it, per task."""
        for task, count in prompts.items():
            self.counters[task] += self.input_weight * count
        for task, count in tokens.items():
            self.counters[task] += self.output_weight * count
        for task in backlogged - self._backlogged:
            staying = self._backlogged & backlogged
            if staying:
                floor = min(self.counters[t] for t in staying)
            elif self._last_left is not None:
                floor = self.counters[self._last_left]
            else:
                continue
            self.counters[task] = max(self.counters[task], floor)
        left = self._backlogged - backlogged
        if left:
            self._last_left = max(left, key=lambda t: self.counters[t])
        self._backlogged = set(backlogged)
        if now >= self._next_sample and len(backlogged) > 1:
            values = [self.counters[t] for t in backlogged]
            self.worst = max(self.worst, max(values) - min(values))
            self._next_sample = now + self.sample_every_s


def save_records(path: str | Path, records: Iterable[RequestRecord]) -> None:
    """One JSON line per request (the replay client's and the simulator's common format)."""
    Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def load_records(path: str | Path) -> list[RequestRecord]:
    return [RequestRecord(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
