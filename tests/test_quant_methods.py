"""Aggregation methods on small random layers with heterogeneous per-task inputs."""

from __future__ import annotations

import pytest
import torch

from inlaid.quant.aggregate import TaskHessian, elementwise_max, quantize_static, task_errors
from inlaid.quant.errors import UnknownMethodError
from inlaid.quant.gptq import gptq_quantize
from inlaid.quant.methods import Method, MlgptqOptions, parse_method, quantize_linear
from inlaid.quant.spec import QuantSpec


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py



def _task_hessians(features: int, seed: int) -> dict[str, TaskHessian]:
    """Four tasks whose inputs live on different feature subspaces and scales, with very
    different token counts (the big task dominates a token mean)."""
    generator = torch.Generator().manual_seed(seed)
    stats = {}
    for index, tokens in enumerate([4000, 600, 300, 150]):
        scales = torch.rand(features, generator=generator) ** 3 * 4 + 0.05
        mixing = torch.eye(features) + 0.3 * torch.randn(features, features, generator=generator) / features**0.5
        x = (torch.randn(tokens, features, generator=generator) * scales) @ mixing
        x[:, index * 8 : index * 8 + 8] *= 6  # each task has its own outlier features
        stats[f"task{index}"] = TaskHessian(2 * x.T @ x / tokens, tokens)
    return stats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [3, 4])
def test_minimax_every_task_below_mixed_worst_task(seed: int, bits: int) -> None:
    spec = QuantSpec(bits=bits, group_size=32)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(100 + seed))
    stats = _task_hessians(96, seed)
    mixed = quantize_static("token-mean", [weight], stats, spec)[0].quantized.dequantize()
    mixed_errors = task_errors(weight, mixed, stats)
    outcome = quantize_linear(parse_method("minimax"), weight, stats, spec)
    ml_errors = task_errors(weight, outcome.quantized.dequantize(), stats)
    assert ml_errors == pytest.approx(outcome.task_errors)
    assert max(ml_errors.values()) < max(mixed_errors.values())
    assert all(error < max(mixed_errors.values()) for error in ml_errors.values())
    # the weights it settled on favour the small tasks the token mean neglects
    assert abs(sum(outcome.task_weights.values()) - 1.0) < 1e-9


BOUNDED = MlgptqOptions(rounds=4, start="token-mean", mean_slack=0.05)  # mlgptq before the NLL table


def test_mlgptq_default_is_gptq_on_the_task_mean() -> None:
    """The default mlgptq is GPTQ against (1/T) Σ H_t — with task costs κ, against
    Σ κ_t H_t / Σ κ_t: the same codes, bit for bit — and the small tasks a token mean
    outvotes get lower errors than under it."""
    spec = QuantSpec(bits=3, group_size=32)
    costs = {"task0": 0.5, "task1": 1.5, "task2": 1.0, "task3": 1.0}
    for seed in range(3):
        weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(300 + seed))
        stats = _task_hessians(96, seed)
        task_mean = sum(stat.hessian for stat in stats.values()) / len(stats)
        outcome = quantize_linear(parse_method("mlgptq"), weight, stats, spec)
        assert torch.equal(outcome.quantized.codes, gptq_quantize(weight, task_mean, spec).codes)
        weighted_mean = sum(costs[name] * stat.hessian for name, stat in stats.items()) / sum(costs.values())
        weighted = quantize_linear(parse_method("mlgptq"), weight, stats, spec, task_costs=costs)
        torch.testing.assert_close(weighted.quantized.dequantize(), gptq_quantize(weight, weighted_mean, spec).dequantize(),
                                   rtol=0, atol=0)
        token_mean = quantize_static("token-mean", [weight], stats, spec)[0].quantized.dequantize()
        by_token_mean = task_errors(weight, token_mean, stats)
        assert outcome.task_errors["task3"] < by_token_mean["task3"]  # 150 of 5,050 tokens
        assert outcome.task_errors["task0"] > by_token_mean["task0"]  # the big task pays for it


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [3, 4])
def test_mlgptq_bounded_minimax(seed: int, bits: int) -> None:
    """With rounds > 1 mlgptq keeps a reweighted round only if it lowers the worst task's
    error while the task mean stays within the slack of the start's."""
    spec = QuantSpec(bits=bits, group_size=32)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(100 + seed))
    stats = _task_hessians(96, seed)
    start = task_errors(weight, quantize_static("token-mean", [weight], stats, spec)[0].quantized.dequantize(), stats)
    outcome = quantize_linear(parse_method("mlgptq"), weight, stats, spec, BOUNDED)
    errors = task_errors(weight, outcome.quantized.dequantize(), stats)
    assert errors == pytest.approx(outcome.task_errors)
    assert max(errors.values()) <= max(start.values())
    assert sum(errors.values()) <= 1.05 * sum(start.values()) * (1 + 1e-9)


