"""Scale-out pieces without processes: the [executors] and [ray] config sections, moving a
waiting request between engines, and the executor pool's loads and moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from inlaid.protocol import SamplingParams
from inlaid.serve.config import ConfigError, config_from_dict

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _config(model_dir, **executors):  # type: ignore[no-untyped-def]
    return config_from_dict({"model": {"dir": str(model_dir)}, "executors": executors,
                             "executor": {"max_num_seqs": 2, "num_kv_blocks": 32, "max_lora_slots": 1}})


def test_executors_section_defaults_and_refusals(model_dir) -> None:
    assert _config(model_dir).executors.count == 1
    config = _config(model_dir, count=2, devices=["cuda:0", "cuda:1"], placement="spread", overdue_s=2.5)
    assert (config.executors.count, config.executors.devices, config.executors.placement) == (2, ["cuda:0", "cuda:1"],
                                                                                                "spread")
    for bad, words in [({"count": 0}, "count"), ({"count": 2, "devices": ["cuda:0"]}, "one device string"),
                       ({"count": 2, "devices": []}, "one device string"),  # was taken as absent
                       ({"placement": "random"}, "placement"), ({"overdue_s": 0}, "overdue_s"),
                       ({"size": 2}, "unknown keys")]:
        with pytest.raises(ConfigError, match=words):
            _config(model_dir, **bad)
    with pytest.raises(ConfigError, match="executor_address must be 'auto'"):
        config_from_dict({"model": {"dir": str(model_dir)}, "executors": {"count": 2},
                          "server": {"executor_address": "ipc:///tmp/x.ipc"}})


def test_each_executor_reports_how_long_its_step_has_run(model_dir) -> None:
    """An outside probe: a SIGSTOPped executor of two read `ready` in stats until the step
    timeout, and only the server's longest step time showed that one was hung, not which."""
    import time

    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.step_loop import StepLoop

    pool = ExecutorPool(_config(model_dir, count=2), lambda: None)
    for shard in pool.shards:
        shard.step_loop = StepLoop(shard.engine, None, on_plan=lambda plan: None,  # type: ignore[arg-type]
                                   deliver=lambda *args: None, counters={}, fail_running=lambda *args: None,
                                   fail_waiting=lambda *args: None)
    assert [shard.info().step_running_seconds for shard in pool.shards] == [0.0, 0.0]
    pool.shards[1].step_loop.executing_since = time.monotonic() - 20.0  # its plan went out 20 s ago
    hung, idle = pool.shards[1].info(), pool.shards[0].info()
    assert 20.0 <= hung.step_running_seconds < 30.0 and idle.step_running_seconds == 0.0


def test_an_adapter_failure_is_remembered_for_its_files_and_a_while(model_dir, monkeypatch) -> None:
    """Placement keeps a task's work off an executor whose load of its adapter failed (see
    test_scale_out_server), for ADAPTER_FAILURE_MEMORY_S; a task added again from other files,
    or removed, is forgotten at once (a fixed adapter was avoided for a minute: a review)."""
    import time

    from inlaid.serve import executor_pool
    from inlaid.serve.executor_pool import ExecutorPool

    pool = ExecutorPool(_config(model_dir, count=2), lambda: None)
    shard = pool.shards[1]
    for engine in pool.engines:
        engine.register_adapter("qa", str(ADAPTERS / "qa"))
    shard.adapter_failed("qa")
    now = time.monotonic()
    assert shard.failed_tasks(now) == {"qa"} and pool.shards[0].failed_tasks(now) == frozenset()
    assert [load.failed_tasks for load in pool.loads({})] == [frozenset(), frozenset({"qa"})]
    assert shard.failed_tasks(now + executor_pool.ADAPTER_FAILURE_MEMORY_S + 1) == frozenset()  # a while only
    shard.adapter_failed("qa")
    for engine in pool.engines:  # added again from other files
        engine.register_adapter("qa", str(ADAPTERS / "math"))
    assert shard.failed_tasks(time.monotonic()) == frozenset()


