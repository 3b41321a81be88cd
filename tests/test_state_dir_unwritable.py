"""A state directory that stops taking writes (full disk, read-only remount) under a running
server (an outside probe): admin calls answered "internal server error" though their change
already served, a job's end raised halfway (its JobFinished handler never finished the job),
and a restart then undid what clients had been told was done. Now a failed registry save is
said in the answer ("NOT SAVED", with the path and the errno's words), the state stays in
memory and is written once the directory takes writes again; a copy that fails refuses the
addition naming the state directory and leaves no partial copy. And a task's status counts
its changed layers that no version serves (a committed file found corrupt at a restart)
instead of calling them replaced by later versions."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
from pathlib import Path

import pytest
from test_dynamic_fixes_admin import running_job  # the jobs of one running task, no processes

from inlaid.protocol import ErrorCode, JobFinished
from inlaid.serve import task_store
from inlaid.serve.config import config_from_dict
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.task_registry import TaskError, TaskRegistry
from inlaid.serve.task_records import READY, CommittedLayer, TaskRecord
from inlaid.serve.task_store import TaskStore

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}


def _disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def adapter(tmp_path) -> Path:
    return Path(shutil.copytree(ADAPTERS / "qa", tmp_path / "src" / "qa"))


def _dynamic(model_dir: Path, state: Path) -> DynamicTasks:
    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": {"state_dir": str(state)},
                               "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}})
    return DynamicTasks(config, TaskRegistry(ExecutorPool(config, lambda: None).engines, "token"), wake=lambda: None)


def _stored_tasks(state: Path) -> set[str]:
    return set(json.loads((state / "registry.json").read_text())["tasks"])


def test_admin_calls_on_a_full_state_directory_say_so_and_the_state_is_saved_once_it_can_be(model_dir, tmp_path,
                                                                                            adapter, monkeypatch):
    state = tmp_path / "state"
    dynamic = _dynamic(model_dir, state)
    dynamic.add(dynamic.prepare("qa2", str(adapter), None))
    assert _stored_tasks(state) == {"qa2"} and not dynamic.store.unsaved
    monkeypatch.setattr(task_store.os, "fsync", _disk_full)
    text = dynamic.remove("qa2")
    assert "removed" in text and "NOT SAVED" in text and "No space left on device" in text, text
    assert "registry.json cannot be written" in dynamic.store.unsaved
    assert "qa2" not in dynamic.registry.tasks and _stored_tasks(state) == {"qa2"}  # served as told, not yet on disk
    assert not list(state.glob("registry.json.*tmp"))  # no temporary left behind
    # the registry on disk still names qa2's copy: it stays, so a restart now serves qa2 as
    # the answer says (deleted, the restart brought qa2 back as failed: "put its adapter back")
    kept = [copy.name for copy in (state / "adapters").iterdir()]
    assert len(kept) == 1 and kept[0].startswith("qa2.")
    monkeypatch.setattr(task_store, "copy_bounded", _disk_full)
    with pytest.raises(TaskError) as refused:
        dynamic.prepare("qa3", str(adapter), None)
    assert refused.value.code == ErrorCode.INTERNAL and str(state) in refused.value.message
    assert "No space left on device" in refused.value.message and "nothing was added" in refused.value.message
    assert [copy.name for copy in (state / "adapters").iterdir()] == kept  # no partial copy of qa3
    monkeypatch.undo()

    async def retried() -> None:  # the disk has room again: the retry loop writes the state
        monkeypatch.setattr("inlaid.serve.dynamic_tasks.SAVE_RETRY_S", 0.01)
        await dynamic.start()
        for _ in range(200):
            if not dynamic.store.unsaved:
                break
            await asyncio.sleep(0.01)
        await dynamic.stop()

    asyncio.run(retried())
    assert not dynamic.store.unsaved and _stored_tasks(state) == set()
    # no saved registry names qa2's copy now: it goes with that save, not at the next start
    assert not list((state / "adapters").iterdir())


def test_a_read_only_state_directory_is_a_failed_save_not_an_exception(tmp_path, monkeypatch):
    """On a read-only mount even the cleanup's unlink of the temporary that was never created
    fails (EROFS, not ENOENT): save() raised from its own handler, and nothing said unsaved."""
    store = TaskStore(tmp_path / "state", BASE)
    store.tasks["code"] = TaskRecord(name="code", adapter_dir="a", calibration=None, phase=READY)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(task_store, "open", read_only, raising=False)  # the module's open() of its temporary
    monkeypatch.setattr(task_store.Path, "unlink", read_only)
    assert store.save() is False and "Read-only file system" in store.unsaved
    monkeypatch.undo()
    assert store.save() is True and not store.unsaved
    assert json.loads((tmp_path / "state" / "registry.json").read_text())["tasks"]["code"]["phase"] == READY


def test_a_callers_file_gone_since_its_check_is_the_callers_error(model_dir, tmp_path, adapter, monkeypatch):
    dynamic = _dynamic(model_dir, tmp_path / "state")
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text('{"messages": [{"role": "user", "content": "hi"}], "reference": "yo"}\n')
    copy = task_store.copy_bounded

    def vanished(source: str, target: str, limit: int) -> None:
        if str(source) == str(calibration):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))
        copy(source, target, limit)

    monkeypatch.setattr(task_store, "copy_bounded", vanished)
    with pytest.raises(TaskError) as refused:
        dynamic.prepare("qa4", str(adapter), str(calibration))
    assert refused.value.code == ErrorCode.INVALID_REQUEST and str(calibration) in refused.value.message
    assert "state directory" not in refused.value.message
    assert not list((tmp_path / "state" / "adapters").iterdir())


def test_a_job_ending_while_the_registry_cannot_be_written_still_ends(tmp_path, monkeypatch):
    """Before: the save raised inside the JobFinished handler ("internal error handling a
    requantizer message"): the job stayed current, the queue never moved."""

    async def scenario() -> None:
        jobs, store, record = running_job(tmp_path, layers_done=30)
        jobs.queue.append("code")
        monkeypatch.setattr(task_store.os, "fsync", _disk_full)
        jobs._on_message(JobFinished(job_id="code@v1", ok=True))
        assert record.phase == READY and jobs.current is None and not jobs.queue
        assert jobs.counts.succeeded == 1 and "No space left on device" in store.unsaved
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_status_counts_changed_layers_no_version_serves_apart_from_superseded_ones(model_dir, tmp_path):
    state = tmp_path / "state"
    dynamic = _dynamic(model_dir, state)
    store = dynamic.store
    decisions = [{"layer": layer, "linear": "q_proj", "action": "requantized" if layer < 4 else "kept-unchanged",
                  "reason": "", "change": 0.0} for layer in range(6)]
    store.tasks["code"] = TaskRecord(name="code", adapter_dir="a", calibration="c", phase=READY, version=2,
                                     layers_done=6, layers_total=6, decisions=decisions)
    store.layers = {0: CommittedLayer(version=2, file="l0"), 1: CommittedLayer(version=3, file="l1"),
                    3: CommittedLayer(version=1, file="l3")}  # 2: dropped at a restart (corrupt); 3: an older one
    status = dynamic.status("s", "code")
    assert (status.layers_swapped, status.layers_superseded, status.layers_not_served) == (1, 1, 2), status
