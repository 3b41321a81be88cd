"""`ServerMetrics` on the coordinator's torch-free `Engine`, stepped by hand with known
sampled tokens, so every figure has a known answer: adapter-pool loads / hits / evictions
under slot pressure and across an executor restart (cases the server tests cannot force
cheaply), token and request counts, label bounding, the exposition format."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inlaid.engine import Engine, EngineConfig
from inlaid.http.front_metrics import HttpMetrics
from inlaid.protocol import SampledToken, SamplingParams, StepResult
from inlaid.serve.config import ConfigError, check_task_name
from inlaid.serve.metrics import ServerMetrics
from inlaid.serve.requests import ActiveRequest
from inlaid.serve.supervisor import ExecutorSupervisor

BLOCK_SIZE = 16
ANY_TOKEN = 42  # not an eos token of the model: sequences end by max_tokens


class Harness:
    """What the coordinator does around the metrics hooks, minus the sockets."""

    def __init__(self, model_dir, adapter_dirs, per_task_histograms: bool = True) -> None:
        config = EngineConfig(model_dir=str(model_dir), max_lora_slots=1, max_lora_rank=32, num_kv_blocks=64,
                              block_size=BLOCK_SIZE)
        self.engine = Engine(config, runner=None)
        self.tasks = {"a": str(adapter_dirs["attn-r8"]), "b": str(adapter_dirs["mlp-r16"])}
        for name, path in self.tasks.items():
            self.engine.register_adapter(name, path)
        self.supervisor = ExecutorSupervisor(config, "ipc:///unused", on_lost=lambda *lost: None, on_fatal=print)
        self.requests: dict[str, ActiveRequest] = {}
        # The harness is the one executor the metrics read (its engine and supervisor).
        self.metrics = ServerMetrics([self], self.tasks, self.requests, {"model": "m", "version": "v"},
                                     per_task_histograms=per_task_histograms)
        self.finished: list[ActiveRequest] = []

    def step_running_seconds(self) -> float:
        return 0.0  # its steps run inside step(): none is ever left running on an executor

    def admit(self, engine_id: str, task: str | None, prompt: list[int], max_tokens: int) -> None:
        self.engine.add_request(prompt, sampling=SamplingParams(max_tokens=max_tokens), adapter=task,
                                request_id=engine_id)
        request = ActiveRequest(key=(b"client", engine_id), engine_id=engine_id, task=task, stream=False,
                                seq_id=self.engine.sequence(engine_id).seq_id, num_prompt_tokens=len(prompt))
        self.requests[engine_id] = request
        self.metrics.on_admitted(request)

    def step(self):
        plan = self.engine.begin_step()
        assert plan is not None
        sampled = [SampledToken(seq_id=c.seq_id, token_id=ANY_TOKEN) for c in plan.chunks if c.sample]
        result = StepResult(step_id=plan.step_id, num_tokens=sum(len(c.token_ids) for c in plan.chunks),
                            compute_seconds=0.01, sampled=sampled)
        outputs = self.engine.finish_step(result)
        self.metrics.on_step(plan, result, outputs)
        now = time.monotonic()
        for output in outputs:
            request = self.requests[output.request_id]
            request.first_token_at = request.first_token_at or now
            request.token_ids.extend(output.new_token_ids)
            if output.finished:
                self.metrics.on_finished(self.requests.pop(output.request_id), output.finish_reason)
        return plan

    def run_to_idle(self) -> int:
        steps = 0
        while self.engine.has_unfinished():
            self.step()
            steps += 1
        return steps

    def samples(self) -> dict[tuple[str, frozenset], float]:
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(self.metrics.exposition()) for s in family.samples}


@pytest.fixture
def harness(model_dir, adapter_dirs) -> Harness:
    return Harness(model_dir, adapter_dirs)


def _get(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_adapter_pool_loads_hits_and_evictions(harness):
    # Two requests of task a admitted together: one load, one hit.
    harness.admit("a1", "a", [5, 6, 7], max_tokens=2)
    harness.admit("a2", "a", [8, 9], max_tokens=3)
    plan = harness.step()
    assert [load.name for load in plan.adapter_loads] == ["a"]
    harness.run_to_idle()
    # One slot: b displaces a, which is still registered: an eviction.
    harness.admit("b1", "b", [5, 6], max_tokens=1)
    harness.run_to_idle()
    # a comes back into the slot b holds: a second eviction.
    harness.admit("a3", "a", [5], max_tokens=1)
    harness.run_to_idle()
    samples = harness.samples()
    assert _get(samples, "inlaid_adapter_loads_total") == 3
    assert _get(samples, "inlaid_adapter_hits_total") == 1
    assert _get(samples, "inlaid_adapter_evictions_total") == 2
    # A restarted executor starts empty: the next load displaces nothing it holds.
    harness.supervisor.restarts = 1
    harness.engine.scheduler.adapters.forget_slots()
    harness.admit("b2", "b", [5], max_tokens=1)
    harness.run_to_idle()
    samples = harness.samples()
    assert _get(samples, "inlaid_adapter_loads_total") == 4
    assert _get(samples, "inlaid_adapter_evictions_total") == 2
    assert _get(samples, "inlaid_executor_restarts_total") == 1


def test_tokens_requests_latencies_and_step_figures(harness):
    jobs = [("r1", None, [1, 2, 3, 4, 5], 4), ("r2", "a", [6, 7], 1), ("r3", "a", list(range(10, 30)), 3)]
    for engine_id, task, prompt, max_tokens in jobs:
        harness.admit(engine_id, task, prompt, max_tokens)
    samples = harness.samples()
    # Admitted, nothing computed yet: all waiting, no KV held.
    assert _get(samples, "inlaid_requests_waiting") == 3 and _get(samples, "inlaid_requests_running") == 0
    assert _get(samples, "inlaid_kv_blocks_used") == 0
    harness.step()
    samples = harness.samples()
    # r2 (one token) is done; r1 and r3 hold the blocks of their computed prompts.
    assert _get(samples, "inlaid_requests_running") == 2
    assert _get(samples, "inlaid_kv_blocks_used") == math.ceil(5 / BLOCK_SIZE) + math.ceil(20 / BLOCK_SIZE)
    steps = 1 + harness.run_to_idle()
    samples = harness.samples()
    assert _get(samples, "inlaid_prompt_tokens_total", task="__base__") == 5
    assert _get(samples, "inlaid_prompt_tokens_total", task="a") == 22
    assert _get(samples, "inlaid_generation_tokens_total", task="__base__") == 4
    assert _get(samples, "inlaid_generation_tokens_total", task="a") == 4
    assert _get(samples, "inlaid_requests_total", task="__base__", outcome="length") == 1
    assert _get(samples, "inlaid_requests_total", task="a", outcome="length") == 2
    assert _get(samples, "inlaid_time_to_first_token_seconds_count", task="a") == 2
    assert _get(samples, "inlaid_request_duration_seconds_count", task="a") == 2
    assert _get(samples, "inlaid_time_per_output_token_seconds_count", task="a") == 1  # r2 has one token
    assert _get(samples, "inlaid_step_batch_size_count") == steps == 4  # r1 runs longest: 4 tokens, 4 steps
    assert _get(samples, "inlaid_step_batch_size_sum") == 4 + 1 + 3  # one sequence-step per generated token
    assert _get(samples, "inlaid_computed_tokens_total") == (5 + 3) + (2 + 0) + (20 + 2)
    assert _get(samples, "inlaid_step_tasks_sum") == 3  # steps 1-3 carry task a's rows, step 4 base rows only
    assert _get(samples, "inlaid_kv_blocks_used") == 0 and _get(samples, "inlaid_requests_running") == 0


def test_outcomes_and_bounded_task_labels(harness):
    harness.metrics.on_rejected(None, "overloaded")
    harness.metrics.on_rejected("a", "context_length")
    for name in ("zz1", "zz2", "zz3"):  # client-chosen names must not create series
        harness.metrics.on_rejected(name, "unknown_task")
    harness.admit("c1", "b", [1, 2], max_tokens=50)
    harness.step()
    harness.metrics.on_finished(harness.requests.pop("c1"), "cancelled")
    harness.engine.abort("c1")
    samples = harness.samples()
    assert _get(samples, "inlaid_requests_total", task="__base__", outcome="overloaded") == 1
    assert _get(samples, "inlaid_requests_total", task="a", outcome="context_length") == 1
    assert _get(samples, "inlaid_requests_total", task="__unknown__", outcome="unknown_task") == 3
    assert _get(samples, "inlaid_requests_total", task="b", outcome="cancelled") == 1
    # A cancelled request is not a completed one: no latency observation.
    assert _get(samples, "inlaid_request_duration_seconds_count", task="b") == 0
    assert {dict(labels)["task"] for name, labels in samples if name == "inlaid_requests_total"} == {
        "__base__", "__unknown__", "a", "b"}


def test_exposition_follows_prometheus_conventions(harness):
    harness.admit("x", "a", [1, 2, 3], max_tokens=2)
    harness.run_to_idle()
    families = list(text_string_to_metric_families(harness.metrics.exposition()))
    assert families and all(f.name.startswith("inlaid_") for f in families)
    for family in families:
        names = {s.name for s in family.samples}
        if family.type == "counter":
            assert names == {f"{family.name}_total"}, family.name
        if family.type == "histogram":
            assert names == {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}, family.name
        assert not any(n.endswith("_created") for n in names)
        # `_total` is the counters' suffix: a gauge named so (the KV blocks and adapter slots
        # were) reads as a counter to linters and to rate() users (an outside probe).
        assert family.type == "counter" or not family.name.endswith("_total"), family.name
    histograms = {f.name for f in families if f.type == "histogram"}
    sizes = {"inlaid_step_batch_size", "inlaid_step_tasks"}  # counts of things; every other one is a time
    assert sizes < histograms and all(name.endswith("_seconds") for name in histograms - sizes)


def _series_names(exposition: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(exposition):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_the_grafana_dashboard_queries_only_series_that_exist(harness):
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["query"] for variable in dashboard["templating"]["list"]]
    used = set(re.findall(r"inlaid_[a-z_]+", " ".join(queries)))
    front = HttpMetrics(app=lambda scope, receive, send: None)
    exposed = _series_names(harness.metrics.exposition()) | _series_names(front.exposition())
    assert used and used <= exposed, used - exposed
    assert {"inlaid_requests_total", "inlaid_time_to_first_token_seconds_bucket", "inlaid_adapter_evictions_total",
            "inlaid_kv_blocks_used", "inlaid_http_requests_total"} <= used


def test_reserved_task_names_are_refused():
    for name in ("__base__", "__unknown__", "__x__"):
        with pytest.raises(ConfigError, match="reserved"):
            check_task_name(name)
    check_task_name("_private")  # only the __name__ form is reserved
    check_task_name("a__b__")



_HISTOGRAMS = ("inlaid_request_duration_seconds", "inlaid_request_queue_seconds", "inlaid_time_to_first_token_seconds",
               "inlaid_time_per_output_token_seconds")


@pytest.mark.parametrize("per_task", [True, False], ids=["per-task", "task_histograms-false"])
def test_task_histograms_false_keeps_one_histogram_set_and_the_per_task_counters(model_dir, adapter_dirs, per_task):
    """`server.task_histograms = false`: the four latency histograms carry no `task` label (a
    task's ~78 series were 70 of them: 4.9 MB an exposition at ~900 tasks), each observation
    lands in the one set, and the per-task counters and a removed task's forgetting are as before."""
    harness = Harness(model_dir, adapter_dirs, per_task_histograms=per_task)
    jobs = [("r1", None, [1, 2, 3, 4, 5], 4), ("r2", "a", [6, 7], 1), ("r3", "a", list(range(10, 30)), 3),
            ("r4", "b", [9, 9, 9], 2)]
    for engine_id, task, prompt, max_tokens in jobs:
        harness.admit(engine_id, task, prompt, max_tokens)
    harness.run_to_idle()
    families = {family.name: family for family in text_string_to_metric_families(harness.metrics.exposition())}
    for name in _HISTOGRAMS:
        counts = {sample.labels.get("task"): sample.value for sample in families[name].samples
                  if sample.name == name + "_count"}
        if per_task:
            expected = {"__base__": 1, "a": 2, "b": 1}
            if name == "inlaid_time_per_output_token_seconds":  # requests with 2+ tokens: r1, r3, r4
                expected = {"__base__": 1, "a": 1, "b": 1}
            assert counts == expected, name
        else:
            assert counts == {None: 3 if name == "inlaid_time_per_output_token_seconds" else 4}, name
    samples = harness.samples()
    assert _get(samples, "inlaid_generation_tokens_total", task="a") == 4
    assert _get(samples, "inlaid_generation_tokens_total", task="b") == 2
    assert _get(samples, "inlaid_requests_total", task="b", outcome="length") == 1
    task_series = sum(1 for family in families.values() for sample in family.samples
                      if sample.labels.get("task") == "b")
    assert task_series == (78 if per_task else 3)  # requests (one outcome), prompt and generation tokens
    del harness.tasks["b"]
    harness.metrics.forget_task("b")
    after = list(text_string_to_metric_families(harness.metrics.exposition()))
    assert not any(sample.labels.get("task") == "b" for family in after for sample in family.samples)
    if not per_task:  # the shared set keeps what b's requests put in it
        duration = next(family for family in after if family.name == "inlaid_request_duration_seconds")
        assert [s.value for s in duration.samples if s.name.endswith("_count")] == [4]
