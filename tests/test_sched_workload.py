"""Traces, metrics and the cost model against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from inlaid.protocol import BatchPlan, ChunkPlan, SamplingParams
from inlaid.scheduling.cost_model import FEATURE_NAMES, StepCostModel, StepFeatures, fit_cost_model
from inlaid.scheduling.metrics import RequestRecord, ServiceGapMeter, StepRecord, load_records, save_records, summarize
from inlaid.scheduling.suite import SuiteRecord
from inlaid.scheduling.traces import Trace, TraceSpec, generate_trace, popularity_weights

RECORDS = [SuiteRecord(f"{f}/eval/{i}", f, "eval", 50 + i, 1 + i % 7, 3, 16, "stop") for f in "abc" for i in range(20)]


def test_gamma_arrivals_have_the_requested_rate_and_cv():
    for cv in (1.0, 4.0):
        trace = generate_trace(TraceSpec(rate=5.0, num_requests=40_000, cv=cv, seed=3), RECORDS)
        summary = trace.summary()
        assert summary["rate"] == pytest.approx(5.0, rel=0.05)
        assert summary["cv"] == pytest.approx(cv, rel=0.08)


def test_popularity_distributions_match_their_definitions():
    n = 50
    zipf = popularity_weights(n, "zipf", 1.0)
    harmonic = sum(1.0 / k for k in range(1, n + 1))
    assert zipf[0] == pytest.approx(1.0 / harmonic) and zipf[9] == pytest.approx(0.1 / harmonic)
    assert np.allclose(popularity_weights(n, "uniform", 1.0), 1.0 / n)
    # S-LoRA: floor(N x), x ~ Power(alpha): P(i) = ((i+1)/N)^alpha - (i/N)^alpha
    power = popularity_weights(n, "power", 0.5)
    assert power[0] == pytest.approx((1 / n) ** 0.5) and power.sum() == pytest.approx(1.0)
    for popularity, weights in (("zipf", zipf), ("power", power)):
        trace = generate_trace(TraceSpec(rate=1.0, num_requests=30_000, num_tasks=n, popularity=popularity, alpha=1.0
                                         if popularity == "zipf" else 0.5, seed=1), RECORDS)
        counts = np.bincount([int(r.task.split("-")[1]) for r in trace.requests], minlength=n) / 30_000
        assert np.abs(counts - weights).max() < 0.012


def test_trace_round_trips_through_jsonl_and_draws_from_its_families(tmp_path):
    trace = generate_trace(TraceSpec(rate=2.0, num_requests=300, num_tasks=7, popularity="zipf", base_fraction=0.2,
                                     seed=5), RECORDS)
    trace.save(tmp_path / "t.jsonl")
    loaded = Trace.load(tmp_path / "t.jsonl")
    assert loaded.requests == trace.requests and loaded.tasks == trace.tasks
    by_id = {r.record_id: r for r in RECORDS}
    for request in trace.requests:
        record = by_id[request.source]
        # a base-model request's budget is the adapter's recorded length: with the record's
        # budget the real server's base model ran on to it, past what the simulator counted
        budget = record.output_tokens if request.task is None else record.max_tokens
        assert (request.prompt_tokens, request.output_tokens, request.max_tokens) == (
            record.prompt_tokens, record.output_tokens, budget)
        if request.task is not None:
            assert trace.tasks[request.task].family == record.task
    assert 0.12 < sum(r.task is None for r in trace.requests) / 300 < 0.28
    faster = trace.scaled(2.0)
    assert faster.requests[-1].arrival_s == pytest.approx(trace.requests[-1].arrival_s / 2)


def _record(rid, task, arrival, admitted, tokens, isolated=1.0, prompt=10):
    return RequestRecord(rid, task, prompt, arrival, admitted, list(tokens), tokens[-1], isolated)


def test_summary_metrics_on_a_hand_computed_run(tmp_path):
    records = [
        _record("0", "a", 0.0, 0.0, [1.0, 2.0, 3.0], isolated=1.0),  # latency 3, ttft 1, tpot 1
        _record("1", "b", 1.0, 2.0, [4.0, 5.0], isolated=2.0),  # latency 4, ttft 3, tpot 1
        _record("2", "a", 2.0, 5.0, [9.0], isolated=0.5),  # latency 7, ttft 7
    ]
    steps = [StepRecord(0.0, 1.0, 2, 10, 2, 1), StepRecord(1.0, 2.0, 3, 3, 1, 0)]
    summary = summarize(records, steps, slo_scales=(2.0, 5.0), ttft_slo_s=3.0)
    assert summary["latency_s"]["mean"] == pytest.approx(14 / 3)
    assert summary["ttft_s"]["p50"] == pytest.approx(3.0)
    assert summary["tpot_s"]["mean"] == pytest.approx(1.0)
    assert summary["slo_attainment"] == {"2x": pytest.approx(1 / 3), "5x": pytest.approx(2 / 3)}
    assert summary["ttft_slo_attainment"] == pytest.approx(2 / 3)
    assert summary["max_wait_s"] == 3.0 and summary["max_stall_s"] == 1.0
    assert summary["throughput_rps"] == pytest.approx(3 / 9)
    assert summary["jct_by_task"] == {"a": pytest.approx(5.0), "b": pytest.approx(4.0)}
    assert summary["tasks_per_step"]["mean"] == 1.5 and summary["adapter_loads_per_s"] == pytest.approx(1 / 9)
    save_records(tmp_path / "r.jsonl", records)
    assert load_records(tmp_path / "r.jsonl") == records


def test_service_gap_meter_counts_input_plus_twice_output_between_backlogged_tasks():
    meter = ServiceGapMeter(sample_every_s=0.0)
    # t=1: a's request computed (prompt 10, first token); b waits. b was never served: it
    # is lifted to nobody's counter (nobody was backlogged before).
    meter.step(1.0, backlogged={"b"}, prompts={"a": 10}, tokens={"a": 1})
    assert (meter.counters["a"], meter.counters["b"]) == (12.0, 0.0) and meter.worst == 0.0  # one backlogged: no gap
    # t=2: a gets a second request that waits (a backlogged, lifted to min(b) = 0: stays 12),
    # a's first request earns 2 more.
    meter.step(2.0, backlogged={"a", "b"}, prompts={}, tokens={"a": 1})
    assert meter.counters["a"] == 14.0 and meter.worst == 14.0
    # t=3: b's request runs (prompt 30 + a token): b leaves the backlog; a stays.
    meter.step(3.0, backlogged={"a"}, prompts={"b": 30}, tokens={"b": 1})
    # t=4: b is backlogged again (a new request): lifted to min over staying ones = a's 14,
    # but its own 32 is higher, so it keeps 32; the gap is 32 - 14.
    meter.step(4.0, backlogged={"a", "b"}, prompts={}, tokens={})
    assert (meter.counters["a"], meter.counters["b"]) == (14.0, 32.0) and meter.worst == 18.0
    # A task that returns after idling is lifted: c comes in at the least backlogged counter.
    meter.step(5.0, backlogged={"a", "b", "c"}, prompts={}, tokens={})
    assert meter.counters["c"] == 14.0 and meter.worst == 18.0


def test_cost_model_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    truth = {"constant": 0.03, "tokens": 0.002, "sampled": 0.001, "decode_cells": 2e-6, "prefill_cells": 1e-7,
             "adapters": 0.01, "lora_token_rank": 1e-6, "loads": 0.02}
    model = StepCostModel(truth)
    samples = []
    for _ in range(300):
        features = StepFeatures(*(int(x) for x in rng.integers([1, 1, 0, 0, 0, 0, 0], [3000, 64, 40000, 900000, 9, 90000, 4])))
        samples.append((features, model.step_seconds(features)))
    fitted = fit_cost_model(samples)
    for name in FEATURE_NAMES:
        assert fitted.coefficients[name] == pytest.approx(truth[name], rel=1e-3, abs=1e-9)


def test_step_features_of_a_plan():
    params = SamplingParams()

    def chunk(seq_id, tokens, start, slot, sample=True):
        return ChunkPlan(seq_id=seq_id, token_ids=[1] * tokens, start_pos=start, block_table=[0] * 40,
                         adapter_slot=slot, sample=sample, sampling=params, num_generated=0)

    plan = BatchPlan(step_id=0, chunks=[chunk(0, 1, 20, 0), chunk(1, 1, 40, -1), chunk(2, 30, 0, 1, False),
                                        chunk(3, 10, 5, 0)])
    features = StepFeatures.of_plan(plan, {0: 8, 1: 16}.__getitem__, block_size=16)
    # decode: 2 rows x keys padded to 48 (longest context 41); prefill: 2 chunks x 30 queries x 32 keys
    assert features == StepFeatures(tokens=42, sampled=3, decode_cells=2 * 48, prefill_cells=2 * 30 * 32,
                                    adapters=2, lora_token_rank=1 * 8 + 30 * 16 + 10 * 8, loads=0)
