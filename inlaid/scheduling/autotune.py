"""Choose the `inlaid` policy's options for the machine that serves, from its step-cost model.

The policy's defaults were tuned on one executor's step costs; on an executor whose costs
balance differently (a larger fixed part per step, cheaper adapters, dearer loads) other
options win (docs/scheduling.md, "Tuning on the serving machine"). Given that machine's
fitted cost model (`bench/sched_cost.py`, a `StepCostModel` JSON), this runs the simulator
(the same scheduler and policy code the server runs) on a few synthetic workloads shaped
like the server (its task count and adapter slots; prompt and output lengths drawn from the
task suite's recorded requests, on the base the server serves: `suite.lengths_file_for`;
Poisson and bursty arrivals, uniform and Zipf popularity),
at `load` x FIFO's saturation on each, with FIFO and every candidate option set, and picks:

    among the candidates that win the SLO target (attainment >= 2x FIFO's, or FIFO already
    above 50 %) and keep p99 first-token latency at most FIFO's in as many workloads as the
    defaults do, the one with the lowest geometric mean of mean-JCT / FIFO's mean JCT
    (the defaults are always eligible, so the choice never trades those wins for JCT).

The server does this at start-up when `[scheduler] autotune_cost_model` names the file;
`inlaid tune-scheduler` prints the same table without starting a server. Options the
config sets explicitly are kept and apply to every candidate.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inlaid.scheduling.cost_model import StepCostModel
from inlaid.scheduling.simulator import EngineShape
from inlaid.scheduling.srtf import CUDA_DEFAULTS

# A candidate's option with this value is the cost model's own figure (`resolved_options`).
RESOURCE_COST = "resource cost"
# label -> the inlaid policy's options (the rest: its defaults). bench/sched_tune.py sweeps
# the same sets over the simulator's twelve configurations.
CANDIDATES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "beta 16, no row target": {"max_adapters_per_step": 16, "batch_rows_target": 0},
    "first tokens after 30 s": {"first_token_after_s": 30.0},
    "first tokens after 3 s": {"first_token_after_s": 3.0},
    "prefill <= 512 tokens a step": {"max_prefill_tokens_per_step": 512},
    "beta 16, no row target, first tokens after 30 s": {"max_adapters_per_step": 16, "batch_rows_target": 0,
                                                        "first_token_after_s": 30.0},
    "beta 16, row target 32, first tokens after 30 s": {"max_adapters_per_step": 16, "batch_rows_target": 32,
                                                        "first_token_after_s": 30.0},
    "prompt tokens at their resource cost": {"prefill_weight": RESOURCE_COST},
    # The GPU defaults (a GPU's flat step cost); the prompt token's weight comes from the cost model, as for all.
    "no adapter bound, no row target, first tokens at once": {k: v for k, v in CUDA_DEFAULTS.items()
                                                              if k != "prefill_weight"},
}
SLO = "10x"  # latency within 10x the request's isolated latency
WORKLOADS = ((1.0, "uniform"), (1.0, "zipf"), (4.0, "uniform"), (4.0, "zipf"))  # (arrival CV, popularity)
SEED = 7
# Fewer requests a workload rank the candidates on noise (and the warm-up share leaves none).
MIN_TUNING_REQUESTS = 10
MIN_STEP_S = 1e-6  # the shortest decode step a cost model may predict
# The most tasks a tuning simulates: far past any server's adapters. Each task is an object
# and a popularity weight per workload; `--tasks 99999999` was accepted (an outside probe).
MAX_TUNING_TASKS = 100_000
# The most requests a workload: each is held in memory and simulated once per candidate (200
# take ~40 s in all on 2 cores), so a bound is named up front rather than left to the memory.
MAX_TUNING_REQUESTS = 100_000


def load_cost_model(path: str, max_num_seqs: int = 64) -> StepCostModel:
    """The cost model at `path`, checked usable: a decode step of 1 and of `max_num_seqs`
    rows must take positive time (the simulator's clock must move forward). ValueError
    says what is wrong."""
    from inlaid.scheduling.cost_model import ChunkShape, StepFeatures, UnusableCostModelError

    try:
        cost = StepCostModel.load(path)
    except UnusableCostModelError:
        raise  # names the file and the coefficients (StepCostModel checks them for every user)
    except FileNotFoundError:
        raise ValueError(f"cost model file not found: {path!r} (bench/sched_cost.py writes one)") from None
    except KeyError as error:  # its bare words ("'coefficients'") named no field
        raise ValueError(f"{path!r} is not a cost model written by bench/sched_cost.py: it has no field {error}") \
            from None
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path!r} is not a cost model written by bench/sched_cost.py: {error}") from None
    for rows in (1, max_num_seqs):
        step = StepFeatures.of_chunks([ChunkShape(1, 100, index % 4, 16, True) for index in range(rows)], 0, 16)
        # No executor steps in under a microsecond; a model that says so makes the simulated
        # saturation rate overflow.
        if not cost.step_seconds(step) >= MIN_STEP_S:
            raise ValueError(f"{path!r} gives a decode step of {rows} rows {cost.step_seconds(step)} s "
                             f"(under {MIN_STEP_S} s): not a usable cost model")
    return cost


def resolved_options(options: Mapping[str, Any], cost: StepCostModel, shape: EngineShape) -> dict[str, Any]:
    """A candidate's options as the policy takes them, on this cost model: `prefill_weight`
    the cost model's step-time ratio (`experiment.prefill_weight`, what every simulated
    variant gets by default) or, where the candidate says RESOURCE_COST, its per-row ratio
    (`experiment.prefill_weight_at_resource_cost`). The server then runs exactly what was
    simulated."""
    from inlaid.scheduling.experiment import prefill_weight, prefill_weight_at_resource_cost

    resolved = {"prefill_weight": prefill_weight(cost, shape), **options}
    if resolved["prefill_weight"] == RESOURCE_COST:
        resolved["prefill_weight"] = prefill_weight_at_resource_cost(cost, shape)
    resolved["prefill_weight"] = float(f"{float(resolved['prefill_weight']):.6g}")  # readable in logs, never 0
    return resolved


def slo_target_out_of_reach(fifo_attainment: float) -> bool:
    """2x FIFO's SLO attainment is over 100 %: no policy can meet that target."""
    return fifo_attainment > 0.5


