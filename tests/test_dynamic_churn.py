"""Add/remove churn leaves nothing behind (without processes): the state directory deletes a
task's copies once it is removed and drained, or replaced, and never a configured directory;
every executor's next plan names the adapters it may forget; the executor's host adapter
cache forgets them and stays within its byte budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from inlaid.protocol import BatchPlan, ErrorCode, ExecutorInbound, SamplingParams
from inlaid.serve.config import config_from_dict
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.task_registry import TaskError, TaskRegistry

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


@pytest.fixture(scope="module")
def source_adapter(tmp_path_factory) -> Path:
    """A private copy of a committed adapter: nothing here may touch adapters/."""
    return Path(shutil.copytree(ADAPTERS / "qa", tmp_path_factory.mktemp("src") / "qa"))


def _server(model_dir: Path, state: Path | None, executors: int = 1, tasks: dict[str, str] | None = None):
    """The coordinator's task side as coordinator.py wires it: pool engines, registry, DynamicTasks."""
    server = {"state_dir": str(state)} if state is not None else {}
    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": server,
                               "executors": {"count": executors}, "tasks": tasks or {},
                               "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}})
    pool = ExecutorPool(config, lambda: None)
    registry = TaskRegistry(pool.engines, "token")
    for name, adapter_dir in config.tasks.items():
        registry.add(name, adapter_dir)
    return pool, registry, DynamicTasks(config, registry, wake=lambda: None)


def _copies(state: Path) -> list[str]:
    return [p.name for kind in ("adapters", "calibration") for p in sorted((state / kind).iterdir())]


class _Requests:
    """Requests the way in_flight.py counts them: the engine holds the sequence, the registry its task."""

    def __init__(self, registry: TaskRegistry) -> None:
        self.registry = registry
        self.count = 0

    def start(self, engine, task: str | None) -> str:  # type: ignore[no-untyped-def]
        self.count += 1
        engine_id = f"r{self.count}"
        engine.add_request([1, 2, 3], sampling=SamplingParams(max_tokens=4), adapter=task, request_id=engine_id)
        self.registry.request_started(task)
        return engine_id

    def end(self, engine, engine_id: str, task: str | None) -> None:  # type: ignore[no-untyped-def]
        engine.abort(engine_id)
        self.registry.request_ended(task)


def _step(engine) -> BatchPlan:  # type: ignore[no-untyped-def]
    plan = engine.begin_step()
    assert plan is not None
    # what the executor decodes (a defaulted field must survive the wire)
    decoded = msgspec.msgpack.Decoder(ExecutorInbound).decode(msgspec.msgpack.encode(plan))
    assert decoded == plan
    return plan


def test_removed_task_copies_go_once_drained_and_every_executor_forgets_it(model_dir, tmp_path, source_adapter):
    state = tmp_path / "state"
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text('{"messages": [{"role": "user", "content": "hi"}], "reference": "hello"}\n')
    pool, registry, dynamic = _server(model_dir, state, executors=2)
    requests = _Requests(registry)
    dynamic.add(dynamic.prepare("qa", str(source_adapter), str(calibration)))
    copy = registry.tasks["qa"]
    assert Path(copy).parent == state / "adapters" and len(_copies(state)) == 2  # adapter + calibration
    # used on both executors, then removed while a request is still in flight on executor 1
    first, second = pool.engines
    r1 = requests.start(first, "qa")
    r2 = requests.start(second, "qa")
    assert [load.path for load in _step(first).adapter_loads] == [copy]
    assert [load.path for load in _step(second).adapter_loads] == [copy]
    requests.end(first, r1, "qa")
    dynamic.remove("qa")
    # draining: a request is still in flight with it
    assert "qa" in registry.draining and Path(copy).is_dir() and len(_copies(state)) == 2
    requests.end(second, r2, "qa")
    assert _copies(state) == [] and source_adapter.is_dir()  # drained: the copies go, the source stays
    # each executor forgets it at its next plan, and only once
    for engine in pool.engines:
        engine_id = requests.start(engine, None)
        assert _step(engine).adapter_drops == [copy]
        requests.end(engine, engine_id, None)
        engine_id = requests.start(engine, None)
        assert _step(engine).adapter_drops == []
        requests.end(engine, engine_id, None)
    # removed while idle: gone at once
    dynamic.add(dynamic.prepare("qa", str(source_adapter), None))
    assert len(_copies(state)) == 1
    dynamic.remove("qa")
    assert _copies(state) == []


