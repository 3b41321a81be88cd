"""The torch-free parts of dynamic tasks, without processes: the state directory (round trip,
refusals, garbage), the [requantizer] config section, the requantizer's pacing, and why a
base cannot be re-quantized."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from inlaid.serve.config import ConfigError, config_from_dict
from inlaid.serve.dynamic_tasks import requantization_blocker
from inlaid.serve.cpu_priority import DutyCycle
from inlaid.serve.task_records import QUEUED, CommittedLayer, TaskRecord
from inlaid.serve.task_store import StateDirError, TaskStore

BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}


def _adapter(directory):
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    return directory


def test_state_round_trip_and_garbage(tmp_path):
    store = TaskStore(tmp_path / "state", BASE)
    adapter, calibration = store.copy_inputs("code", str(_adapter(tmp_path / "a")), str(tmp_path / "a" / "adapter_config.json"))
    assert (Path(adapter) / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads(Path(calibration).read_text()) == {}
    store.tasks["code"] = TaskRecord(name="code", adapter_dir=adapter, calibration=calibration, phase=QUEUED,
                                     version=1, layers_done=2, layers_total=30,
                                     decisions=[{"layer": 0, "linear": "mlp.down_proj", "action": "kept-quality",
                                                 "reason": "r", "change": 0.1}])
    kept = store.layers_dir / "layer_000.v1.safetensors"
    kept.write_bytes(b"x")
    store.layers[0] = CommittedLayer(version=1, file=str(kept))
    store.dropped.append("math")
    store.next_version = 2
    store.save()
    # an orphan copy, an uncommitted layer file: gone at the next start
    orphan, _ = store.copy_inputs("orphan", str(tmp_path / "a"), None)
    stale = store.layers_dir / "layer_001.v1.safetensors"
    stale.write_bytes(b"y")

    again = TaskStore(tmp_path / "state", BASE)
    assert again.tasks["code"] == store.tasks["code"]
    assert again.layers == {0: CommittedLayer(version=1, file=str(kept))}
    assert again.dropped == ["math"] and again.next_version == 2 and again.served_version == 1
    assert not (tmp_path / "state" / "adapters" / orphan.split("/")[-1]).exists() and not stale.exists()
    assert kept.exists() and (tmp_path / "state" / "adapters" / adapter.split("/")[-1]).is_dir()


def test_a_moved_state_directory_uses_its_own_files(tmp_path):
    # Found by an outside probe: registry.json held absolute paths, so a copied or restored
    # state directory silently served the original place's adapter copies and layers.
    import shutil

    store = TaskStore(tmp_path / "state", BASE)
    adapter, calibration = store.copy_inputs("code", str(_adapter(tmp_path / "a")), str(tmp_path / "a" / "adapter_config.json"))
    configured = str(_adapter(tmp_path / "configured"))  # outside the state directory: stays where it is
    store.tasks["code"] = TaskRecord(name="code", adapter_dir=adapter, calibration=calibration, phase=QUEUED)
    store.tasks["own"] = TaskRecord(name="own", adapter_dir=configured, calibration=None, phase=QUEUED)
    layer = store.layers_dir / "layer_000.v1.safetensors"
    layer.write_bytes(b"x")
    store.layers[0] = CommittedLayer(version=1, file=str(layer))
    store.save()
    assert str(tmp_path / "state") not in (tmp_path / "state" / "registry.json").read_text()
    shutil.move(tmp_path / "state", tmp_path / "moved")
    moved = TaskStore(tmp_path / "moved", BASE)
    record = moved.tasks["code"]
    assert record.adapter_dir.startswith(str(tmp_path / "moved")) and Path(record.adapter_dir).is_dir()
    assert record.calibration.startswith(str(tmp_path / "moved")) and Path(record.calibration).is_file()
    assert moved.layers[0].file == str(tmp_path / "moved" / "quant" / "layers" / layer.name)
    assert Path(moved.layers[0].file).read_bytes() == b"x" and moved.tasks["own"].adapter_dir == configured


def test_state_of_another_base_or_corrupt_is_refused(tmp_path):
    TaskStore(tmp_path / "state", BASE).save()
    with pytest.raises(StateDirError, match="another base"):
        TaskStore(tmp_path / "state", {**BASE, "quantized_dir": "/models/other"})
    (tmp_path / "state" / "registry.json").write_text("{broken")
    with pytest.raises(StateDirError, match="unreadable"):
        TaskStore(tmp_path / "state", BASE)
    # Valid JSON of the wrong shape (found by an outside probe: a traceback at start-up), or
    # another format version (it was read, then rewritten as format 1).
    TaskStore(tmp_path / "other", BASE).save()
    good = json.loads((tmp_path / "other" / "registry.json").read_text())
    for wrong, match in [([1, 2], "unreadable: ValueError"),
                         ({**good, "tasks": [1, 2]}, "unreadable: ValueError: tasks: a JSON object was expected"),
                         ({**good, "tasks": {"t": 3}}, "unreadable: ValueError: tasks.t: Expected `object`, got `int`"),
                         ({**good, "format": 99}, "format 99")]:
        (tmp_path / "state" / "registry.json").write_text(json.dumps(wrong))
        with pytest.raises(StateDirError, match=match):
            TaskStore(tmp_path / "state", BASE)


def test_requantizer_section(tmp_path):
    config = config_from_dict({"server": {"state_dir": "state"}, "requantizer": {"threads": 2, "change_threshold": 0,
                                                                                 "idle_priority": False}},
                              base_dir=tmp_path)
    assert config.state_dir == str(tmp_path / "state")
    assert (config.requantizer.threads, config.requantizer.change_threshold, config.requantizer.idle_priority) == (2, 0, False)
    assert config.requantizer.quality_tolerance == 1.0 and config.requantizer.niceness == 19
    for bad, match in (({"threads": "1"}, "must be an integer"), ({"enabled": 1}, "must be true or false"),
                       ({"threads": 0}, ">= 1"), ({"niceness": 25}, "0..19"), ({"speed": 1}, "unknown keys"),
                       ({"change_threshold": -0.1}, ">= 0"), ({"duty_cycle": 0}, r"\(0, 1\]"),
                       ({"idle_duty_cycle": 1.5}, "idle_duty_cycle"), ({"idle_duty_cycle": True}, "idle_duty_cycle")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"requantizer": bad})


def _write_stat(path: Path, busy_seconds: float) -> None:
    """A /proc/stat whose machine-wide non-idle time is `busy_seconds` (user + system)."""
    ticks = int(busy_seconds * os.sysconf("SC_CLK_TCK"))
    path.write_text(f"cpu  {ticks // 2} 0 {ticks - ticks // 2} 5000000 100 0 0 0 0 0\ncpu0 1 2 3 4\n")


def _burn(seconds: float) -> float:
    """Spends about `seconds` of this process's CPU time; returns what it spent."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        sum(range(1000))
    return time.process_time() - start


