"""What dynamic tasks tell their callers (without processes): a job restored on a server that
cannot run it ends every wait with the reason; busy, removal, resume and failure messages say
what happens and what to do; a caller's relative path is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from inlaid.protocol import JobFinished, LayerReady
from inlaid.serve import dynamic_tasks
from inlaid.serve.config import config_from_dict
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.hessian_sources import HessianSource
from inlaid.serve.requantization_jobs import RequantizationJobs
from inlaid.serve.task_registry import TaskError, TaskRegistry
from inlaid.serve.task_records import FAILED, QUEUED, READY, REQUANTIZING, SERVING, CommittedLayer, Decision, TaskRecord
from inlaid.serve.task_store import TaskStore

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A private copy of a committed adapter: nothing here may touch adapters/."""
    return Path(shutil.copytree(ADAPTERS / "qa", tmp_path_factory.mktemp("src") / "qa"))


def _server(model_dir: Path, state: Path | None, tasks: dict[str, str] | None = None):
    """The coordinator's task side as coordinator.py wires it (as tests/test_dynamic_churn.py)."""
    server = {"state_dir": str(state)} if state is not None else {}
    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": server, "tasks": tasks or {},
                               "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}})
    registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "token")
    for name, adapter_dir in config.tasks.items():
        registry.add(name, adapter_dir)
    return config, registry, lambda: DynamicTasks(config, registry, wake=lambda: None)


def test_a_queued_job_restored_where_the_requantizer_is_off_ends_waits_with_the_reason(
        model_dir, tmp_path, adapter, monkeypatch, caplog):
    state = tmp_path / "state"
    config, registry, _ = _server(model_dir, state)
    # a GPTQ base as the state directory records it (the engines here serve the float model)
    config = replace(config, engine=replace(config.engine, quantized_dir=str(tmp_path / "gptq")))

    def dynamic() -> DynamicTasks:
        return DynamicTasks(config, registry, wake=lambda: None)

    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: "requantizer.enabled is false")
    first = dynamic()  # a fresh state directory, then the job a server left behind
    assert first.store is not None
    first.store.tasks["code"] = TaskRecord(name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"),
                                           phase=REQUANTIZING, version=1, layers_done=5, layers_total=30)
    first.store.save()
    with caplog.at_level("WARNING", logger="inlaid.dynamic_tasks"):
        restarted = dynamic()
    status = restarted.status("r1", "code")
    # wait_task polls until the phase is neither queued nor requantizing: it used to stay queued
    assert status.phase == SERVING and (status.layers_done, status.layers_total) == (5, 30)
    assert "not re-quantized: requantizer.enabled is false" in status.message and "layer 5" in status.message
    assert any("not resumed" in r.getMessage() for r in caplog.records)
    assert not restarted.jobs.queue
    # a restart that can re-quantize resumes it where it stopped
    registry.remove("code")
    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: "")
    again = dynamic()
    record = again.store.tasks["code"]
    assert (record.phase, record.layers_done, list(again.jobs.queue)) == (QUEUED, 5, ["code"])


def test_replacing_a_task_whose_job_is_held_says_the_job_is_dropped(model_dir, tmp_path, adapter, monkeypatch):
    """With the requantizer off, a job a restart found unfinished is held (it resumes at a
    restart that can run it); adding the task again with other files replaced the record and
    the held job with it, and the reply said only "not re-quantized" (an outside probe)."""
    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: "requantizer.enabled is false")
    config, registry, _ = _server(model_dir, tmp_path / "state")
    config = replace(config, engine=replace(config.engine, quantized_dir=str(tmp_path / "gptq")))
    first = DynamicTasks(config, registry, wake=lambda: None)
    first.store.tasks["code"] = TaskRecord(name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"),
                                           phase=REQUANTIZING, version=1, layers_done=5, layers_total=30)
    first.store.save()
    restarted = DynamicTasks(config, registry, wake=lambda: None)
    assert restarted.store.tasks["code"].suspended_phase  # held
    other = Path(shutil.copytree(adapter, tmp_path / "changed"))
    weights = other / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    text = restarted.add(restarted.prepare("code", str(other), None))
    assert ("its unfinished re-quantization (stopped at layer 5 of 30, held until a restart that can run it) is "
            "dropped: this add replaces it") in text, text
    assert not restarted.store.tasks["code"].suspended_phase
    text = restarted.add(restarted.prepare("code", str(adapter), None))  # nothing held any more: nothing said
    assert "unfinished" not in text, text
    # a finished task that could not be served after a restart keeps its phase aside too: no job is held
    restarted.store.tasks["code"] = TaskRecord(name="code", adapter_dir=str(adapter), calibration="", phase=FAILED,
                                               suspended_phase=READY, version=1, layers_done=30, layers_total=30)
    text = restarted.add(restarted.prepare("code", str(other), None))
    assert "unfinished" not in text, text


