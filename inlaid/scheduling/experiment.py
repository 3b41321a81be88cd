"""What the scheduling benchmarks share: the policies compared (with their ablations), the
length models they start from, and the load a trace puts on the simulated server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inlaid.cli_args import MAX_SECONDS
from inlaid.engine.scheduler import SchedulingPolicy
from inlaid.scheduling.cost_model import ChunkShape, StepCostModel, StepFeatures
from inlaid.scheduling.registry import make_policy
from inlaid.scheduling.estimates import ExactLengths
from inlaid.scheduling.simulator import EngineShape, synthetic_prompt
from inlaid.scheduling.traces import Trace
from inlaid.scheduling.suite import SuiteRecord



@dataclass(frozen=True)
class PolicyVariant:
    label: str
    policy: str
    options: dict[str, Any] = field(default_factory=dict)
    length_model: str = "model"  # model | task-mean | exact (the clairvoyant oracle; inlaid only)


MAIN_VARIANTS = [
    PolicyVariant("fifo", "fifo"),
    PolicyVariant("mlfq", "mlfq"),
    PolicyVariant("vtc", "vtc"),
    PolicyVariant("inlaid", "inlaid"),
    PolicyVariant("inlaid+fair", "inlaid", {"fairness_bound": 500.0}),
]
# The clairvoyant oracle: exact output lengths, shortest remaining work first with adapter
# grouping, no starvation guard (aging and first-token-first cost mean JCT), at several
# fixed β and several per-step row targets (β = 8 at most); the best of them is the bound
# the sweep reports. "inlaid exact" is inlaid with its guards and perfect predictions: the
# gap from inlaid to it is the predictor's, from it to the oracle the guards'.
# No aging: the longest bound a config accepts (11.6 days), past any simulated wait.
_NO_AGING_S = MAX_SECONDS
_CLAIRVOYANT = {"max_wait_s": _NO_AGING_S, "first_token_first": False}
ORACLES = [PolicyVariant(f"oracle beta={beta or 'inf'}", "inlaid",
                         {**_CLAIRVOYANT, "max_adapters_per_step": beta, "batch_rows_target": 0}, "exact")
           for beta in (2, 4, 8, 0)]
ORACLES += [PolicyVariant(f"oracle rows={rows}", "inlaid", {**_CLAIRVOYANT, "batch_rows_target": rows}, "exact")
            for rows in (8, 16, 32)]
ORACLE_REFERENCES = [PolicyVariant("inlaid exact", "inlaid", length_model="exact")]
ABLATIONS = [
    PolicyVariant("inlaid -prediction (task mean)", "inlaid", length_model="task-mean"),
    PolicyVariant("inlaid -grouping (beta=inf)", "inlaid",
                  {"max_adapters_per_step": 0, "group_by_adapter": False, "batch_rows_target": 0}),
    PolicyVariant("inlaid -adaptive beta (fixed 8)", "inlaid", {"max_adapters_per_step": 8, "batch_rows_target": 0}),
    PolicyVariant("inlaid -aging", "inlaid", {"max_wait_s": _NO_AGING_S}),
    PolicyVariant("inlaid -first-token-first", "inlaid", {"first_token_first": False}),
]


def prefill_weight(cost: StepCostModel, shape: EngineShape, rank: int = 16) -> float:
    """Decode steps one prompt token costs: the cost model's per-token time over the time
    of a decode step at half the batch limit (the scheduler's exchange rate between a
    prompt to compute and an output token to wait for)."""
    batch = max(1, shape.max_num_seqs // 2)
    rows = [ChunkShape(1, 200, i % 4, rank, True) for i in range(batch)]
    step = cost.step_seconds(StepFeatures.of_chunks(rows, 0, shape.block_size))
    return cost.coefficients.get("tokens", 0.0) / step if step > 0 else 0.0


def prefill_weight_at_resource_cost(cost: StepCostModel, shape: EngineShape, rank: int = 16) -> float:
    """Decode *rows* one prompt token costs: the cost model's per-token time over one row's
    share of a decode step at half the batch limit. Where the server is busy (bursts), a
    request's prompt takes executor time from everyone at this rate, so shortest-work-first
    ranks by it; `prefill_weight` (a step's whole time per decode token) prices a prompt
    token at what its owner waits for: max_num_seqs / 2 times lower (32x by default)."""
    batch = max(1, shape.max_num_seqs // 2)
    return prefill_weight(cost, shape, rank) * batch


def variant_options(variant: PolicyVariant, cost: StepCostModel, shape: EngineShape) -> dict[str, Any]:
    """The `[scheduler]` options of a variant (what a server config would say)."""
    gamma = prefill_weight(cost, shape)
    if variant.policy == "mlfq":
        return {"prefill_weight": gamma, **variant.options}
    if variant.policy == "inlaid":
        return {"prefill_weight": gamma, "predictor": variant.length_model, **variant.options}
    return dict(variant.options)


def make_variant(variant: PolicyVariant, cost: StepCostModel, shape: EngineShape,
                 history: Sequence[tuple[str, list[int], int]] = (), trace: Trace | None = None,
                 prompts: Mapping[str, list[int]] | None = None) -> SchedulingPolicy:
    """The variant's policy; `history` (task, prompt ids, output tokens) is what its length
    model learned before the run (the predictor's saved state, in a server); the oracle
    reads the true lengths from `trace` (its prompts from `prompts`, as the simulator)."""
    options = variant_options(variant, cost, shape)
    if variant.policy != "inlaid":
        return make_policy(variant.policy, options)
    if variant.length_model == "exact":
        if trace is None:
            raise ValueError("the oracle needs the trace it will be run on")
        model: Any = ExactLengths({(r.task, tuple((prompts or {}).get(r.source) or synthetic_prompt(r))): r.output_tokens
                                   for r in trace.requests})
    else:
        model = length_model(variant.length_model, history, options.get("predictor_refit_every", 0))
    return make_policy("inlaid", options, length_model=model)


def length_model(kind: str, history: Sequence[tuple[str, list[int], int]], refit_every: int = 0) -> Any:
    """The length model a run starts with, fitted on `history`; it keeps learning from the
    run's finished requests (task levels at once; full refits every `refit_every`, 0 = none: the
    simulator's default, the server refits in the background)."""
    from inlaid.predictor import OnlineLengthPredictor, TaskMeanPredictor

    if kind == "task-mean":
        baseline = TaskMeanPredictor()
        for task, prompt, output in history:
            baseline.observe(task, prompt, output)
        return baseline
    predictor = OnlineLengthPredictor(background=False, refit_every=refit_every)
    for task, prompt, output in history:
        predictor.remember(task, prompt, output)
    predictor.refit(wait=True)
    return predictor


def suite_history(records: Sequence[SuiteRecord], prompts: Mapping[str, list[int]], split: str = "calib"
                  ) -> list[tuple[str, list[int], int]]:
    return [(r.task, prompts[r.record_id], r.output_tokens) for r in records if r.split == split]