def test_a_waiting_request_moves_between_engines_and_keeps_its_id(model_dir) -> None:
    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.requests import ActiveRequest

    from inlaid.scheduling.registry import make_policy

    # VTC counts each task's unfinished requests: a moved request must leave one count for the other
    pool = ExecutorPool(_config(model_dir, count=2), lambda: make_policy("vtc"))
    first, second = pool.engines
    for engine in pool.engines:
        engine.register_adapter("qa", str(ADAPTERS / "qa"))
    requests = {}
    for i in range(3):  # two seats on executor 0: the third waits there
        engine_id = f"r{i}"
        first.add_request([1, 2, 3, 4 + i], sampling=SamplingParams(max_tokens=4), adapter="qa", request_id=engine_id)
        requests[engine_id] = ActiveRequest(key=(b"c", engine_id), engine_id=engine_id,
                                            seq_id=first.sequence(engine_id).seq_id, task="qa", stream=False,
                                            num_prompt_tokens=4)
    plan = first.begin_step()
    assert plan is not None and len(plan.chunks) == 2  # r0, r1 run; r2 waits
    assert first.take_waiting("r0") is None  # running: it stays with its KV blocks
    # Executor 1 is not up: nothing moves yet; once it is, the stranded request moves.
    assert pool.rebalance(requests) == []
    pool.shards[0].supervisor = pool.shards[1].supervisor = _Ready()  # type: ignore[assignment]
    moves = pool.rebalance(requests)
    assert [(m.key, m.source, m.target) for m in moves] == [("r2", 0, 1)]
    assert requests["r2"].executor == 1 and pool.shards[1].moved_in == 1
    assert second.sequence("r2").seq_id == requests["r2"].seq_id == 2
    assert [len(first.scheduler.waiting), len(second.scheduler.waiting)] == [0, 1]
    assert [sum(e.scheduler.policy.service.unfinished.values()) for e in pool.engines] == [2, 1]
    # a new request in engine 1 gets an id no engine used
    second.add_request([5, 6], sampling=SamplingParams(max_tokens=1), request_id="r3")
    assert second.sequence("r3").seq_id == 3
    plan = second.begin_step()
    assert plan is not None and sorted(c.seq_id for c in plan.chunks) == [2, 3] and plan.adapter_loads[0].name == "qa"


def test_waiting_requests_leave_an_executor_whose_step_runs_past_overdue_s(model_dir) -> None:
    """A hung or stopped executor is up until the step timeout kills it: an outside probe saw
    requests wait 10-12 s on a SIGSTOPped one (overdue_s 5) while the other served. A step
    running past overdue_s now counts as not ready, and its waiting requests move."""
    import time
    from types import SimpleNamespace

    from inlaid.scheduling.registry import make_policy
    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.requests import ActiveRequest

    pool = ExecutorPool(_config(model_dir, count=2, overdue_s=2.0), lambda: make_policy("fifo"))
    first, _ = pool.engines
    pool.shards[0].supervisor = pool.shards[1].supervisor = _Ready()  # type: ignore[assignment]
    first.add_request([1, 2, 3], sampling=SamplingParams(max_tokens=4), request_id="r0")
    requests = {"r0": ActiveRequest(key=(b"c", "r0"), engine_id="r0", seq_id=first.sequence("r0").seq_id, task=None,
                                    stream=False, num_prompt_tokens=3)}
    loop = SimpleNamespace(executing_since=time.monotonic(), work=SimpleNamespace(set=lambda: None))
    pool.shards[0].step_loop = loop  # type: ignore[assignment]
    assert pool.rebalance(requests) == []  # a step just sent: r0 waits where it can run
    loop.executing_since = time.monotonic() - 3.0  # the step has run past overdue_s
    assert [(m.key, m.source, m.target) for m in pool.rebalance(requests)] == [("r0", 0, 1)]
    assert requests["r0"].executor == 1


class _Ready:
    """A supervisor whose executor is up (the pool reads only `ready`)."""

    class _Event:
        def is_set(self) -> bool:
            return True

    ready = _Event()


