"""Workload traces: when requests arrive, for which task, how long their prompts and outputs are.

The field's conventions (S-LoRA, VTC, FastServe):

- arrivals: a Gamma renewal process with a given rate and coefficient of variation of the
  gaps (CV = 1 is Poisson; larger CV = burstier);
- task popularity: `uniform`, `zipf` (P(task i) ~ 1 / (i + 1)^alpha) or S-LoRA's `power`
  (task = floor(N * x), x ~ Power(alpha), i.e. density alpha * x^(alpha - 1) on [0, 1]);
- lengths: each task draws from one suite task's recorded requests (`suite.py`: real
  prompts, the adapter's real greedy output length, the task's budget), so 1,000 tasks
  mix the nine real length distributions (1-80 output tokens, 50-400 prompt tokens).

Traces save to and load from JSON lines (a header line, then one line per request).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inlaid.engine.config import MAX_LORA_RANK, check_range
from inlaid.scheduling.suite import SuiteRecord

POPULARITIES = ("uniform", "zipf", "power")
DEFAULT_RANKS = (8, 16, 32, 64)
# Token counts of a trace request: beyond any context a model has (the longest, ~10M). A
# request of 10^9 output tokens loaded, and its isolated latency looped 1e9 decode steps.
MAX_REQUEST_TOKENS = 1 << 24
# The burstiest arrivals drawn. Gamma gaps of shape 1 / CV^2 underflow to exactly 0 in
# float64 in 0.06 % of gaps at CV 10, 4 % at 15, 16 % at 20 and all at 1,000 (every arrival
# at 0.0); and the span of n gaps is Gamma(n / CV^2): a trace's rate is near the one asked
# only for n >= RATE_FAITHFUL_GAPS x CV^2 requests (300 at CV 10; at CV 100, 1,000 requests
# measured 1e12/s). Measured over 400 seeds: with n = 3 CV^2 the median rate is 6-15 %
# off the asked, with n = 2 CV^2 18-27 % (`max_faithful_cv`).
MAX_CV = 10.0
RATE_FAITHFUL_GAPS = 3.0
# The latest arrival a trace may hold (30 days): `--rate 1e-9` drew a 368-year trace and a
# loaded `"arrival_s": 1e300` was accepted; a replay of either sleeps until the sun goes out.
MAX_ARRIVAL_S = 30 * 24 * 3600.0
# The most tasks a trace may have: `bench/traces.py --tasks 1000000` took 21 s and 700 MB
# drawing a profile per task, far beyond the 1,000 tasks any experiment here uses.
MAX_TASKS = 100_000


@dataclass(frozen=True)
class TaskProfile:
    name: str
    family: str  # the suite task whose recorded requests it draws
    rank: int  # its adapter's LoRA rank


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    task: str | None  # adapter name; None = the base model
    prompt_tokens: int
    output_tokens: int  # what the request will generate (greedy, end-of-turn included)
    max_tokens: int  # the client's budget
    source: str = ""  # the suite record it replays


@dataclass(frozen=True)
class TraceSpec:
    rate: float  # requests per second
    num_requests: int
    cv: float = 1.0
    num_tasks: int = 9
    popularity: str = "uniform"
    alpha: float = 1.0
    base_fraction: float = 0.0  # requests without an adapter
    suite_task_names: bool = False  # name tasks after their suite task (needs num_tasks <= 9)
    seed: int = 0

    def validate(self) -> None:
        # NaN passes every comparison: finite first (a NaN rate wrote NaN arrival times)
        for name in ("rate", "cv", "alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.cv > MAX_CV:
            raise ValueError(f"cv must be <= {MAX_CV:g}, got {self.cv:g}: burstier Gamma gaps underflow to 0 in "
                             "float64 (arrivals pile up at one instant and the trace's rate is not the one asked)")
        check_range("seed", self.seed, 0, integer=True)  # numpy refuses a negative seed with a traceback
        if not 0 <= self.base_fraction <= 1:
            raise ValueError(f"base_fraction must be in [0, 1], got {self.base_fraction}")
        for name in ("num_requests", "num_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_tasks > MAX_TASKS:
            raise ValueError(f"num_tasks must be <= {MAX_TASKS}, got {self.num_tasks}")
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}, got {self.popularity!r}")
        if self.num_requests / self.rate > MAX_ARRIVAL_S:
            raise ValueError(f"rate {self.rate:g}/s with {self.num_requests} requests spans about "
                             f"{self.num_requests / self.rate:.3g} s, beyond the {MAX_ARRIVAL_S:g} s (30 days) a trace "
                             "may span: raise the rate or lower the requests")


def max_faithful_cv(num_requests: int) -> float:
    """The largest CV whose `num_requests` arrivals typically (the median draw) come within
    20 % of the rate asked: n / CV^2 >= RATE_FAITHFUL_GAPS; MAX_CV at most, and never below
    Poisson's 1 (a few Poisson arrivals miss the rate by plain counting noise, not a fault)."""
    return min(MAX_CV, max(1.0, math.sqrt(num_requests / RATE_FAITHFUL_GAPS)))