class TuningAbandoned(BaseException):
    """The tuning was given up (the server stops while it tunes at start-up). A BaseException,
    as asyncio's CancelledError is: the `except Exception` that keeps a *failed* tuning from
    stopping the server must not turn an abandoned one into "failed, start with the
    configured options" (a log line and policies made for a server that is going away)."""


# Set in the thread a tuning runs in by whoever may abandon it (StartupTuning in
# inlaid/serve/retuning.py); checked before every simulation, so a set event ends the tuning
# within one simulation (about a second) instead of its whole run.
abandon_tuning: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("abandon_tuning",
                                                                                       default=None)


@dataclass(frozen=True)
class CandidateScore:
    """One option set against FIFO over the workloads."""

    label: str
    options: dict[str, Any]
    jct_geomean: float  # geometric mean over workloads of mean JCT / FIFO's
    jct_best: float
    jct_worst: float
    jct_at_most_fifo: int  # workloads where mean JCT <= FIFO's
    slo_2x_or_out_of_reach: int
    p99_ttft_at_most_fifo: int
    max_wait_s: float
    workloads: int


@dataclass
class TuningResult:
    chosen: CandidateScore
    scores: list[CandidateScore]
    runs: list[dict[str, Any]] = field(default_factory=list)  # every simulation's figures
    seconds: float = 0.0
    cost_model: str = ""

    def table(self) -> str:
        """The scores as a markdown table, the chosen set marked."""
        lines = ["| option set | mean JCT / FIFO: geo. mean (best - worst) | JCT <= FIFO | SLO >= 2x FIFO or out of "
                 "reach | p99 TTFT <= FIFO | longest wait s |", "|---|---|---|---|---|---|"]
        for score in self.scores:
            mark = " **(chosen)**" if score is self.chosen else ""
            n = score.workloads
            lines.append(f"| {score.label}{mark} | {score.jct_geomean:.2f}x ({score.jct_best:.2f} - {score.jct_worst:.2f}) "
                         f"| {score.jct_at_most_fifo} / {n} | {score.slo_2x_or_out_of_reach} / {n} | "
                         f"{score.p99_ttft_at_most_fifo} / {n} | {score.max_wait_s:.0f} |")
        return "\n".join(lines)