def test_busy_replacement_says_how_many_and_to_retry(model_dir, tmp_path, adapter):
    second = Path(shutil.copytree(adapter, tmp_path / "qa2"))
    _, registry, dynamic = _server(model_dir, None, tasks={"math": str(adapter)})
    dynamic()  # built as a server builds it beside the registry
    registry.request_started("math")
    with pytest.raises(TaskError) as busy:
        registry.add("math", str(second))
    assert "has 1 request in flight" in busy.value.message and "retry" in busy.value.message
    registry.request_ended("math")


def test_removing_a_config_task_says_it_comes_back_at_the_next_restart(model_dir, tmp_path, adapter, monkeypatch):
    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: "")  # a base it re-quantizes
    _, _, dynamic = _server(model_dir, tmp_path / "state", tasks={"math": str(adapter)})
    text = dynamic().remove("math")
    assert "next restart" in text and str(adapter) in text and "not served" in text
    assert "added again with its calibration file" in text  # how its Hessians rejoin the aggregate


def test_a_callers_relative_paths_are_refused(model_dir, tmp_path, adapter, monkeypatch):
    monkeypatch.chdir(ADAPTERS.parent)  # where "adapters/qa" exists: it used to be served from here
    _, registry, dynamic = _server(model_dir, tmp_path / "state")
    with pytest.raises(TaskError, match="relative: give an absolute path"):
        registry.check_adapter("x", "adapters/qa")
    calibration = tmp_path / "c.jsonl"
    calibration.write_text('{"messages": [{"role": "user", "content": "hi"}], "reference": "yo"}\n')
    monkeypatch.chdir(tmp_path)  # where "c.jsonl" exists
    with pytest.raises(TaskError, match="calibration 'c.jsonl' is relative"):
        dynamic().prepare("x", str(adapter), "c.jsonl")


@pytest.mark.parametrize("failure", ["ENOSPC", "EROFS", "EACCES"])
def test_a_full_state_directory_is_the_servers_fault_not_the_callers_file(model_dir, tmp_path, adapter,
                                                                         monkeypatch, failure):
    """shutil's fast copy names the SOURCE file when the destination's disk is full: an outside
    probe's add on a full state_dir answered "invalid_request: <the adapter's file> cannot be
    read: No space left on device". A source that cannot be read is still the caller's."""
    import errno

    from inlaid.protocol import ErrorCode
    from inlaid.serve.task_store import TaskStore

    code = getattr(errno, failure)

    def copy_fails(self, name, adapter_dir, calibration, *limits):  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code), str(Path(adapter_dir) / "adapter_model.safetensors"))

    monkeypatch.setattr(TaskStore, "copy_inputs", copy_fails)
    _, _, dynamic = _server(model_dir, tmp_path / "state")
    with pytest.raises(TaskError) as refused:
        dynamic().prepare("x", str(adapter), None)
    if failure == "EACCES":  # the caller's file, unreadable since it was checked
        assert refused.value.code == ErrorCode.INVALID_REQUEST and "cannot be read" in refused.value.message
    else:
        assert refused.value.code == ErrorCode.INTERNAL, refused.value.message
        assert "cannot be copied into the state directory" in refused.value.message
        assert f"(copying {adapter}" in refused.value.message and os.strerror(code) in refused.value.message


class _Requantizer:
    ready = True

    async def send(self, message) -> None:  # type: ignore[no-untyped-def]
        pass


def running_job(tmp_path: Path, config: dict | None = None,
                **record_fields: object) -> tuple[RequantizationJobs, TaskStore, TaskRecord]:
    """Task 'code' re-quantizing (version 1, 30 layers) and the jobs running it, the
    requantizer a stand-in that takes every message: what a loss or a JobFinished does to
    them, without processes. Called inside a running event loop (the jobs schedule work)."""
    store = TaskStore(tmp_path / "state", BASE)
    record = store.tasks["code"] = TaskRecord(name="code", adapter_dir="a", calibration="c", phase=REQUANTIZING,
                                              version=1, layers_total=30, **record_fields)  # type: ignore[arg-type]
    jobs = RequantizationJobs(config_from_dict({"server": {"state_dir": "state"}, **(config or {})},
                                               base_dir=tmp_path), store, 30, wake=lambda: None)
    jobs.supervisor = _Requantizer()  # type: ignore[assignment]
    jobs.current = "code"
    return jobs, store, record