def test_pacer_sleeps_only_while_the_rest_of_the_machine_is_busy(tmp_path):
    stat = tmp_path / "stat"
    _write_stat(stat, 1000.0)
    sleeps: list[float] = []
    pacer = DutyCycle(0.25, idle_share=1.0, busy_cores=0.25, stat_path=stat, sleep=sleeps.append)
    # Busy: others used 100 CPU seconds during the interval -> share 0.25 -> sleep 3x the CPU used.
    spent = _burn(0.05)
    _write_stat(stat, 1100.0)
    before = time.process_time()
    pacer.pace()
    assert len(sleeps) == 1 and 3 * spent <= sleeps[0] <= 3 * (spent + time.process_time() - before + 0.02)
    assert (pacer.busy_intervals, pacer.idle_intervals) == (1, 0)
    # Idle: the machine's non-idle time grew by no more than our own -> full speed, no sleep.
    _burn(0.05)
    pacer.pace()
    assert len(sleeps) == 1 and (pacer.busy_intervals, pacer.idle_intervals) == (1, 1)
    # Below the threshold still counts as idle; an idle share below 1 paces too (1x the CPU used).
    half = DutyCycle(0.25, idle_share=0.5, busy_cores=1000.0, stat_path=stat, sleep=sleeps.append)
    spent = _burn(0.05)
    _write_stat(stat, 1110.0)
    half.pace()
    assert len(sleeps) == 2 and spent <= sleeps[1] <= spent + 0.05 and half.idle_intervals == 1
    # No /proc/stat (not Linux) or an unreadable one: always busy, always the busy share.
    for broken in (tmp_path / "missing", stat):
        stat.write_text("garbage\n")
        blind = DutyCycle(0.5, idle_share=1.0, stat_path=broken, sleep=sleeps.append)
        spent = _burn(0.02)
        blind.pace()
        assert blind.busy_intervals == 1 and spent <= sleeps[-1] <= spent + 0.05