def test_mlgptq_bounded_lowers_the_worst_task_of_the_token_mean() -> None:
    improved = 0
    for seed in range(6):
        spec = QuantSpec(bits=3, group_size=32)
        weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(200 + seed))
        stats = _task_hessians(96, seed)
        start = task_errors(weight, quantize_static("token-mean", [weight], stats, spec)[0].quantized.dequantize(), stats)
        outcome = quantize_linear(parse_method("mlgptq"), weight, stats, spec, BOUNDED)
        improved += max(outcome.task_errors.values()) < 0.99 * max(start.values())
    assert improved >= 4  # the small tasks the token mean neglects gain on most problems


def test_mlgptq_options_are_checked() -> None:
    with pytest.raises(UnknownMethodError, match="start"):
        MlgptqOptions(start="median")
    with pytest.raises(UnknownMethodError, match="at least one round"):
        MlgptqOptions(rounds=0)


def test_named_baselines() -> None:
    spec = QuantSpec(bits=3, group_size=32)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    stats = _task_hessians(64, 7)
    stacked = torch.stack([stat.hessian for stat in stats.values()])
    assert torch.equal(elementwise_max(stats), stacked.max(dim=0).values)
    literal_max = quantize_linear(parse_method("max"), weight, stats, spec).quantized
    assert torch.equal(literal_max.codes, gptq_quantize(weight, stacked.max(dim=0).values, spec).codes)
    single = quantize_linear(parse_method("gptq-task:task2", list(stats)), weight, stats, spec).quantized
    assert torch.equal(single.codes, gptq_quantize(weight, stats["task2"].hessian, spec).codes)
    total = sum(stat.tokens for stat in stats.values())
    token_mean = sum(stat.hessian * (stat.tokens / total) for stat in stats.values())
    for name in ("gptq-mean-lora", "gptq-mixed"):
        result = quantize_linear(parse_method(name), weight, stats, spec).quantized
        assert torch.equal(result.dequantize(), gptq_quantize(weight, token_mean, spec).dequantize())
    assert parse_method("rtn").hessian_forward is None
    assert parse_method("gptq-mixed").hessian_forward == "base"
    assert parse_method("mlgptq").hessian_forward == "adapter"
    # a task's own Hessian is the per-task upper bound: its own error is the lowest
    own_error = task_errors(weight, single.dequantize(), {"task2": stats["task2"]})["task2"]
    ml = quantize_linear(parse_method("mlgptq"), weight, stats, spec)
    assert own_error <= ml.task_errors["task2"]


def test_unknown_methods_are_rejected() -> None:
    with pytest.raises(UnknownMethodError):
        parse_method("awq")
    with pytest.raises(UnknownMethodError, match="no task 'zz'"):
        parse_method("gptq-task:zz", ["a", "b"])
    with pytest.raises(UnknownMethodError):
        parse_method("gptq-task:")
    assert parse_method("gptq-task:a", ["a"]) == Method("gptq-task", "a")


@pytest.mark.parametrize("seed", [0, 1])
def test_task_costs_move_error_onto_the_cheap_tasks(seed: int) -> None:
    """With κ (what a unit of relative error costs each task), mlgptq's start and its worst
    task are κ-weighted: the costly task's error falls, and the worst κ·e never exceeds the
    κ-weighted token mean's."""
    spec = QuantSpec(bits=3, group_size=32)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(200 + seed))
    stats = _task_hessians(96, seed)
    costs = {"task0": 0.25, "task1": 0.25, "task2": 0.25, "task3": 3.25}  # the smallest task is the costly one
    plain = quantize_linear(parse_method("mlgptq"), weight, stats, spec, BOUNDED)
    weighted = quantize_linear(parse_method("mlgptq"), weight, stats, spec, BOUNDED, task_costs=costs)
    static = quantize_linear(parse_method("mlgptq"), weight, stats, spec, MlgptqOptions(rounds=1, start="token-mean"),
                             task_costs=costs)
    assert weighted.task_errors["task3"] < plain.task_errors["task3"]
    worst = max(costs[t] * e for t, e in weighted.task_errors.items())
    assert worst <= max(costs[t] * e for t, e in static.task_errors.items()) * (1 + 1e-9)
    with pytest.raises(UnknownMethodError, match="sensitivity"):
        MlgptqOptions(sensitivity="magic")


def test_the_probe_reads_no_more_samples_than_the_calibration() -> None:
    from inlaid.quant.task_costs import normalized, probe_count

    assert probe_count(8, None) == 8 and probe_count(8, 32) == 8 and probe_count(8, 2) == 2
    assert normalized({"a": 1.0, "b": 3.0}) == {"a": 0.5, "b": 1.5}  # mean 1: only the ratios matter
    assert normalized({"a": 0.0}) is None
