"""The state directory's run-time collection (inlaid/serve/state_gc.py), without processes.

A soak probe found layer files piling up in quant/layers while the server ran (collected only
at start-up: 111 files where the registry named 30 after 28 minutes of add/remove churn), and
the registry's `dropped` list growing with every name ever removed. Now the layer files no
registry, job or executor uses go after each save, and `dropped` keeps only the names the
stored Hessian state (or its costs) still holds."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inlaid.protocol import LayerHandle, LayerSwap, LayerSwapResult
from inlaid.quant import task_costs
from inlaid.quant.state import layer_state_path
from inlaid.serve import dynamic_tasks, task_store
from inlaid.serve.config import config_from_dict
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.layer_swaps import _LiveSwap
from inlaid.serve.task_registry import TaskRegistry
from inlaid.serve.task_records import READY, REQUANTIZING, CommittedLayer, TaskRecord

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


class _Requantizer:
    """The requantizer as the jobs see it: running, taking every message."""

    ready = True
    generation = 1
    stopped = False

    async def send(self, message: object) -> None:
        pass


def _dynamic(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executors: int = 1) -> DynamicTasks:
    """The coordinator's task side on a GPTQ base it can re-quantize (as the state directory
    records it: the engines here serve the float model), its requantizer a stand-in."""
    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: "")
    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": {"state_dir": str(tmp_path / "state")},
                               "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}})
    config = replace(config, engine=replace(config.engine, quantized_dir=str(tmp_path / "gptq")))
    registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "token")
    dynamic = DynamicTasks(config, registry, wake=lambda: None)
    dynamic.jobs.executors = executors
    dynamic.jobs._restore = [{} for _ in range(executors)]
    dynamic.jobs.supervisor = _Requantizer()  # type: ignore[assignment]
    return dynamic


def _layer_file(dynamic: DynamicTasks, layer: int, version: int, suffix: str = "safetensors") -> Path:
    assert dynamic.store is not None
    path = dynamic.store.layers_dir / f"layer_{layer:03d}.v{version}.{suffix}"
    path.write_bytes(b"x" * 1000)
    return path


def _running(dynamic: DynamicTasks, name: str, version: int) -> TaskRecord:
    assert dynamic.store is not None
    record = dynamic.store.tasks[name] = TaskRecord(name=name, adapter_dir=str(ADAPTERS / "qa"), calibration="c",
                                                    phase=REQUANTIZING, version=version, layers_total=30)
    dynamic.jobs.current = name
    dynamic.jobs._sent_job = (1, f"{name}@v{version}")
    return record


def _on_disk(dynamic: DynamicTasks) -> set[str]:
    assert dynamic.store is not None
    return {file.name for file in dynamic.store.layers_dir.iterdir()}


def test_a_cancelled_jobs_layer_files_go_and_every_referenced_one_stays(model_dir, tmp_path, monkeypatch, caplog):
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store = dynamic.store
        assert store is not None
        # an earlier job (v1) committed layers 0 and 1 and left layer 2 uncommitted (its task removed)
        for layer in (0, 1):
            store.layers[layer] = CommittedLayer(version=1, file=str(_layer_file(dynamic, layer, 1)))
        _layer_file(dynamic, 2, 1)
        store.save()
        assert _on_disk(dynamic) == {"layer_000.v1.safetensors", "layer_001.v1.safetensors"}  # the orphan went
        # job v2 runs: it committed layer 0 (superseding v1's), has written layer 1, is writing layer 2
        _running(dynamic, "code", 2)
        store.layers[0] = CommittedLayer(version=2, file=str(_layer_file(dynamic, 0, 2)))
        _layer_file(dynamic, 1, 2)
        _layer_file(dynamic, 2, 2, "tmp")
        (store.layers_dir / "notes.txt").write_text("not a job's file: left to start-up")
        store.save()  # a commit's save
        assert _on_disk(dynamic) == {"layer_000.v2.safetensors", "layer_001.v1.safetensors",
                                     "layer_001.v2.safetensors", "layer_002.v2.tmp", "notes.txt"}
        dynamic.remove("code")  # cancelled before its layer 1 reached any executor
        # the requantizer may still be writing its layer 2: nothing of v2 goes yet
        assert {"layer_001.v2.safetensors", "layer_002.v2.tmp"} <= _on_disk(dynamic)
        dynamic.jobs._cancel_taken_up()  # its JobFinished came: no save follows, the periodic pass collects
        monkeypatch.setattr(dynamic_tasks, "SAVE_RETRY_S", 0.01)
        with caplog.at_level(logging.INFO, logger="inlaid.dynamic_tasks"):
            sweeps = asyncio.get_running_loop().create_task(dynamic._retry_unsaved(store))
            await asyncio.sleep(0.1)
            sweeps.cancel()
        # what the job alone could have committed is gone; every committed file stays
        assert _on_disk(dynamic) == {"layer_000.v2.safetensors", "layer_001.v1.safetensors", "notes.txt"}
        assert {Path(entry.file).name for entry in store.layers.values()} == {"layer_000.v2.safetensors",
                                                                             "layer_001.v1.safetensors"}
        deleted = [r for r in caplog.records if r.getMessage().startswith("layer files nothing uses")]
        assert deleted and (deleted[-1].files, deleted[-1].bytes) == (2, 2000)  # type: ignore[attr-defined]
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_queued_jobs_files_stay_until_it_ends(model_dir, tmp_path, monkeypatch):
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store = dynamic.store
        assert store is not None
        # a resumed job (v3, queued behind another) left layer 4 written, not committed
        store.tasks["later"] = TaskRecord(name="later", adapter_dir="a", calibration="c", phase="queued",
                                          version=3, layers_done=4, layers_total=30)
        _layer_file(dynamic, 4, 3)
        store.save()
        assert "layer_004.v3.safetensors" in _on_disk(dynamic)
        store.tasks["later"].phase = READY  # it ended: nothing commits that file any more
        store.save()
        assert not _on_disk(dynamic)
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_file_only_the_unsaved_registry_names_stays_and_none_goes_until_it_is_saved(model_dir, tmp_path,
                                                                                      monkeypatch):
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store = dynamic.store
        assert store is not None
        store.layers[0] = CommittedLayer(version=1, file=str(_layer_file(dynamic, 0, 1)))
        store.save()

        def disk_full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(task_store.os, "fsync", disk_full)
        # a commit of v2 while the directory takes no writes: registry.json still names v1's file
        store.layers[0] = CommittedLayer(version=2, file=str(_layer_file(dynamic, 0, 2)))
        assert not store.save() and store.unsaved
        assert _on_disk(dynamic) == {"layer_000.v1.safetensors", "layer_000.v2.safetensors"}  # a restart needs v1
        monkeypatch.setattr(task_store.os, "fsync", lambda fd: None)
        assert store.save()
        assert _on_disk(dynamic) == {"layer_000.v2.safetensors"}
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_swap_not_yet_done_keeps_its_file(model_dir, tmp_path, monkeypatch):
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch, executors=2)
        store, jobs = dynamic.store, dynamic.jobs
        assert store is not None
        _running(dynamic, "code", 2)
        # layer 3 handed over and sent to executor 0: committed once both answer, even after a cancel
        live = _layer_file(dynamic, 3, 2)
        jobs._live = _LiveSwap(LayerSwap(layer=3, version=2, handle=LayerHandle(transport="shm", name="seg")),
                               str(live), "code@v2", sent_to={0})
        dynamic.remove("code")
        assert live.exists()
        jobs._live.sent_to.add(1)
        for executor in (0, 1):
            jobs.on_swap_result(LayerSwapResult(layer=3, version=2, ok=True), executor=executor)
        assert store.layers[3].file == str(live) and live.exists()
        # a restore owed to executor 1 of a file whose entry a failed restore elsewhere dropped
        restored = _layer_file(dynamic, 5, 1)
        jobs._restore[1] = {5: LayerSwap(layer=5, version=1, handle=LayerHandle(transport="file", name=str(restored)))}
        store.save()
        assert restored.exists()
        jobs.take_swaps(1)  # read now (an executor answers its swaps in order, before anything later)
        store.save()
        assert not restored.exists() and live.exists()
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_cancelled_job_still_computing_keeps_its_version(model_dir, tmp_path, monkeypatch):
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        _running(dynamic, "code", 2)
        dynamic.remove("code")  # mid-layer: it writes its layer before it reads the cancel
        assert dynamic.jobs._cancelling == "code@v2"
        writing = _layer_file(dynamic, 6, 2, "tmp")
        assert dynamic.store is not None and dynamic.store.save() and writing.exists()
        dynamic.jobs._cancel_taken_up()  # its JobFinished came
        dynamic._collect_after_save()
        assert not writing.exists()
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_served_file_the_sent_job_will_read_stays_until_it_ends(model_dir, tmp_path, monkeypatch):
    """A job is sent the served files it reads as it reaches each layer; a commit (here a
    cancelled job's, which its executors answered after the next job was sent) superseding
    one of them must not delete it under the job (a reviewer's sequence: the job failed)."""
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store, jobs = dynamic.store, dynamic.jobs
        assert store is not None
        served = _layer_file(dynamic, 2, 1)
        store.layers[2] = CommittedLayer(version=1, file=str(served))
        store.tasks["next"] = TaskRecord(name="next", adapter_dir=str(ADAPTERS / "qa"), calibration="c",
                                         phase="queued", version=3, layers_total=30)
        jobs.queue.append("next")
        await jobs._dispatch()
        assert jobs._sent_job == (1, "next@v3")
        store.layers[2] = CommittedLayer(version=2, file=str(_layer_file(dynamic, 2, 2)))  # the late commit
        assert store.save()
        assert served.exists()  # "next" reads it when it reaches layer 2
        jobs._finish_current()  # it ended
        dynamic._collect_after_save()
        assert not served.exists() and _on_disk(dynamic) == {"layer_002.v2.safetensors"}
        await asyncio.sleep(0)

    asyncio.run(scenario())


# ---------------------------------------------------------------- dropped
def _write_state(directory: Path, layer: int, tasks: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    entries = {f"h{i}": {"group": group, "task": task, "tokens": 1, "features": 1}
               for i, (group, task) in enumerate((g, t) for g in ("qkv", "mlp") for t in tasks)}
    save_file({key: torch.zeros(1) for key in entries}, str(layer_state_path(directory, layer)),
              metadata={"entries": json.dumps(entries), "forward": "adapter", "layer": str(layer)})


def test_dropped_keeps_only_the_names_the_stored_state_holds(model_dir, tmp_path, monkeypatch):
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store = dynamic.store
        assert store is not None
        num_layers = dynamic.num_layers
        # the checkpoint's state holds alpha and beta; the state directory rewrote layer 0 without beta
        checkpoint = tmp_path / "gptq"
        checkpoint.mkdir()
        (checkpoint / "inlaid_quant.json").write_text(json.dumps({"hessian_state": "hessian_state"}))
        for layer in range(num_layers):
            _write_state(checkpoint / "hessian_state", layer, ["alpha", "beta"])
        _write_state(store.hessian_dir, 0, ["alpha", "gamma"])
        (store.hessian_dir / task_costs.COSTS_FILE).write_text(json.dumps({"alpha": 1.0, "delta": 2.0}))
        store.dropped = ["alpha", "beta", "gamma", "delta", "chat1", "chat2"]
        dynamic.registry.add("chat3", str(ADAPTERS / "qa"))
        dynamic.remove("chat3")  # never held any Hessians, nor chat1/2 (added without calibration)
        assert store.dropped == ["alpha", "beta", "gamma", "delta", "chat3"]  # its own name waits a save
        store.save()
        restarted = DynamicTasks(dynamic.config, dynamic.registry, wake=lambda: None)  # (the store's lock is ours)
        assert restarted.store is not None and restarted.store.dropped == ["alpha", "beta", "gamma", "delta"]
        # a state file it cannot read: nothing is forgotten on a guess
        (checkpoint / "hessian_state" / "layer_001.safetensors").write_bytes(b"\xff" * 4)
        restarted.store.dropped.append("chat4")
        restarted.store.save()
        again = DynamicTasks(dynamic.config, dynamic.registry, wake=lambda: None)
        assert again.store is not None and "chat4" in again.store.dropped
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_the_torch_free_costs_file_name_is_the_quantizers():
    from inlaid.quant import state_files

    assert state_files.COSTS_FILE == task_costs.COSTS_FILE


def test_a_cancelled_job_still_computing_keeps_its_dropped_name(model_dir, tmp_path, monkeypatch):
    """Its set-up writes the task's costs (and a layer's Hessians) before it reads the cancel:
    forgotten meanwhile (another removal's pruning), the name would weigh in every later job."""
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store = dynamic.store
        assert store is not None
        dynamic.registry.add("x", str(ADAPTERS / "qa"))
        _running(dynamic, "x", 2)
        dynamic.remove("x")
        assert dynamic.jobs.cancelling_task == "x"
        dynamic.registry.add("y", str(ADAPTERS / "qa"))
        dynamic.remove("y")  # x's job has not taken its cancel up: still computing
        assert "x" in store.dropped
        dynamic.jobs._cancel_taken_up()
        dynamic.registry.add("z", str(ADAPTERS / "qa"))
        dynamic.remove("z")  # x's job ended, writing nothing: its name may go now
        assert "x" not in store.dropped
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_an_unreadable_layers_directory_ends_neither_a_save_nor_the_retry_loop(model_dir, tmp_path, monkeypatch):
    """The periodic collection runs in the loop that also retries unsaved registries: an
    OSError out of it ended that loop for good (a read-only or vanished directory)."""
    async def scenario() -> None:
        dynamic = _dynamic(model_dir, tmp_path, monkeypatch)
        store = dynamic.store
        assert store is not None

        def unreadable(*args: object) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(task_store, "collect_layer_files", unreadable)
        assert store.save()  # the save itself succeeded
        monkeypatch.setattr(dynamic_tasks, "SAVE_RETRY_S", 0.01)
        sweeps = asyncio.get_running_loop().create_task(dynamic._retry_unsaved(store))
        await asyncio.sleep(0.1)
        assert not sweeps.done(), sweeps.exception() if sweeps.done() else None
        sweeps.cancel()
        await asyncio.gather(sweeps, return_exceptions=True)

    asyncio.run(scenario())