@dataclass
class Trace:
    requests: list[TraceRequest]
    tasks: dict[str, TaskProfile]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        header = {"meta": self.meta, "tasks": [asdict(t) for t in self.tasks.values()]}
        lines = [json.dumps(header)] + [json.dumps(asdict(r), separators=(",", ":")) for r in self.requests]
        Path(path).write_text("\n".join(lines) + "\n")

    @staticmethod
    def load(path: str | Path) -> "Trace":
        """The trace `save` wrote; ValueError naming the file and line for anything else
        (OSError when it cannot be read)."""
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:  # its own message named neither file nor line
            line = raw.count(b"\n", 0, error.start) + 1
            raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {raw[error.start]:#04x})") from None
        # (number, text) of each non-blank line: a blank line does not shift the numbers named
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not lines:
            raise ValueError(f"{path} is empty, not a trace")
        number, line = lines[0]
        try:
            header = _json_line(line)
            profiles = [TaskProfile(**t) for t in header["tasks"]]
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: line {number} is not a trace header ({type(error).__name__}: {error})") from None
        problem = _header_problem(header, profiles)
        if problem is not None:
            raise ValueError(f"{path}: line {number}: {problem}")
        tasks = {profile.name: profile for profile in profiles}
        requests: list[TraceRequest] = []
        for number, line in lines[1:]:
            try:
                request = TraceRequest(**_json_line(line))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}: line {number} is not a trace request ({error})") from None
            problem = _request_problem(request, tasks)
            if problem is None and requests and request.arrival_s < requests[-1].arrival_s:
                problem = "arrives before the request above it (a trace is in arrival order)"
            if problem is not None:
                raise ValueError(f"{path}: line {number}: {problem}")
            requests.append(request)
        if not requests:
            raise ValueError(f"{path} has a header but no requests")
        return Trace(requests, tasks, header.get("meta", {}))

    def scaled(self, rate_factor: float) -> "Trace":
        """The same requests arriving `rate_factor` times faster (a load sweep keeps the mix)."""
        if not (math.isfinite(rate_factor) and rate_factor > 0):
            raise ValueError(f"a trace is scaled by a finite factor > 0, got {rate_factor}")
        requests = [TraceRequest(r.arrival_s / rate_factor, r.task, r.prompt_tokens, r.output_tokens, r.max_tokens,
                                 r.source) for r in self.requests]
        meta = {**self.meta, "rate": self.meta.get("rate", 0) * rate_factor}
        return Trace(requests, self.tasks, meta)

    def summary(self) -> dict[str, Any]:
        requests = self.requests
        arrivals = np.asarray([r.arrival_s for r in requests])
        gaps = np.diff(arrivals) if len(arrivals) > 1 else np.zeros(1)
        counts = Counter(r.task for r in requests)
        ordered = sorted(counts.values(), reverse=True)
        top = max(1, math.ceil(0.1 * len(ordered)))
        prompts = np.asarray([r.prompt_tokens for r in requests])
        outputs = np.asarray([r.output_tokens for r in requests])
        families = Counter(self.tasks[r.task].family if r.task else "<base>" for r in requests)
        return {
            "requests": len(requests),
            "duration_s": float(arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0,
            "rate": float(len(requests) / arrivals[-1]) if arrivals[-1] > 0 else 0.0,
            "cv": float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else 0.0,
            "tasks": len(self.tasks),
            "tasks_used": len(counts),
            "top_task_share": ordered[0] / len(requests),
            "top_10pct_tasks_share": sum(ordered[:top]) / len(requests),
            "prompt_tokens": _stats(prompts),
            "output_tokens": _stats(outputs),
            "families": dict(sorted(families.items())),
        }


def _json_line(line: str) -> Any:
    """One line's JSON; nesting too deep for the parser (100,000 `[`) is a ValueError like any
    other malformed line, not a RecursionError traceback."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _header_problem(header: Any, profiles: list[TaskProfile]) -> str | None:
    """What makes a loaded header unusable, or None (each found by an outside probe)."""
    if not isinstance(header.get("meta", {}), dict):  # a list crashed Trace.scaled later
        return f"meta must be a JSON object, got {type(header['meta']).__name__}"
    seen: set[str] = set()
    for profile in profiles:
        if not isinstance(profile.name, str) or not profile.name:
            return f"a task name must be a non-empty string, got {profile.name!r}"
        if profile.name in seen:  # the last one silently won
            return f"task {profile.name!r} is listed twice"
        seen.add(profile.name)
        # The task whose recorded requests it draws: any name of the records it was drawn from
        # (a lengths file of one's own has its own), so only its form is checked.
        if not isinstance(profile.family, str) or not profile.family:
            return f"task {profile.name!r} has family {profile.family!r}: it must be a task name (a non-empty string)"
        try:
            check_range("rank", profile.rank, 1, MAX_LORA_RANK, integer=True)
        except ValueError as error:
            return f"task {profile.name!r}: {error}"
    return None


def _request_problem(request: TraceRequest, tasks: Mapping[str, TaskProfile]) -> str | None:
    """What makes a loaded request unplayable, or None."""
    try:
        check_range("arrival_s", request.arrival_s, 0, MAX_ARRIVAL_S, what="seconds, 30 days at most")
        for name in ("prompt_tokens", "output_tokens", "max_tokens"):
            # Beyond any context: such a length only costs time (and isolated latency is
            # computed up to the context the simulation caps it at anyway).
            check_range(name, getattr(request, name), 1, MAX_REQUEST_TOKENS, integer=True)
    except ValueError as error:
        return str(error)
    if request.output_tokens > request.max_tokens:
        return f"output_tokens {request.output_tokens} exceeds max_tokens {request.max_tokens}"
    if request.task is not None and (not isinstance(request.task, str) or request.task not in tasks):
        return f"request of unknown task {request.task!r}"
    if not isinstance(request.source, str):
        return f"source must be a string (a suite record id), got {request.source!r}"
    return None


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "max": float(values.max())}


def _draw_tasks(spec: TraceSpec, families: list[str], ranks: Mapping[str, int] | None,
                rng: np.random.Generator) -> dict[str, TaskProfile]:
    """Each task's suite family (the families in a shuffled cycle) and adapter rank."""
    shuffled = list(rng.permutation(families))
    tasks: dict[str, TaskProfile] = {}
    for index in range(spec.num_tasks):
        family = str(shuffled[index % len(shuffled)])
        name = family if spec.suite_task_names else f"task-{index:04d}"
        rank = (ranks or {}).get(name, (ranks or {}).get(family, int(rng.choice(DEFAULT_RANKS))))
        tasks[name] = TaskProfile(name, family, int(rank))
    return tasks


def popularity_weights(num_tasks: int, popularity: str, alpha: float) -> np.ndarray:
    """P(task i) for i in 0..num_tasks-1."""
    if popularity == "uniform":
        weights = np.ones(num_tasks)
    elif popularity == "zipf":
        weights = 1.0 / np.arange(1, num_tasks + 1) ** alpha
    else:  # S-LoRA: floor(N * x), x ~ Power(alpha): P(i) = ((i+1)/N)^alpha - (i/N)^alpha
        edges = (np.arange(num_tasks + 1) / num_tasks) ** alpha
        weights = np.diff(edges)
    return weights / weights.sum()


def generate_trace(spec: TraceSpec, records: Sequence[SuiteRecord], ranks: Mapping[str, int] | None = None,
                   tasks: Mapping[str, TaskProfile] | None = None) -> Trace:
    """Draw a trace; `ranks` gives adapter ranks by task or family (else drawn from 8-64).
    `tasks`: the task table of an earlier trace, kept (each task the same suite family and
    rank), for traces of one set of served adapters: drawn anew, each seed gave a task name
    another family, and a server loaded for one trace answered another's prompts with
    another family's adapter."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    by_family: dict[str, list[SuiteRecord]] = {}
    for record in records:
        by_family.setdefault(record.task, []).append(record)
    families = sorted(by_family)
    if not families:
        raise ValueError("no suite records to draw lengths from")
    if spec.suite_task_names and spec.num_tasks > len(families):
        raise ValueError(f"suite_task_names needs num_tasks <= {len(families)} (one task per suite task), "
                         f"got {spec.num_tasks}")
    drawn = _draw_tasks(spec, families, ranks, rng)  # also with a table: the draws after it stay the seed's
    if tasks is not None:
        if len(tasks) != spec.num_tasks or any(t.family not in by_family for t in tasks.values()):
            raise ValueError(f"the task table holds {len(tasks)} tasks of families "
                             f"{sorted({t.family for t in tasks.values()})}; the trace asks {spec.num_tasks} tasks "
                             f"of the records' families {families}")
        tasks = dict(tasks)
    else:
        tasks = drawn
    names = list(tasks)
    shape = 1.0 / spec.cv**2  # Gamma gaps: mean 1/rate, CV = 1/sqrt(shape)
    arrivals = np.cumsum(rng.gamma(shape, 1.0 / (spec.rate * shape), size=spec.num_requests))
    if arrivals[-1] > MAX_ARRIVAL_S:
        raise ValueError(f"rate {spec.rate:g}/s with {spec.num_requests} requests spans {arrivals[-1]:.3g} s, beyond "
                         f"the {MAX_ARRIVAL_S:g} s (30 days) a trace may span: raise the rate or lower the requests")
    if spec.popularity == "power":
        chosen = np.minimum((spec.num_tasks * rng.power(spec.alpha, size=spec.num_requests)).astype(int), spec.num_tasks - 1)
    else:
        chosen = rng.choice(spec.num_tasks, size=spec.num_requests, p=popularity_weights(spec.num_tasks, spec.popularity, spec.alpha))
    is_base = rng.random(spec.num_requests) < spec.base_fraction
    requests = []
    for arrival, task_index, base in zip(arrivals, chosen, is_base):
        profile = tasks[names[task_index]]
        pool = by_family[profile.family]
        record = pool[int(rng.integers(len(pool)))]
        # A base-model request replays an adapter's record: its length is the adapter's, so its
        # budget is that length too. With the record's budget the real server's base model
        # ran on to it (8-80 tokens where the simulator counted 2-35), unlike the simulation.
        budget = record.output_tokens if base else record.max_tokens
        requests.append(TraceRequest(float(arrival), None if base else profile.name, record.prompt_tokens,
                                     record.output_tokens, budget, record.record_id))
    return Trace(requests, tasks, {**asdict(spec)})