def score_candidates(runs: Sequence[Mapping[str, Any]], candidates: Mapping[str, Mapping[str, Any]],
                     key: Callable[[Mapping[str, Any]], Any]) -> list[CandidateScore]:
    """Per candidate, its figures against FIFO's run on the same workload. `runs` hold
    label, mean_jct_s, slo, p99_ttft_s, max_wait_s; `key` says which workload a run is."""
    fifo = {key(r): r for r in runs if r["label"] == "fifo"}
    scores = []
    for label, options in candidates.items():
        pairs = [(r, fifo[key(r)]) for r in runs if r["label"] == label]
        if not pairs:
            raise ValueError(f"no runs of candidate {label!r}")
        ratios = [r["mean_jct_s"] / reference["mean_jct_s"] for r, reference in pairs]
        scores.append(CandidateScore(
            label=label, options=dict(options),
            jct_geomean=math.exp(sum(map(math.log, ratios)) / len(ratios)), jct_best=min(ratios), jct_worst=max(ratios),
            jct_at_most_fifo=sum(ratio <= 1.0 for ratio in ratios),
            slo_2x_or_out_of_reach=sum(r["slo"] >= 2 * reference["slo"] or slo_target_out_of_reach(reference["slo"])
                                       for r, reference in pairs),
            p99_ttft_at_most_fifo=sum(r["p99_ttft_s"] <= reference["p99_ttft_s"] for r, reference in pairs),
            max_wait_s=max(r["max_wait_s"] for r, _ in pairs), workloads=len(pairs)))
    return scores


# Options of the server's length predictor the tuning's simulations leave out (the server keeps them).
SERVER_LEARNING_OPTIONS = ("predictor_state", "predictor_refit_every")


def explain_choice(result: TuningResult, baseline: str = "defaults") -> list[str]:
    """Why the chosen set: the rule with the defaults' counts, and each set with a lower mean
    JCT left out, with what it lost (a user saw the chosen set at 1.09x beside two at 0.99x)."""
    reference = next(score for score in result.scores if score.label == baseline)
    n = reference.workloads
    lines = [f"why: the lowest mean JCT among the sets that win the SLO target in at least the defaults' "
             f"{reference.slo_2x_or_out_of_reach} of {n} workloads and keep p99 TTFT at most FIFO's in at least "
             f"their {reference.p99_ttft_at_most_fifo} of {n}"]
    for score in sorted(result.scores, key=lambda score: score.jct_geomean):
        if score.jct_geomean >= result.chosen.jct_geomean:
            break
        lost = []
        if score.slo_2x_or_out_of_reach < reference.slo_2x_or_out_of_reach:
            lost.append(f"SLO {score.slo_2x_or_out_of_reach}/{n}")
        if score.p99_ttft_at_most_fifo < reference.p99_ttft_at_most_fifo:
            lost.append(f"p99 TTFT {score.p99_ttft_at_most_fifo}/{n}")
        lines.append(f"  left out: {score.label} ({score.jct_geomean:.2f}x mean JCT, but {' and '.join(lost)})")
    return lines


def choose(scores: Sequence[CandidateScore], baseline: str = "defaults") -> CandidateScore:
    """The rule in the module docstring; `baseline` names the always-eligible set."""
    reference = next(score for score in scores if score.label == baseline)
    eligible = [score for score in scores if score.slo_2x_or_out_of_reach >= reference.slo_2x_or_out_of_reach
                and score.p99_ttft_at_most_fifo >= reference.p99_ttft_at_most_fifo]
    return min(eligible, key=lambda score: (score.jct_geomean, score.label != baseline))


def tuning_input_problem(num_tasks: int, requests: int, load: float) -> str | None:
    """The first tuning input out of range, named (one message for all three left the
    caller guessing which), or None."""
    if not 1 <= num_tasks <= MAX_TUNING_TASKS:
        return f"tuning needs 1 <= num_tasks <= {MAX_TUNING_TASKS}, got {num_tasks}"
    if not MIN_TUNING_REQUESTS <= requests <= MAX_TUNING_REQUESTS:
        return f"tuning needs {MIN_TUNING_REQUESTS} <= requests <= {MAX_TUNING_REQUESTS} a workload, got {requests}"
    if not 0 < load <= 1:
        return f"tuning needs 0 < load <= 1, got {load}"
    return None