def test_replaced_task_copy_goes_once_its_requests_ended(model_dir, tmp_path, source_adapter):
    state = tmp_path / "state"
    pool, registry, dynamic = _server(model_dir, state)
    engine = pool.engines[0]
    requests = _Requests(registry)
    dynamic.add(dynamic.prepare("qa", str(source_adapter), None))
    old = registry.tasks["qa"]
    engine_id = requests.start(engine, "qa")
    assert [load.path for load in _step(engine).adapter_loads] == [old]
    # the same files again change nothing, in flight or not: no copy, no replacement
    assert "already serves" in dynamic.add(dynamic.prepare("qa", str(source_adapter), None))
    assert registry.tasks["qa"] == old and _copies(state) == [Path(old).name]
    # a replacement (other files) while a request is in flight is refused, and its own copy discarded
    other = ADAPTERS / "code"
    with pytest.raises(TaskError) as refused:
        dynamic.add(dynamic.prepare("qa", str(other), None))
    assert refused.value.code == ErrorCode.TASK_BUSY and _copies(state) == [Path(old).name]
    requests.end(engine, engine_id, "qa")
    dynamic.add(dynamic.prepare("qa", str(other), None))
    new = registry.tasks["qa"]
    assert new != old and _copies(state) == [Path(new).name]
    engine_id = requests.start(engine, "qa")
    plan = _step(engine)
    assert plan.adapter_drops == [old] and [load.path for load in plan.adapter_loads] == [new]
    requests.end(engine, engine_id, "qa")
    # a restart keeps the live task's copy (and collects nothing else)
    _, registry_again, _ = _server(model_dir, state)
    assert registry_again.tasks == {"qa": new} and _copies(state) == [Path(new).name]


def test_configured_adapter_directories_are_never_deleted(model_dir, tmp_path, source_adapter):
    state = tmp_path / "state"
    configured = Path(shutil.copytree(source_adapter, tmp_path / "configured"))
    pool, registry, dynamic = _server(model_dir, state, tasks={"qa": str(configured), "other": str(configured)})
    dynamic.remove("other")  # the same directory still serves "qa"
    dynamic.add(dynamic.prepare("qa", str(source_adapter), None))  # replaces the configured "qa"
    dynamic.remove("qa")
    assert sorted(p.name for p in configured.iterdir()) == sorted(p.name for p in source_adapter.iterdir())
    assert _copies(state) == []


# ---------------------------------------------------------------- the executor's host cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_dir):
    pytest.importorskip("peft")
    from tiny_llama import make_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model", model_dir, layers=2)
    return model, [str(make_adapter(model, root / f"adapter_{i}", seed=i + 1)) for i in range(3)]


def _runner(model: Path, **cache):  # type: ignore[no-untyped-def]
    from inlaid.engine.config import EngineConfig
    from inlaid.engine.runner import ModelRunner

    return ModelRunner(EngineConfig(model_dir=str(model), dtype="float32", num_kv_blocks=8, block_size=8,
                                    max_lora_slots=2, max_lora_rank=4, pack_weights=False), **cache)