def test_resume_and_failure_messages_follow_the_job(tmp_path):
    async def scenario() -> None:
        jobs, _, record = running_job(tmp_path, {"requantizer": {"max_attempts": 2}}, layers_done=11)
        jobs._on_lost("requantizer (pid 7) died (SIGKILL)")
        assert record.message.endswith("resuming at layer 11")
        jobs._on_message(LayerReady(job_id="code@v1", layer=11, version=1, handle=None, file="", linears=[],
                                    forward_seconds=0.1, quantize_seconds=0.1))
        assert record.layers_done == 12 and "resuming" not in record.message  # it has resumed: no longer "will"
        assert "resumed at layer 11" in record.message and "1 of 2" in record.message
        jobs._on_lost("requantizer (pid 8) died (SIGKILL)")  # the second loss of max_attempts = 2
        assert record.phase == FAILED
        assert ("the requantizer was lost 2 times during this task's job, counted across server "
                "restarts (the last: requantizer (pid 8) died (SIGKILL))") in record.message
        assert "add the task again with its calibration file" in record.message and "from layer 0" in record.message
        assert "new version" in record.message
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_failed_job_says_how_to_retry(tmp_path):
    async def scenario() -> None:
        jobs, store, record = running_job(tmp_path)
        store.hessian_sources["code"] = HessianSource(1, "signature", "sha")
        jobs._on_message(JobFinished(job_id="code@v1", ok=False, error="IncrementalError: bad."))
        assert record.phase == FAILED and "bad. To retry, add the task again" in record.message
        assert not store.hessian_sources["code"].complete  # some layers only: its samples match nothing
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_job_that_swapped_nothing_says_the_base_is_unchanged(tmp_path):
    """A tenth task on the 4-bit suite base moved no aggregate past the 1 % threshold: its job
    ended "ready, 0 of 30 layers swapped in", which read as if the base had been re-quantized
    for it (an outside probe). A job that swapped layers says nothing more."""
    def decision(layer: int, action: str) -> Decision:
        return Decision(layer=layer, linear="q_proj", action=action, reason="", change=0.001)

    async def scenario() -> None:
        jobs, store, record = running_job(tmp_path, layers_done=30)
        store.hessian_sources["code"] = HessianSource(1, "signature", "sha")
        record.decisions = [decision(0, "kept-unchanged"), decision(1, "kept-unchanged"), decision(2, "kept-quality")]
        jobs._on_message(JobFinished(job_id="code@v1", ok=True, error=""))
        assert record.phase == READY
        assert store.hessian_sources["code"].complete  # every layer holds its job's Hessians now
        assert record.message == ("0 of 30 layers swapped in; 3 linears kept as served: the base is unchanged (2 of "
                                  "them moved by at most change_threshold, 1.00 %, the rest were kept by the quality "
                                  "gate); the task is served on the base as it was")
        jobs, store, record = running_job(tmp_path / "swapped", layers_done=30)
        record.decisions = [decision(0, "requantized"), decision(1, "kept-unchanged")]
        store.layers[0] = CommittedLayer(version=1, file="layer0.safetensors")
        jobs._on_message(JobFinished(job_id="code@v1", ok=True, error=""))
        assert record.message == "1 of 30 layers swapped in; 1 linears kept as served"
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_job_resumed_after_a_restart_says_so(tmp_path):
    """After a restart its message kept what the last process said ("resumed at layer 24
    after the requantizer was lost") while the job resumed at layer 25 (a live probe)."""
    from inlaid.serve.task_records import RESTARTED

    async def scenario() -> None:
        jobs, _, record = running_job(tmp_path, layers_done=25, message=f"{RESTARTED}; resuming at layer 25")
        jobs._on_message(LayerReady(job_id="code@v1", layer=25, version=1, handle=None, file="", linears=[],
                                    forward_seconds=0.1, quantize_seconds=0.1))
        assert record.message == "resumed at layer 25 after a server restart"

    asyncio.run(scenario())


def test_a_task_on_a_full_precision_server_is_not_said_to_have_layers_to_do(model_dir, tmp_path, adapter, capsys):
    """`add-task --calibration --wait` on a full-precision server printed "serving, layers 0/30"
    and task-status spoke of a checkpoint the server does not have (an outside docs probe)."""
    from inlaid.client.cli import _progress_printer

    _, registry, dynamic = _server(model_dir, None)
    inputs = dynamic().prepare("code2", str(adapter), None)
    dynamic().add(inputs)
    status = dynamic().status("s1", "code2")
    assert status.message == "served on the full-precision base: there is nothing to re-quantize"
    _progress_printer()(status)
    assert capsys.readouterr().err == "code2: serving\n"