def test_ray_config_section_checks_before_anything_starts(model_dir, tmp_path) -> None:
    from inlaid.integrations.ray_config import ray_config_from_dict

    base = {"model": {"dir": str(model_dir)}, "tasks": {"qa": str(ADAPTERS / "qa")},
            "server": {"admin_token_env": "UNSET_FOR_THE_REPLICAS"}}
    config = ray_config_from_dict({**base, "ray": {"num_replicas": 3, "max_tasks_per_replica": 2, "num_gpus": 1}})
    assert config.scaling_options() == {"num_replicas": 3}
    assert config.replica_actor_options() == {"num_cpus": 1.0, "num_gpus": 1}
    assert "admin_token_env" not in config.server["server"]  # each replica is its server's admin
    scaled = ray_config_from_dict({**base, "ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}})
    assert scaled.scaling_options() == {"num_replicas": "auto",
                                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    assert scaled.max_replicas() == 4
    for bad, words in [({"ray": {"replicas": 2}}, "unknown keys"), ({"ray": {"num_replicas": 0}}, "num_replicas"),
                       ({"ray": {"max_tasks_per_replica": 0}}, "max_tasks_per_replica"),
                       ({"ray": {"num_gpus": -1}}, "num_gpus"), ({"metrics": {"port": 9000}}, "per server"),
                       ({"tasks": {"qa": str(tmp_path / "missing")}}, "not found"),
                       ({"ray": {"http_host": "0.0.0.0"}}, "not a loopback"),
                       # Numbers Ray itself would refuse only after connecting, with a traceback.
                       ({"ray": {"max_ongoing_requests": 0}}, "max_ongoing_requests"),
                       ({"ray": {"ingress_replicas": 0}}, "ingress_replicas"),
                       ({"ray": {"health_check_period_s": -1}}, "health_check_period_s"),
                       ({"ray": {"health_check_period_s": float("nan")}}, "health_check_period_s"),
                       ({"ray": {"replica_start_timeout_s": -5}}, "replica_start_timeout_s"),
                       ({"ray": {"replica_start_timeout_s": "60"}}, "replica_start_timeout_s"),
                       ({"ray": {"route_prefix": "v1"}}, "route_prefix"), ({"ray": {"app_name": ""}}, "app_name"),
                       # A missing model is otherwise found by every replica's failed start.
                       ({"model": {"dir": str(tmp_path / "no-model")}}, "model.dir: model directory not found"),
                       ({"model": {"dir": str(tmp_path)}}, "no config.json"),
                       ({"model": {"dir": str(model_dir), "quantized_dir": str(tmp_path / "no-q")}},
                        "model.quantized_dir")]:
        with pytest.raises(ConfigError, match=words):
            ray_config_from_dict({**base, **bad})


def test_each_executor_gets_its_own_policy_sharing_one_length_model(model_dir) -> None:
    from inlaid.serve.cli import _policies
    from inlaid.serve.executor_pool import ExecutorPool

    config = config_from_dict({"model": {"dir": str(model_dir)}, "executors": {"count": 3},
                               "server": {"policy": "inlaid"}})
    policies = [engine.scheduler.policy for engine in ExecutorPool(config, _policies(config)).engines]
    assert len({id(p) for p in policies}) == 3
    assert len({id(p.length_model) for p in policies}) == 1


def test_ray_replicas_get_the_executors_and_scheduler_sections_with_absolute_paths(model_dir, tmp_path) -> None:
    """docs/scale-out.md: each replica runs `inlaid serve` with the config's [model],
    [executor], [executors] and [server] sections (and [scheduler]); they were dropped
    silently (a replica reserving 2 GPUs ran one executor). What a replica would write to its
    server.toml, read back from another folder, is the same server."""
    import tomllib

    from inlaid.integrations.ray_config import ray_config_from_dict
    from inlaid.serve.launcher import to_toml

    (tmp_path / "conf").mkdir()
    (tmp_path / "replica").mkdir()
    cost_model = Path(__file__).resolve().parents[1] / "bench" / "results" / "sched_cost_model.json"
    raw = {"model": {"dir": str(model_dir)}, "tasks": {"qa": str(ADAPTERS / "qa")},
           "executors": {"count": 2}, "server": {"policy": "inlaid"},
           "scheduler": {"max_wait_s": 30.0, "predictor_state": "predictor.npz",
                         "autotune_cost_model": str(cost_model)}}
    config = ray_config_from_dict(raw, base_dir=tmp_path / "conf")
    assert config.server["executors"] == {"count": 2}
    assert config.server["scheduler"]["predictor_state"] == str(tmp_path / "conf" / "predictor.npz")
    replica_toml = to_toml({**config.server, "server": {**config.server["server"], "address": "ipc:///tmp/x.ipc"}})
    replica = config_from_dict(tomllib.loads(replica_toml), base_dir=tmp_path / "replica")
    assert replica.executors.count == 2 and replica.policy == "inlaid"
    assert replica.scheduler["max_wait_s"] == 30.0
    assert replica.scheduler["predictor_state"] == str(tmp_path / "conf" / "predictor.npz")
    assert replica.autotune_cost_model == str(cost_model)
    # What one server owns, or a replica never uses, is refused rather than dropped.
    for bad, words in [({"requantizer": {"threads": 1}}, r"\[requantizer\]"),
                       ({"server": {"state_dir": "state"}}, "state_dir"),
                       ({"scheduler": {"step_log": "steps.jsonl"}}, "step_log")]:
        with pytest.raises(ConfigError, match=words):
            ray_config_from_dict({**raw, **bad}, base_dir=tmp_path / "conf")


def test_a_move_the_target_refuses_leaves_the_request_where_it_waited(model_dir, monkeypatch) -> None:
    """The target engine's `put` raising (a plug-in policy's on_arrival) came after the source
    had handed the request over: it was in neither engine, never run nor answered until its
    deadline (a review). It now waits where it was, the move is not tried again for
    REFUSED_MOVE_RETRY_S (rebalanced every 0.1 s, it logged a traceback each time), and it
    moves once the target takes it."""
    from types import SimpleNamespace

    from inlaid.scheduling.registry import make_policy
    from inlaid.serve import executor_pool
    from inlaid.serve.requests import ActiveRequest

    clock = [1000.0]
    monkeypatch.setattr(executor_pool, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    pool = executor_pool.ExecutorPool(_config(model_dir, count=2), lambda: make_policy("fifo"))
    first, second = pool.engines
    pool.shards[0].supervisor = pool.shards[1].supervisor = _Ready()  # type: ignore[assignment]
    requests = {}
    for i in range(3):  # two seats on executor 0: the third waits there
        first.add_request([1, 2, 3 + i], sampling=SamplingParams(max_tokens=4), request_id=f"r{i}")
        requests[f"r{i}"] = ActiveRequest(key=(b"c", f"r{i}"), engine_id=f"r{i}", seq_id=first.sequence(f"r{i}").seq_id,
                                          task=None, stream=False, num_prompt_tokens=3)
    assert first.begin_step() is not None
    arrival, refusals = second.scheduler.policy.on_arrival, []

    def refusing(*args, **kwargs):  # type: ignore[no-untyped-def]
        refusals.append(args)
        raise RuntimeError("a plug-in policy's bug")

    second.scheduler.policy.on_arrival = refusing  # type: ignore[method-assign]
    assert pool.rebalance(requests) == [] and pool.rebalance(requests) == []
    assert len(refusals) == 1  # not tried again yet
    assert first.sequence("r2").seq_id == requests["r2"].seq_id and requests["r2"].executor == 0
    assert [len(first.scheduler.waiting), len(second.scheduler.waiting)] == [1, 0]
    second.scheduler.policy.on_arrival = arrival  # type: ignore[method-assign]
    clock[0] += executor_pool.REFUSED_MOVE_RETRY_S + 0.1
    assert [(m.key, m.source, m.target) for m in pool.rebalance(requests)] == [("r2", 0, 1)]
    assert second.sequence("r2").seq_id == requests["r2"].seq_id
