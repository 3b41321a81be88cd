"""The end-to-end suite's settings (bench/e2e.py): the four systems, the sweep's knobs with
the default, --full and --quick runs, and the workload trace a run replays."""

from __future__ import annotations

from dataclasses import dataclass, replace

from e2e_tasks import ADAPTERS


@dataclass(frozen=True)
class System:
    label: str
    title: str
    baseline: bool  # the transformers + PEFT server, else `inlaid serve`
    quantized: bool
    policy: str


SYSTEMS = (
    System("hf-peft", "transformers + PEFT", True, False, "fifo"),
    System("inlaid-fp32-fifo", "Inlaid fp32 + FIFO", False, False, "fifo"),
    System("inlaid-4bit-fifo", "Inlaid MLGPTQ 4-bit + FIFO", False, True, "fifo"),
    System("inlaid-4bit-inlaid", "Inlaid MLGPTQ 4-bit + inlaid policy", False, True, "inlaid"),
)


@dataclass(frozen=True)
class E2eSettings:
    task_counts: tuple[int, ...] = (9, 100)
    popularities: tuple[str, ...] = ("zipf",)  # FULL: both
    systems: tuple[str, ...] = tuple(s.label for s in SYSTEMS)
    rates: int = 3  # points of the sweep, geometric ...
    low_load: float = 0.5  # ... from this times the baseline's saturation throughput ...
    # ... to this times the fastest calibrated Inlaid system's. A burst's throughput is set by its
    # drain (the longest answer decoding alone at the end), so 1.5x of it left Inlaid short of
    # saturation at the top rate (p50 1.8-3.9 s there, near its isolated latency; 2026-12-03).
    high_load: float = 2.5
    # ... and at least this times the baseline's: a burst's drain varies ~2x from run to run
    # (0.56 vs 1.29 requests/s for the same 100-task burst on two runs of one code), and a slow
    # Inlaid burst alone would leave the sweep short of the rates the headline compares at.
    high_vs_baseline: float = 10.0
    duration_s: float = 16.0  # a replay's arrivals span about this long ...
    min_requests: int = 3  # ... with at least this many requests ...
    requests: int = 16  # ... and at most this many (the batch cap: a full batch can form)
    calibration_requests: int = 10
    max_tokens: int = 0  # a cap on each request's budget; 0 = the suite task's own
    threads: int = 1  # torch threads of every server (docs/serving.md, "CPU threads")
    max_num_seqs: int = 16  # batch cap of every server
    max_lora_slots: int = 16  # Inlaid's device slots (fewer than the tasks: adapters load on demand)
    device: str = "cpu"
    cv: float = 1.0
    perturbation: float = 0.05  # replicated adapters: each weight times (1 + this x N(0, 1))
    seed: int = 0
    num_kv_blocks: int = 512  # Inlaid's KV cache (x 16 tokens): room for every batch here, 1/4 of the default's memory
    # Quick runs on a machine without the suite's 4-bit base cached (a clean CI) quantize a
    # cheap one instead (2 calibration samples of 64 tokens a task, seconds) rather than the
    # real one (minutes); the report names the base it served.
    cheap_base_if_uncached: bool = False

    @property
    def dtype(self) -> str:
        return "float32" if self.device == "cpu" else "auto"

    def requests_at(self, rate: float) -> int:
        return int(min(self.requests, max(self.min_requests, round(rate * self.duration_s))))


# `make bench` runs the default (Zipf popularity, ~14 minutes); --full adds uniform popularity
# and two more requests at the light rate (~35-40 minutes), into its own folder.
FULL = E2eSettings(popularities=("zipf", "uniform"), min_requests=5, calibration_requests=12)
QUICK = E2eSettings(task_counts=(9,), popularities=("zipf",), rates=2, low_load=2.0, duration_s=4.0, min_requests=4,
                    requests=5, calibration_requests=3, max_tokens=8, cheap_base_if_uncached=True)


def make_trace(settings: E2eSettings, num_tasks: int, popularity: str, num_requests: int, seed: int):  # noqa: ANN201
    """A trace at 1 request/s (scaled to each rate) with the suite's eval requests. Every trace
    of a task count shares one task table (drawn with `settings.seed`): the servers load the
    adapters of that table (e2e.task_dirs), whatever seed draws a trace's requests."""
    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.scheduling.suite import load_suite_lengths
    from inlaid.scheduling.traces import Trace, TraceSpec, generate_trace

    ranks = {p.name: read_adapter_spec(p.name, p).rank for p in sorted(ADAPTERS.iterdir())
             if (p / "adapter_config.json").is_file()}
    records = [r for r in load_suite_lengths() if r.split == "eval"]

    def spec(requests: int, trace_seed: int) -> TraceSpec:
        return TraceSpec(rate=1.0, num_requests=requests, cv=settings.cv, num_tasks=num_tasks, popularity=popularity,
                         suite_task_names=num_tasks <= len(ranks), seed=trace_seed)

    table = generate_trace(spec(1, settings.seed), records, ranks).tasks
    trace = generate_trace(spec(num_requests, seed), records, ranks, tasks=table)
    if settings.max_tokens:
        cap = settings.max_tokens
        trace = Trace([replace(r, max_tokens=min(cap, r.max_tokens), output_tokens=min(cap, r.output_tokens))
                       for r in trace.requests], trace.tasks, trace.meta)
    return trace