def _restarted_with(model_dir: Path, tmp_path: Path, monkeypatch, record: TaskRecord,
                    blocker: str = "") -> DynamicTasks:
    """A GPTQ-base server's task side restarted on a state directory that holds `record`
    (`blocker`: why this server cannot re-quantize, "" when it can)."""
    config, registry, _ = _server(model_dir, tmp_path / "state")
    config = replace(config, engine=replace(config.engine, quantized_dir=str(tmp_path / "gptq")))
    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: blocker)
    first = DynamicTasks(config, registry, wake=lambda: None)
    first.store.tasks[record.name] = record
    first.store.save()
    return DynamicTasks(config, registry, wake=lambda: None)


def test_removing_a_task_whose_job_is_queued_says_so_and_counts_the_cancel(model_dir, tmp_path, adapter, monkeypatch):
    """The removal of a task whose job had not started said "layers already swapped in stay",
    and a cancelled job was counted nowhere: stats and inlaid_requantization_jobs_total had
    only succeeded and failed (an outside probe)."""
    from inlaid.serve.requantizer_status import requantizer_info, requantizer_metrics

    restarted = _restarted_with(model_dir, tmp_path, monkeypatch, TaskRecord(
        name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"), phase=QUEUED, version=1,
        layers_total=30))
    assert list(restarted.jobs.queue) == ["code"] and restarted.jobs.current is None
    text = restarted.remove("code")
    assert "its queued re-quantization is cancelled (it had not started)" in text and "swapped" not in text
    assert not restarted.jobs.queue
    info = requantizer_info(restarted)
    assert (info.jobs_cancelled, info.jobs_succeeded, info.jobs_failed) == (1, 0, 0)
    jobs = next(m for m in requantizer_metrics(restarted) if m.name == "inlaid_requantization_jobs")
    assert {s.labels["outcome"]: s.value for s in jobs.samples if s.name.endswith("_total")} == \
        {"succeeded": 0, "failed": 0, "cancelled": 1}


def test_a_ready_task_added_again_with_its_files_keeps_its_requantization(model_dir, tmp_path, adapter, monkeypatch):
    """Re-adding a ready task with the same files and no calibration kept its Hessians and its
    served layers, but its status read version 0, "added without calibration samples"."""
    dynamic = _restarted_with(model_dir, tmp_path, monkeypatch, TaskRecord(
        name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"), phase=READY, version=4,
        layers_done=30, layers_total=30, message="30 of 30 layers swapped in"))
    inputs = dynamic.prepare("code", str(adapter), None)
    assert inputs.serves_as_now
    text = dynamic.add(inputs)  # its job committed no layer (every linear kept): not said to "still serve"
    assert "its re-quantization (version 4) changed no layer: the base serves as it was" in text, text
    dynamic.store.layers[7] = CommittedLayer(version=4, file=str(tmp_path / "layer_007.v4.safetensors"))
    text = dynamic.add(dynamic.prepare("code", str(adapter), None))
    assert "its re-quantization (version 4) still serves" in text and "hessians" not in text.lower()
    status = dynamic.status("r", "code")
    assert (status.phase, status.version, status.layers_done) == (READY, 4, 30)
    assert "code" not in dynamic.store.dropped
    # other files, no samples: a fresh record (its stored Hessians, were there any, leave the aggregate)
    other = Path(shutil.copytree(adapter, tmp_path / "changed"))
    weights = other / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last weight
    text = dynamic.add(dynamic.prepare("code", str(other), None))
    assert dynamic.status("r", "code").version == 0 and "added without calibration samples" in text