def servable_records(records: Sequence[Any], shape: EngineShape, path: str | Path) -> list[Any]:
    """The workload records (`SuiteRecord`s) whose prompt leaves room in the server's context;
    the others are left out, said in one warning (the server refuses each such request). A
    tuning on them ran 3 minutes and ranked every option 1.00x, the defaults "chosen", without
    a word (an outside probe). ValueError when none is left: nothing could be tuned on."""
    context = shape.context_length
    servable = [record for record in records if record.prompt_tokens < context]
    if len(servable) == len(records):
        return servable
    first = next(record for record in records if record.prompt_tokens >= context)
    refused = (f"{path}: {len(records) - len(servable)} of {len(records)} 'eval' records have a prompt with no room "
               f"in the context length {context} (max_model_len, capped by the KV cache), which the server "
               f"refuses; first: {first.record_id!r}, {first.prompt_tokens} prompt tokens")
    if not servable:
        raise ValueError(f"{refused}. Tune on lengths the server can serve")
    logging.getLogger("inlaid.scheduling").warning("%s: the tuning leaves them out", refused)
    return servable


def tune_inlaid_options(
    cost: StepCostModel,
    shape: EngineShape,
    num_tasks: int,
    explicit_options: Mapping[str, Any] | None = None,
    requests: int = 300,
    load: float = 0.8,
    candidates: Mapping[str, Mapping[str, Any]] | None = None,
    workloads: Sequence[tuple[float, str]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    lengths_file: str | Path | None = None,
) -> TuningResult:
    """Simulate FIFO and every candidate (default CANDIDATES, with `explicit_options` on top
    of each) on the workloads (default WORKLOADS) at `load` x FIFO's saturation;
    `progress(done, total)` after each simulation. `lengths_file`: the recorded requests
    the workloads draw from (`suite.load_suite_lengths`'s format; default: the fp32 model's)."""
    from inlaid.scheduling.experiment import PolicyVariant, make_variant
    from inlaid.scheduling.metrics import summarize
    from inlaid.scheduling.registry import COMMON_OPTIONS
    from inlaid.scheduling.simulator import simulate, synthetic_prompt
    from inlaid.scheduling.suite import SUITE_LENGTHS_FILE, load_tuning_records
    from inlaid.scheduling.traces import TraceRequest, TraceSpec, generate_trace

    problem = tuning_input_problem(num_tasks, requests, load)
    if problem:
        raise ValueError(problem)
    candidates = CANDIDATES if candidates is None else candidates
    workloads = WORKLOADS if workloads is None else workloads
    if "defaults" not in candidates:
        raise ValueError("the candidates must include 'defaults' (the always-eligible set)")
    # The step log records the server's steps, not the simulations'. The predictor's state
    # file and refit cadence are the server's learning, not ranking: a simulation refits
    # inline (the server in the background), so predictor_refit_every = 4 made the tuning
    # refit every 4 finished requests of every run (over 150 s instead of 15 s, an outside probe).
    explicit = {key: value for key, value in (explicit_options or {}).items()
                if key not in COMMON_OPTIONS and key not in SERVER_LEARNING_OPTIONS}
    records = load_tuning_records(lengths_file or SUITE_LENGTHS_FILE)
    held_out = servable_records([r for r in records if r.split == "eval"], shape, lengths_file or SUITE_LENGTHS_FILE)
    # What the predictor knows at start: the suite's calib split, prompts as stand-in ids of
    # their recorded length (the simulator replays the workloads' prompts the same way).
    history = [(r.task, synthetic_prompt(TraceRequest(0.0, r.task, r.prompt_tokens, r.output_tokens, r.max_tokens,
                                                      r.record_id)), r.output_tokens)
               for r in records if r.split == "calib"]
    candidates = {label: resolved_options(options, cost, shape) for label, options in candidates.items()}
    variants = [PolicyVariant("fifo", "fifo")] + [PolicyVariant(label, "inlaid", {**options, **explicit})
                                                 for label, options in candidates.items()]
    total, done, started = len(workloads) * (1 + len(variants)), 0, time.perf_counter()

    abandon = abandon_tuning.get()

    def run(variant: PolicyVariant, trace: Any) -> dict[str, Any]:
        nonlocal done
        if abandon is not None and abandon.is_set():
            raise TuningAbandoned
        policy = make_variant(variant, cost, shape, history, trace)
        result = simulate(trace, policy, cost, shape)
        summary = summarize(result.requests, result.steps, warmup_fraction=0.05, service_gap=result.service_gap)
        done += 1
        if progress is not None:
            progress(done, total)
        return {"label": variant.label, "mean_jct_s": summary["latency_s"]["mean"], "slo": summary["slo_attainment"][SLO],
                "p99_ttft_s": summary["ttft_s"]["p99"], "max_wait_s": summary["max_wait_s"],
                "throughput_rps": summary["throughput_rps"]}

    runs = []
    for cv, popularity in workloads:
        spec = TraceSpec(rate=1.0, num_requests=requests, cv=cv, num_tasks=num_tasks, popularity=popularity, seed=SEED)
        trace = generate_trace(spec, held_out)
        capacity = run(variants[0], trace.scaled(1000.0))["throughput_rps"]
        at_load = trace.scaled(load * capacity)
        runs += [{**run(variant, at_load), "cv": cv, "popularity": popularity} for variant in variants]
    scores = score_candidates(runs, candidates, key=lambda r: (r["cv"], r["popularity"]))
    return TuningResult(chosen=choose(scores), scores=scores, runs=runs, seconds=time.perf_counter() - started,
                        cost_model=cost.description)


def tuned_options(
    cost_model_path: str,
    shape: EngineShape,
    num_tasks: int,
    explicit_options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    requests: int = 200,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    lengths_file: str | Path | None = None,
) -> tuple[dict[str, Any], TuningResult | None]:
    """The `[scheduler]` options a server starts with: the chosen candidate's, then the
    explicit ones over them. With `cache_dir`, a tuning of the same cost model, shape, task
    count, explicit options and recorded lengths (`lengths_file`: tune_inlaid_options's) is
    read back instead of simulated again (restarts are instant); the result is then None.
    `progress`: tune_inlaid_options's (an exception it raises ends the tuning)."""
    import hashlib
    import json
    from dataclasses import asdict

    from inlaid.scheduling.suite import SUITE_LENGTHS_FILE

    explicit = dict(explicit_options or {})
    cost = StepCostModel.load(cost_model_path)
    lengths_file = Path(lengths_file or SUITE_LENGTHS_FILE)
    key_source = json.dumps({"cost": [cost.coefficients, cost.overhead_s], "shape": asdict(shape), "tasks": num_tasks,
                             "explicit": explicit, "candidates": CANDIDATES, "workloads": WORKLOADS,
                             "requests": requests, "lengths": hashlib.sha256(lengths_file.read_bytes()).hexdigest()},
                            sort_keys=True, default=str)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"scheduler-tuning-{key}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            chosen, options = saved["chosen"], saved["options"]
            if not isinstance(options, dict):
                raise TypeError(f"'options' is a {type(options).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            # Tuned again and the file replaced: read as it was, it failed every later start the
            # same way, unnamed, and the server ran untuned for good.
            if log:
                log(f"scheduler tuning cache {cache} is unreadable ({type(error).__name__}: {error}); tuning again "
                    "and replacing it")
        else:
            if log:
                log(f"scheduler tuning read from {cache}: {chosen!r}")
            return {**options, **explicit}, None
    if log:
        log(f"tuning the inlaid policy on {cost_model_path}: {len(WORKLOADS) * (len(CANDIDATES) + 2)} simulations "
            f"of {requests} requests, {num_tasks} tasks, {shape.max_lora_slots} adapter slots, lengths from "
            f"{lengths_file.name}")
    result = tune_inlaid_options(cost, shape, num_tasks, explicit, requests=requests, progress=progress,
                                 lengths_file=lengths_file)
    if log:
        log(f"scheduler tuning chose {result.chosen.label!r} in {result.seconds:.0f} s:\n{result.table()}")
    if cache is not None:
        from inlaid.tasks.base import write_text_atomic

        try:  # whole or not at all: a kill mid-write left a cut file that failed every later start
            write_text_atomic(cache, json.dumps({"chosen": result.chosen.label, "options": result.chosen.options,
                                                 "scores": [asdict(score) for score in result.scores]}, indent=1)
                              + "\n")
        except OSError as error:  # the tuning stands; only the next start's shortcut is lost
            if log:
                log(f"scheduler tuning cache {cache} not written ({error.strerror or error}); the next start tunes "
                    "again")
    return {**result.chosen.options, **explicit}, result