def test_why_a_base_cannot_be_requantized(tmp_path):
    def blocker(quantized, state_dir="state", enabled=True, metadata=None):
        if metadata is not None:
            (tmp_path / "q").mkdir(exist_ok=True)
            (tmp_path / "q" / "inlaid_quant.json").write_text(json.dumps(metadata))
        config = config_from_dict({"model": {"quantized_dir": quantized} if quantized else {},
                                   "server": {"state_dir": state_dir} if state_dir else {},
                                   "requantizer": {"enabled": enabled}}, base_dir=tmp_path)
        return requantization_blocker(config)

    assert "full-precision" in blocker(None)
    assert "no server.state_dir" in blocker("q", state_dir=None)
    assert "enabled is false" in blocker("q", enabled=False)
    assert "not written by `inlaid quantize`" in blocker("q")
    assert "RTN" in blocker("q", metadata={"method": "rtn", "hessian_state": "hessian_state"})
    assert "without its Hessian state" in blocker("q", metadata={"method": "mlgptq", "hessian_state": ""})
    assert blocker("q", metadata={"method": "mlgptq", "hessian_state": "hessian_state"}) == ""


class _RecordingRequantizer:
    """Stands in for the requantizer's end of the socket: keeps what the jobs send it."""

    ready = True
    generation = 1

    def __init__(self) -> None:
        self.sent: list = []

    async def send(self, message) -> None:
        self.sent.append(message)


def test_a_layer_is_committed_once_every_executor_has_swapped_it(tmp_path):
    """Several executors: each step loop takes the live swap once; the layer is committed (and
    the requantizer told) only when all have answered; a lost executor gets it again, and a
    fresh one restores every committed layer."""
    import asyncio

    from inlaid.protocol import LayerCommitted, LayerHandle, LayerReady, LayerSwapResult, RequantizeJob
    from inlaid.serve.requantization_jobs import RequantizationJobs
    from inlaid.serve.task_records import REQUANTIZING

    async def scenario() -> None:
        config = config_from_dict({"server": {"state_dir": "state"}}, base_dir=tmp_path)
        store = TaskStore(tmp_path / "state", BASE)
        store.tasks["code"] = TaskRecord(name="code", adapter_dir="a", calibration="c", phase=REQUANTIZING,
                                         version=1, layers_total=30)
        wakes: list[int] = []
        jobs = RequantizationJobs(config, store, 30, wake=lambda: wakes.append(1), executors=2)
        requantizer = _RecordingRequantizer()
        jobs.supervisor = requantizer  # type: ignore[assignment]
        jobs.current = "code"
        jobs._sent_job = (requantizer.generation, "code@v1")  # the requantizer runs its job
        first, second = jobs.for_executor(0), jobs.for_executor(1)
        assert not first.has_swaps() and not second.has_swaps()

        handle = LayerHandle(transport="file", name=str(tmp_path / "layer.safetensors"))
        jobs._on_message(LayerReady(job_id="code@v1", layer=0, version=1, handle=handle, file="layer0.v1",
                                    linears=[], forward_seconds=1.0, quantize_seconds=2.0))
        assert wakes and first.has_swaps() and second.has_swaps()
        assert [swap.layer for swap in first.take_swaps()] == [0] and not first.has_swaps()
        assert first.take_swaps() == []  # taken once per executor
        jobs.on_swap_result(LayerSwapResult(layer=0, version=1, ok=True), executor=0)
        await asyncio.sleep(0)
        assert 0 not in store.layers and not requantizer.sent  # the second executor has not swapped yet

        assert [swap.layer for swap in second.take_swaps()] == [0]
        jobs.on_executor_lost(1)  # its answer died with it: it gets the layer again
        assert second.has_swaps()
        assert [swap.layer for swap in second.take_swaps()] == [0]
        jobs.on_swap_result(LayerSwapResult(layer=0, version=1, ok=True), executor=1)
        await asyncio.sleep(0)
        assert store.layers[0].version == 1 and store.tasks["code"].layers_done == 1
        assert requantizer.sent == [LayerCommitted(job_id="code@v1", layer=0, swapped=True, error="")]

        # layer 1 fails on one executor: not committed, the requantizer hears why
        jobs._on_message(LayerReady(job_id="code@v1", layer=1, version=1, handle=handle, file="layer1.v1",
                                    linears=[], forward_seconds=1.0, quantize_seconds=2.0))
        first.take_swaps(), second.take_swaps()
        jobs.on_swap_result(LayerSwapResult(layer=1, version=1, ok=True), executor=0)
        jobs.on_swap_result(LayerSwapResult(layer=1, version=1, ok=False, error="bad tensors"), executor=1)
        await asyncio.sleep(0)
        assert 1 not in store.layers
        assert requantizer.sent[-1] == LayerCommitted(job_id="code@v1", layer=1, swapped=False, error="bad tensors")
        # both go back to what the registry holds for layer 1 (nothing: the checkpoint's layer)
        assert [(s.layer, s.version, s.handle.transport) for s in second.take_swaps()] == [(1, 0, "checkpoint")]

        # a restarted executor restores every committed layer (its revert is moot: it loads the
        # checkpoint), the other one needs nothing
        jobs.on_executor_lost(0)
        assert [(swap.layer, swap.handle.transport) for swap in first.take_swaps()] == [(0, "file")]
        assert not second.has_swaps()
        assert all(not isinstance(m, RequantizeJob) for m in requantizer.sent)  # the job runs on: nothing resent

    asyncio.run(scenario())