def test_a_task_added_again_where_a_layer_of_its_job_is_not_served_says_how_to_redo_it(
        model_dir, tmp_path, adapter, monkeypatch):
    """A committed layer found damaged at a restart falls back to the checkpoint's; the status
    said "add the task again with its calibration to redo them", and the re-add answered that its
    re-quantization "still serves" and redid nothing (an outside probe)."""
    decisions = [{"layer": layer, "linear": "q_proj", "action": "requantized", "reason": "", "change": 0.02}
                 for layer in (7, 9)]
    dynamic = _restarted_with(model_dir, tmp_path, monkeypatch, TaskRecord(
        name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"), phase=READY, version=4,
        layers_done=30, layers_total=30, message="2 of 30 layers swapped in", decisions=decisions))
    dynamic.store.layers[7] = CommittedLayer(version=4, file=str(tmp_path / "layer_007.v4.safetensors"))
    # layer 9's file was damaged: the checkpoint's layer serves it
    status = dynamic.status("r", "code")
    assert (status.layers_swapped, status.layers_not_served, status.layers_superseded) == (1, 1, 0)
    text = dynamic.add(dynamic.prepare("code", str(adapter), None))
    assert ("its re-quantization (version 4) still serves, but for 1 changed layer not served at its version"
            in text), text
    assert text.endswith("remove the task and add it again with its calibration to redo them"), text
    dynamic.store.layers[9] = CommittedLayer(version=4, file=str(tmp_path / "layer_009.v4.safetensors"))
    assert "but for" not in dynamic.add(dynamic.prepare("code", str(adapter), None))


def test_the_cancel_note_counts_the_layers_a_resumed_job_had_done():
    """A job resumed after a restart is queued with layers done: "it had not started" was said
    of it (a reviewer)."""
    from inlaid.serve.task_status import cancelled_job_note

    def note(phase: str, done: int, swapped: int = 1) -> str:
        return cancelled_job_note(TaskRecord(name="t", adapter_dir="/a", calibration="/c", phase=phase,
                                             layers_done=done, layers_total=30), swapped)

    assert note(QUEUED, 0) == "; its queued re-quantization is cancelled (it had not started)"
    assert note(QUEUED, 5).startswith("; its re-quantization is cancelled after 5 of 30 layers")
    assert note(REQUANTIZING, 0) == "; its re-quantization is cancelled (no layer of it was finished)"
    assert note(REQUANTIZING, 12, 4) == ("; its re-quantization is cancelled after 12 of 30 layers (4 of them "
                                         "re-quantized, and those stay served: each is a valid quantization)")
    # Every layer it had done kept as served: "those stay served" said of nothing (an outside probe).
    assert note(REQUANTIZING, 3, 0) == ("; its re-quantization is cancelled after 3 of 30 layers (none of them "
                                        "had been swapped in: the base is as it was)")


def test_a_ready_task_added_again_with_calibration_where_nothing_re_quantizes_says_so(
        model_dir, tmp_path, adapter, monkeypatch):
    """Kept as ready with the old version's words, it dropped "not re-quantized: ..." (a reviewer)."""
    dynamic = _restarted_with(model_dir, tmp_path, monkeypatch, TaskRecord(
        name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"), phase=READY, version=4,
        layers_done=30, layers_total=30), blocker="requantizer.enabled is false")
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text('{"messages": [{"role": "user", "content": "q"}], "reference": "a"}\n')
    text = dynamic.add(dynamic.prepare("code", str(adapter), str(calibration)))
    assert "not re-quantized: requantizer.enabled is false" in text and "still serves" not in text


def test_a_ready_task_whose_layers_later_jobs_replaced_is_not_said_to_have_changed_none(
        model_dir, tmp_path, adapter, monkeypatch):
    """Re-adding a ready task whose 30 changed layers a later job had all re-quantized again
    answered "changed no layer: the base serves as it was"; its status said 30 superseded
    (an outside probe)."""
    decisions = [{"layer": layer, "linear": "q_proj", "action": "requantized", "reason": "", "change": 0.02}
                 for layer in (3, 5, 7)]
    dynamic = _restarted_with(model_dir, tmp_path, monkeypatch, TaskRecord(
        name="code", adapter_dir=str(adapter), calibration=str(tmp_path / "c"), phase=READY, version=4,
        layers_done=30, layers_total=30, message="3 of 30 layers swapped in", decisions=decisions))
    for layer in (3, 5, 7):  # a later task's job (version 6) re-quantized each of them again
        dynamic.store.layers[layer] = CommittedLayer(version=6, file=str(tmp_path / f"layer_{layer:03d}.v6.st"))
    assert dynamic.status("r", "code").layers_superseded == 3
    text = dynamic.add(dynamic.prepare("code", str(adapter), None))
    assert ("its re-quantization (version 4) serves no layer of its own: the 3 layers it changed now serve "
            "later versions' re-quantization") in text, text
    assert "changed no layer" not in text
    dynamic.store.layers[5] = CommittedLayer(version=4, file=str(tmp_path / "layer_005.v4.st"))  # one its own
    text = dynamic.add(dynamic.prepare("code", str(adapter), None))
    assert ("its re-quantization (version 4) still serves (2 layers it changed now serve later versions' "
            "re-quantization)") in text, text