def test_host_cache_forgets_dropped_adapters_and_keeps_its_byte_budget(tiny):
    model, (a, b, c) = tiny
    runner = _runner(model)
    # the default budget: two slot pools (every projection at the pool's rank, float32)
    per_slot = sum(linear.in_features + linear.out_slices[index] for linear, index in runner.linears.values())
    assert runner.host_adapters.max_bytes == 2 * 2 * 4 * per_slot * 4
    runner.load_adapter(0, "a", a)
    one = runner.host_adapters.nbytes
    runner.load_adapter(1, "b", b)
    assert runner.host_adapters.paths == [a, b] and runner.host_adapters.nbytes == 2 * one > 0
    # a plan's drops go before its loads: "a" is read afresh, "b" is forgotten
    runner.execute(BatchPlan(step_id=0, chunks=[], adapter_drops=[b, "/never/loaded"]))
    assert runner.host_adapters.paths == [a] and runner.host_adapters.nbytes == one
    runner.forget_adapters([a])
    assert runner.host_adapters.paths == [] and runner.host_adapters.nbytes == 0
    # a budget of two adapters keeps the two most recently loaded
    small = _runner(model, host_adapter_cache_bytes=2 * one)
    for slot, path in enumerate((a, b, c, a)):
        small.load_adapter(slot % 2, "x", path)
    assert small.host_adapters.paths == [c, a] and small.host_adapters.nbytes == 2 * one
    # one over the budget alone stays (it is being installed); the next one replaces it
    tight = _runner(model, host_adapter_cache_bytes=one // 2)
    tight.load_adapter(0, "a", a)
    tight.load_adapter(1, "b", b)
    assert tight.host_adapters.paths == [b] and tight.host_adapters.nbytes == one


def test_an_adapter_changed_between_its_check_and_its_copy_is_refused(model_dir, tmp_path, source_adapter):
    # Found by an outside probe: AddTask checked the source directory, then copied it, so an
    # adapter rewritten in between (here: NaN weights, by a writer racing the copy) was
    # registered and every request to it failed. The copy is what is served: it is checked.
    import asyncio

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from inlaid.protocol import AddTask, AdminReply, ErrorReply
    from inlaid.serve.admin import TaskCalls

    adapter = Path(shutil.copytree(source_adapter, tmp_path / "racy"))
    weights_file = adapter / "adapter_model.safetensors"
    good = weights_file.read_bytes()
    state = tmp_path / "state"
    _, registry, dynamic = _server(model_dir, state)
    replies: list = []
    calls = TaskCalls(registry, lambda identity, message: replies.append(message), dynamic)
    checked_copy = dynamic.prepare

    def prepare_while_a_writer_poisons_the_source(*args):  # the race, made deterministic
        weights = load_file(weights_file)
        weights = {name: np.full_like(value, np.nan) for name, value in weights.items()}
        save_file(weights, weights_file)
        return checked_copy(*args)

    dynamic.prepare = prepare_while_a_writer_poisons_the_source
    asyncio.run(calls._add(b"client", AddTask(request_id="a1", name="racy", adapter_dir=str(adapter), token="token")))
    assert isinstance(replies[-1], ErrorReply) and replies[-1].code == ErrorCode.INVALID_REQUEST, replies
    assert "changed while it was being added" in replies[-1].message and "finite" in replies[-1].message.lower()
    assert "racy" not in registry.tasks and _copies(state) == []  # nothing half-registered, no copy left
    weights_file.write_bytes(good)  # once the writer is done, the add goes through
    dynamic.prepare = checked_copy
    asyncio.run(calls._add(b"client", AddTask(request_id="a2", name="racy", adapter_dir=str(adapter), token="token")))
    assert isinstance(replies[-1], AdminReply) and "racy" in registry.tasks


def test_adds_and_removals_that_arrive_during_the_shutdown_are_refused(model_dir, tmp_path, source_adapter):
    """The front reads frames until the very end of the shutdown: an AddTask arriving after the
    drain was taken, then cancelled without a reply (or, done in time, saved and submitted to
    a requantizer already stopped). Refused now, saying nothing changed; a status still answers."""
    from inlaid.protocol import AddTask, ErrorReply, RemoveTask, TaskStatus
    from inlaid.serve.admin import TaskCalls

    _, registry, dynamic = _server(model_dir, tmp_path / "state")
    replies: list = []
    accepting = [False]
    calls = TaskCalls(registry, lambda identity, message: replies.append(message), dynamic, lambda: accepting[0])
    calls.admin(b"c", AddTask(request_id="a", name="late", adapter_dir=str(source_adapter), token="token"))
    calls.admin(b"c", RemoveTask(request_id="r", name="late", token="token"))
    assert [(r.code, r.message) for r in replies] == [
        (ErrorCode.SHUTTING_DOWN, "the server is shutting down: task 'late' was not added; add it once the server "
                                  "is back"),
        (ErrorCode.SHUTTING_DOWN, "the server is shutting down: task 'late' was not removed; remove it once the "
                                  "server is back")]
    assert all(isinstance(r, ErrorReply) for r in replies) and not calls.pending and "late" not in registry.tasks
    calls.admin(b"c", TaskStatus(request_id="s", name="late", token="token"))
    assert replies[-1].request_id == "s" and replies[-1].code == ErrorCode.UNKNOWN_TASK  # answered as ever


def test_status_of_a_task_added_without_a_state_dir_says_so(model_dir, source_adapter):
    # Found by an outside probe: it said "served from the server config" of a task added live.
    _, registry, dynamic = _server(model_dir, None)
    dynamic.add(dynamic.prepare("live", str(source_adapter), None))
    # a full-precision base: nothing to re-quantize (it spoke of a checkpoint the server lacks)
    assert dynamic.status("s1", "live").message == "served on the full-precision base: there is nothing to re-quantize"
    dynamic.config.engine.quantized_dir = "/models/q"  # as a 4-bit server without a state directory
    message = dynamic.status("s1", "live").message
    assert "without server.state_dir nothing is re-quantized" in message and "server config" not in message