def test_calibration_files_are_checked_a_bounded_line_at_a_time(tmp_path):
    """An outside probe: a 5 MB sample was accepted (the requantizer's cost probe then grew to
    13 GB), a 300 MB file was read whole by the coordinator, a FIFO or a link to /dev/zero
    'did not exist'."""
    from inlaid.serve.task_inputs import MAX_CALIBRATION_FILE_BYTES, MAX_CALIBRATION_LINE_BYTES, check_calibration_file
    from inlaid.serve.task_registry import TaskError

    sample = {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"}
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(sample) + "\n\n")
    check_calibration_file(str(good))
    long_sample = {**sample, "messages": [{"role": "user", "content": "x" * MAX_CALIBRATION_LINE_BYTES}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(sample) + "\n" + json.dumps(long_sample) + "\n")
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as handle:  # sparse: nothing is written
        handle.truncate(MAX_CALIBRATION_FILE_BYTES + 1)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(sample).replace("4", "\xe9").encode("latin-1") + b"\n")
    for name, words in [("long.jsonl", "long.jsonl:2: a sample over 32768 bytes"),
                        ("huge.jsonl", f"holds {MAX_CALIBRATION_FILE_BYTES + 1} bytes; at most"),
                        ("fifo", "is not a regular file (a device, FIFO or socket?)"),
                        ("zero", "is not a regular file (a device, FIFO or socket?)"),
                        ("missing.jsonl", "does not exist"), (".", "is a directory"),
                        ("latin1.jsonl", "latin1.jsonl:1: not UTF-8")]:
        with pytest.raises(TaskError, match=re.escape(words)) as refused:
            check_calibration_file(str(tmp_path / name))
        assert refused.value.code == "invalid_request"


def test_a_shutdown_lets_the_swap_an_executor_is_applying_land_before_the_requantizer_exits(tmp_path, monkeypatch):
    """The requantizer unlinks a layer's shared memory as it exits; stopping it while an
    executor was applying that layer failed the swap at every shutdown during an add (an
    outside probe: "layer swap failed ... segment is gone"). The stop waits for the answer
    (bounded), and does not wait for a swap no executor has taken."""
    import asyncio

    from inlaid.protocol import LayerHandle, LayerReady, LayerSwapResult
    from inlaid.serve import requantization_jobs
    from inlaid.serve.requantization_jobs import RequantizationJobs
    from inlaid.serve.task_records import REQUANTIZING

    class Requantizer(_RecordingRequantizer):
        stopped_at: float | None = None

        async def stop(self) -> None:
            self.stopped_at = asyncio.get_running_loop().time()

    async def scenario(answer: bool) -> tuple[float, RequantizationJobs, Requantizer]:
        config = config_from_dict({"server": {"state_dir": "state"}}, base_dir=tmp_path)
        store = TaskStore(tmp_path / "state", BASE)
        store.tasks["code"] = TaskRecord(name="code", adapter_dir="a", calibration="c", phase=REQUANTIZING,
                                         version=1, layers_total=30)
        jobs = RequantizationJobs(config, store, 30, wake=lambda: None)
        requantizer = jobs.supervisor = Requantizer()  # type: ignore[assignment]
        jobs.current = "code"
        jobs._on_message(LayerReady(job_id="code@v1", layer=0, version=1, handle=LayerHandle(transport="file",
                                    name="x"), file="layer0.v1", linears=[], forward_seconds=1.0, quantize_seconds=1.0))
        assert [swap.layer for swap in jobs.for_executor(0).take_swaps()] == [0]  # in an executor's plan now
        stopping = asyncio.get_running_loop().create_task(jobs.stop())
        await asyncio.sleep(0.2)
        answered_at = asyncio.get_running_loop().time()
        if answer:
            assert requantizer.stopped_at is None  # the old code stopped it at once
            jobs.on_swap_result(LayerSwapResult(layer=0, version=1, ok=True))
        await stopping
        return answered_at, jobs, requantizer

    answered_at, jobs, requantizer = asyncio.run(scenario(answer=True))
    assert requantizer.stopped_at is not None and requantizer.stopped_at >= answered_at
    assert jobs.store is not None and jobs.store.layers[0].version == 1  # committed, not lost
    monkeypatch.setattr(requantization_jobs, "STOP_SWAP_WAIT_S", 0.1)  # an executor that never answers
    answered_at, _, requantizer = asyncio.run(scenario(answer=False))
    assert requantizer.stopped_at is not None and requantizer.stopped_at <= answered_at
