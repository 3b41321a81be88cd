"""The state directory and what it feeds the executor and the requantizer, against the
defects an outside probe found: a registry that is no regular file, or missing
beside stored files, wiped every stored adapter and layer; wrong-typed registry fields became
plans nothing could decode (resent forever); corrupted layer files were swapped in; a task
unserved at one restart stayed failed; calibration files were read whole and never bounded;
a cancel waited for the layer's end; a live task silently shadowed the config's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import msgspec
import pytest

from inlaid.serve.task_records import QUEUED, REQUANTIZING, RESTARTED, CommittedLayer, TaskRecord
from inlaid.serve.task_store import StateDirError, TaskStore

BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}
ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
SAMPLE = {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"}


def _stored_state(root: Path) -> tuple[TaskStore, list[Path]]:
    """A state directory with a task (adapter and calibration copies) and a committed layer."""
    source = root.parent / "source"
    source.mkdir(exist_ok=True)
    (source / "adapter_config.json").write_text("{}")
    (source / "calib.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    store = TaskStore(root, BASE)
    adapter, calibration = store.copy_inputs("code", str(source), str(source / "calib.jsonl"))
    store.tasks["code"] = TaskRecord(name="code", adapter_dir=adapter, calibration=calibration, phase=REQUANTIZING,
                                     version=1, layers_done=1, layers_total=30)
    layer = store.layers_dir / "layer_000.v1.safetensors"
    layer.write_bytes(b"layer bytes")
    store.layers[0] = CommittedLayer(version=1, file=str(layer), sha256=hashlib.sha256(b"layer bytes").hexdigest())
    store.save()
    return store, [Path(adapter) / "adapter_config.json", Path(calibration), layer]


# ---------------------------------------------------------------- defect 1: nothing deleted on a guess
@pytest.mark.parametrize("kind", ["broken link", "link loop", "directory"])
def test_a_registry_that_is_no_regular_file_is_refused_and_nothing_deleted(tmp_path, kind):
    root = tmp_path / "state"
    _, files = _stored_state(root)
    registry = root / "registry.json"
    registry.unlink()
    if kind == "broken link":
        registry.symlink_to(tmp_path / "nowhere.json")
    elif kind == "link loop":
        registry.symlink_to(root / "loop.json")
        (root / "loop.json").symlink_to(registry)
    else:
        registry.mkdir()
    with pytest.raises(StateDirError, match=r"registry.json is unreadable: .*not a regular file"):
        TaskStore(root, BASE)
    assert all(file.exists() for file in files)  # the old code collected every one of them
    assert os.path.lexists(registry) and (kind != "directory" or registry.is_dir())


def test_a_missing_registry_beside_stored_files_is_refused(tmp_path):
    root = tmp_path / "state"
    _, files = _stored_state(root)
    (root / "registry.json").unlink()
    with pytest.raises(StateDirError, match=r"registry.json is missing .*1 in adapters/, 1 in calibration/, "
                                            r"1 in quant/layers/.*Restore it"):
        TaskStore(root, BASE)
    assert all(file.exists() for file in files)
    TaskStore(tmp_path / "fresh", BASE)  # an empty (or new) state directory is a fresh state


# ---------------------------------------------------------------- defect 2: typed registry, loud decoders
@pytest.mark.parametrize("path, value, named", [
    (("layers", "0", "version"), None, r"layers.0: Expected `int`, got `null` - at `\$.version`"),
    (("tasks", "code", "layers_done"), "x", r"tasks.code: Expected `int`, got `str` - at `\$.layers_done`"),
    (("tasks", "code", "decisions"), [{"layer": "0"}], r"tasks.code: .* at `\$.decisions\[0\]"),
    (("tasks", "code", "phase"), "bogus", r"tasks.code: phase 'bogus'"),
    (("tasks", "code", "layers_done"), 31, r"tasks.code: layers_done 31 > layers_total 30"),
    (("tasks", "code", "name"), "other", r"tasks.code: its name is 'other'"),
    (("next_version",), "2", r"next_version: Expected `int`"),
])
def test_wrong_typed_registry_fields_are_refused_naming_the_entry(tmp_path, path, value, named):
    root = tmp_path / "state"
    _, files = _stored_state(root)
    raw = json.loads((root / "registry.json").read_text())
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (root / "registry.json").write_text(json.dumps(raw))
    with pytest.raises(StateDirError, match="registry.json is unreadable: ValueError: " + named) as refused:
        TaskStore(root, BASE)
    assert "Restore it from a backup, or move the state directory aside" in str(refused.value)  # what to do
    assert all(file.exists() for file in files)


def test_the_executor_answers_a_plan_it_cannot_decode(monkeypatch):
    """It logged and dropped it: the step then timed out, the executor was killed and its
    successor got the same plan, forever, with health ok."""
    import threading

    import zmq

    import inlaid.engine.runner
    from inlaid.protocol import ExecutorFailure, ExecutorHello, ExecutorShutdown
    from inlaid.serve import executor

    class Runner:  # the loop's view of a ModelRunner; this plan never reaches it
        device = None

        def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
            pass

    monkeypatch.setattr(inlaid.engine.runner, "ModelRunner", Runner)
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=18600, max_port=18699)
    config = type("Config", (), {"num_kv_blocks": 1})()
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(executor.serve(
        f"tcp://127.0.0.1:{port}", 3, config, os.getppid())), daemon=True)  # type: ignore[arg-type]
    thread.start()
    try:
        decoder = msgspec.msgpack.Decoder(ExecutorHello | ExecutorFailure)
        assert router.poll(20_000)
        identity, hello = router.recv_multipart()
        assert isinstance(decoder.decode(hello), ExecutorHello)
        router.recv_multipart()  # its first stats
        bad = {"type": "batch_plan", "step_id": 7, "chunks": [],
               "layer_swaps": [{"layer": 0, "version": None, "handle": {"transport": "file", "name": "f"}}]}
        router.send_multipart([identity, msgspec.msgpack.encode(bad)])
        assert router.poll(20_000)
        answer = decoder.decode(router.recv_multipart()[1])
        assert isinstance(answer, ExecutorFailure) and answer.step_id == 7
        assert "layer_swaps[0].version" in answer.message
        router.send_multipart([identity, msgspec.msgpack.encode(ExecutorShutdown())])
        thread.join(20)
        assert exit_codes == [0]
    finally:
        router.close(linger=0)


# ---------------------------------------------------------------- the requantizer's channel (defects 2, 5d)
@pytest.fixture()
def channel():  # type: ignore[no-untyped-def]
    import zmq

    from inlaid.serve.requantizer import _Channel

    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=18600, max_port=18699)
    requantizer = _Channel(f"tcp://127.0.0.1:{port}", 5, os.getppid())
    requantizer.send(_hello())
    assert router.poll(20_000)
    identity, _ = router.recv_multipart()

    def send(message: object) -> None:
        router.send_multipart([identity, msgspec.msgpack.encode(message)])

    def receive() -> object:
        from inlaid.protocol import JobFinished

        assert router.poll(20_000)
        return msgspec.msgpack.decode(router.recv_multipart()[1], type=JobFinished)

    yield requantizer, send, receive
    requantizer.sock.close(linger=0)
    router.close(linger=0)


def _hello():  # type: ignore[no-untyped-def]
    from inlaid.protocol import RequantizerHello

    return RequantizerHello(protocol_version=1, generation=5, pid=os.getpid(), threads=1, niceness=0,
                            idle_priority=False)


def test_the_requantizer_fails_a_job_it_cannot_decode(channel):
    requantizer, send, receive = channel
    send({"type": "requantize_job", "job_id": "code@v1", "start_layer": "x"})
    assert requantizer.receive() is None
    finished = receive()
    assert (finished.job_id, finished.ok) == ("code@v1", False) and "start_layer" in finished.error


def test_a_cancel_stops_the_job_after_the_current_input_group(channel, monkeypatch, tmp_path):
    """The cancel was read only between layers: a removed task's job ran its layer out."""
    import inlaid.quant.incremental
    from inlaid.protocol import CancelJob, LayerCommitted, RequantizeJob
    from inlaid.serve.requantizer import _Stop, run_job

    requantizer, send, _ = channel
    groups: list[int] = []

    class Quantizer:  # four input groups a layer, `pace` after each, as IncrementalQuantizer does
        def __init__(self, *args, pace=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.pace = pace

        def layers(self, start: int):  # type: ignore[no-untyped-def]
            for group in range(4):
                groups.append(group)
                if group == 0:
                    send(LayerCommitted(job_id="other@v9", layer=0, swapped=True))  # not for it: kept
                    send(CancelJob(job_id="code@v1"))
                requantizer.sock.poll(5000)  # until the next message has arrived (no more than one group late)
                if self.pace is not None:
                    self.pace()
            raise AssertionError("the layer ran out")
            yield  # pragma: no cover

    monkeypatch.setattr(inlaid.quant.incremental, "IncrementalQuantizer", Quantizer)
    job = RequantizeJob(job_id="code@v1", task="code", adapter_dir=str(tmp_path), calibration=str(tmp_path / "c"),
                        version=1, start_layer=0, model_dir="m", checkpoint_dir="q", served_layers={},
                        state_dir=str(tmp_path), layers_dir=str(tmp_path))
    with pytest.raises(_Stop) as stopped:
        run_job(requantizer, job)
    assert not stopped.value.shutdown and len(groups) <= 2  # it ran all four, and the layer out
    assert requantizer.receive() == LayerCommitted(job_id="other@v9", layer=0, swapped=True)


# ---------------------------------------------------------------- defect 3: committed layers verified
def test_a_committed_layer_records_its_checksum_and_a_changed_file_is_not_restored(tmp_path, caplog):
    from inlaid.protocol import LayerHandle, LayerReady, LayerSwapResult
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.requantization_jobs import RequantizationJobs

    root = tmp_path / "state"
    store, _ = _stored_state(root)
    store.layers.clear()
    store.tasks["code"].layers_done = 0
    layer = store.layers_dir / "layer_000.v1.safetensors"
    layer.write_bytes(b"\x00" * 4096 + b"scales")

    async def commit() -> None:
        jobs = RequantizationJobs(config_from_dict({"server": {"state_dir": str(root)}}), store, 30, lambda: None)
        jobs.current = "code"
        handle = LayerHandle(transport="file", name=str(layer))
        jobs._on_message(LayerReady(job_id="code@v1", layer=0, version=1, handle=handle, file=str(layer),
                                    linears=[], forward_seconds=0.0, quantize_seconds=0.0))
        jobs.take_swaps()  # the digest runs in a worker thread beside the swap, recorded once known
        jobs.on_swap_result(LayerSwapResult(layer=0, version=1, ok=True))
        for _ in range(200):
            if store.layers[0].sha256:
                break
            await asyncio.sleep(0.05)

    asyncio.run(commit())
    recorded = json.loads((root / "registry.json").read_text())["layers"]["0"]
    assert recorded["sha256"] == hashlib.sha256(layer.read_bytes()).hexdigest()
    assert TaskStore(root, BASE).layers[0].sha256 == recorded["sha256"]  # intact: restored

    with open(layer, "r+b") as handle:  # 4096 random bytes into the qweight region
        handle.write(os.urandom(4096))
    with caplog.at_level(logging.ERROR, logger="inlaid.dynamic_tasks"):
        restarted = TaskStore(root, BASE)
    assert 0 not in restarted.layers
    [logged] = [r for r in caplog.records if r.message.endswith("the checkpoint's layer serves instead")]
    assert "changed after it was committed" in logged.error  # type: ignore[attr-defined]

    assert not layer.exists()  # collected with the other files nothing refers to

    # a registry written before checksums: still loadable, the layer restored (finiteness only)
    layer.write_bytes(b"any bytes")
    raw = json.loads((root / "registry.json").read_text())
    raw["layers"] = {"0": {"version": 1, "file": "quant/layers/" + layer.name}}
    (root / "registry.json").write_text(json.dumps(raw))
    assert TaskStore(root, BASE).layers[0] == CommittedLayer(version=1, file=str(layer), sha256="")


def test_the_executor_refuses_a_layer_with_non_finite_values(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from inlaid.protocol import LayerHandle, LayerSwap
    from inlaid.serve.executor import apply_swap

    scales = torch.ones(4, 8, dtype=torch.float16)
    scales[1, 2] = float("nan")
    save_file({"model.layers.0.mlp.down_proj.scales": scales,
               "model.layers.0.mlp.down_proj.qweight": torch.zeros(4, 8, dtype=torch.int32)},
              str(tmp_path / "layer.safetensors"))

    class Runner:
        swapped: list[int] = []

        def swap_layer(self, layer: int, version: int, tensors: dict) -> None:  # type: ignore[type-arg]
            self.swapped.append(layer)

    runner = Runner()
    swap = LayerSwap(layer=0, version=1, handle=LayerHandle(transport="file", name=str(tmp_path / "layer.safetensors")))
    result = apply_swap(runner, swap)  # type: ignore[arg-type]
    assert not result.ok and "NaN or infinite values in model.layers.0.mlp.down_proj.scales" in result.error
    assert runner.swapped == []  # the old layer keeps serving


# ---------------------------------------------------------------- defects 4 and 6: restarts and the config
def _dynamic(model_dir: Path, state: Path, tasks: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """The coordinator's task side as coordinator.py wires it (a restart = a new one)."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.dynamic_tasks import DynamicTasks
    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.task_registry import TaskRegistry

    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": {"state_dir": str(state)},
                               "tasks": tasks or {}, "executor": {"max_num_seqs": 4, "num_kv_blocks": 64,
                                                                  "max_lora_slots": 2}})
    registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "token")
    for name, adapter_dir in config.tasks.items():
        registry.add(name, adapter_dir)
    return registry, DynamicTasks(config, registry, wake=lambda: None)


def test_a_task_unserved_at_one_restart_resumes_when_its_adapter_is_back(model_dir, tmp_path):
    """It stayed failed ('not served after a restart: ... not found') and its interrupted job
    (10 of 30 layers) never resumed."""
    state = tmp_path / "state"
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text(json.dumps(SAMPLE) + "\n")
    _, dynamic = _dynamic(model_dir, state)
    inputs = dynamic.prepare("code", str(ADAPTERS / "qa"), str(calibration))
    assert dynamic.store is not None
    dynamic.store.tasks["code"] = TaskRecord(name="code", adapter_dir=inputs.adapter_dir, calibration=inputs.calibration,
                                             phase=REQUANTIZING, version=1, layers_done=10, layers_total=30,
                                             message="resuming at layer 10")
    dynamic.store.save()
    shutil.move(inputs.adapter_dir, tmp_path / "away")
    for _ in range(2):  # unserved at two restarts in a row: what it was is kept
        registry, dynamic = _dynamic(model_dir, state)
        record = dynamic.store.tasks["code"]  # type: ignore[union-attr]
        assert "code" not in registry.tasks and record.phase == "failed" and not dynamic.jobs.queue
        assert "not served after a restart" in record.message and "put its adapter back and restart" in record.message
    shutil.move(tmp_path / "away", inputs.adapter_dir)
    registry, dynamic = _dynamic(model_dir, state)
    record = dynamic.store.tasks["code"]  # type: ignore[union-attr]
    assert "code" in registry.tasks and record.phase == QUEUED and list(dynamic.jobs.queue) == ["code"]
    # its message says where the job resumes now, not what the process before said
    assert (record.layers_done, record.message, record.suspended_phase) == (10, f"{RESTARTED}; resuming at layer 10",
                                                                            "")

    # and one that stays unserved can be removed (it was 'unknown task'), its copies with it
    shutil.move(inputs.adapter_dir, tmp_path / "away")
    registry, dynamic = _dynamic(model_dir, state)
    assert "removed (it was not served" in dynamic.remove("code")
    assert "code" not in dynamic.store.tasks and not Path(inputs.calibration).exists()  # type: ignore[union-attr,arg-type]


def test_a_live_addition_under_a_configured_name_is_announced(model_dir, tmp_path, caplog):
    """It silently replaced the config's task, and after a restart the stored copy won."""
    state = tmp_path / "state"
    configured = {"qa": str(ADAPTERS / "qa")}
    registry, dynamic = _dynamic(model_dir, state, configured)
    with caplog.at_level(logging.WARNING, logger="inlaid.dynamic_tasks"):
        # the config's own files again change nothing: no copy, no replacement, nothing announced
        text = dynamic.add(dynamic.prepare("qa", str(ADAPTERS / "qa"), None))
        assert "already serves" in text and "replaces" not in text and not caplog.records, text
        text = dynamic.add(dynamic.prepare("qa", str(ADAPTERS / "code"), None))
    assert f"replaces the config's [tasks] entry ({ADAPTERS / 'qa'}) until it is removed" in text
    assert [r.message for r in caplog.records] == ["a live addition replaces a task of the config's [tasks]"]
    copy = registry.tasks["qa"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inlaid.dynamic_tasks"):
        registry, dynamic = _dynamic(model_dir, state, configured)  # the restart: the stored copy, announced
    assert registry.tasks["qa"] == copy
    assert [r.message for r in caplog.records][0].startswith("a task of the config's [tasks] serves the state")


def test_a_task_replaced_without_calibration_leaves_its_old_adapters_hessians_out(model_dir, tmp_path):
    """Another adapter added under a served name, with no calibration file: the Hessians the
    state held for the name, computed with the adapter it replaced, weighed every later job's
    aggregate (a live probe); they leave it now, as a removal's do, and stay out at restarts,
    also when the config's [tasks] names the task (the live adapter still serves it)."""
    state = tmp_path / "state"
    _, dynamic = _dynamic(model_dir, state)
    store = dynamic.store
    assert store is not None
    (store.hessian_dir / "task_costs.json").write_text(json.dumps({"code": 1.0, "qa": 1.0}))  # the state holds both
    text = dynamic.add(dynamic.prepare("code", str(ADAPTERS / "qa"), None))
    assert store.dropped == [] and "leave the aggregate" not in text  # nothing replaced
    same = dynamic.prepare("code", str(ADAPTERS / "qa"), None)  # the same files again (a new copy): still valid
    text = dynamic.add(same)
    assert same.serves_as_now and not same.hessians_dropped and store.dropped == [] and "aggregate" not in text
    other = dynamic.prepare("code", str(ADAPTERS / "math"), None)
    text = dynamic.add(other)
    assert store.dropped == ["code"] and "computed with the adapter it replaces and leave the aggregate" in text
    assert other.hessians_dropped  # the AdminReply's field, which the HTTP front reads
    # A third adapter under the name: the Hessians left with the second; nothing to say of them again
    # (it said they "were computed with the adapter it replaces": the adapter added just before).
    third = dynamic.prepare("code", str(ADAPTERS / "sentiment"), None)
    text = dynamic.add(third)
    assert store.dropped == ["code"] and "aggregate" not in text and not third.hessians_dropped
    text = dynamic.add(dynamic.prepare("new", str(ADAPTERS / "math"), None))
    assert store.dropped == ["code"] and "leave the aggregate" not in text  # a name the state does not hold
    _, dynamic = _dynamic(model_dir, state, tasks={"code": str(ADAPTERS / "qa"), "qa": str(ADAPTERS / "qa")})
    assert dynamic.store is not None and dynamic.store.dropped == ["code"]  # the old code took it back here
    text = dynamic.add(dynamic.prepare("qa", str(ADAPTERS / "math"), None))  # over the config's entry
    assert dynamic.store.dropped == ["code", "qa"] and "leave the aggregate" in text
