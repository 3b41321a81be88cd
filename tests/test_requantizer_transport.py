"""The layer handover transports across a real second process: shared memory, the CUDA-IPC
code path as a CPU dry run (torch's file_system sharing), and files. The receiver must get
exactly the sender's bytes, in memory it owns; a released or corrupt handle is a typed error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from inlaid.protocol import LayerHandle, TensorSlot
from inlaid.serve.layer_transport import (
    LayerTransportError, export_cuda_ipc, export_shm, open_layer,
)

# The receiver: opens each handle read from stdin, saves what it got as safetensors.
_RECEIVER = """
import sys, msgspec, torch
torch.multiprocessing.set_sharing_strategy("file_system")
from safetensors.torch import save_file
from inlaid.protocol import LayerHandle
from inlaid.serve.layer_transport import open_layer
handles = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=list[LayerHandle])
for index, handle in enumerate(handles):
    tensors = open_layer(handle)
    save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1] + f"/{index}.safetensors")
print("ok")
"""


def _layer_tensors(seed: int) -> dict[str, torch.Tensor]:
    """GPTQ-shaped tensors of mixed dtypes and sizes (odd sizes exercise the alignment)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, (k, n) in enumerate([(64, 96), (32, 40), (128, 16)]):
        prefix = f"model.layers.0.linear{index}"
        tensors[prefix + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=generator, dtype=torch.int32)
        tensors[prefix + ".qzeros"] = torch.randint(-2**31, 2**31 - 1, (k // 32, n // 8), generator=generator,
                                                    dtype=torch.int32)
        tensors[prefix + ".scales"] = torch.rand(k // 32, n, generator=generator).to(torch.float16)
        tensors[prefix + ".g_idx"] = torch.arange(k, dtype=torch.int32) // 32
    tensors["odd"] = torch.rand(7, generator=generator).to(torch.float16)
    return tensors


def test_handles_cross_processes(tmp_path):
    torch.multiprocessing.set_sharing_strategy("file_system")
    sent = [_layer_tensors(1), _layer_tensors(2), _layer_tensors(3)]
    shm = export_shm(sent[0])
    ipc = export_cuda_ipc(sent[1], torch.device("cpu"))
    save_file(sent[2], str(tmp_path / "layer.safetensors"))
    handles = [shm.handle, ipc.handle, LayerHandle(transport="file", name=str(tmp_path / "layer.safetensors"))]
    try:
        done = subprocess.run([sys.executable, "-c", _RECEIVER, str(tmp_path)], input=msgspec.msgpack.encode(handles),
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    finally:
        shm.release()
        ipc.release()
    for index, expected in enumerate(sent):
        received = load_file(str(tmp_path / f"{index}.safetensors"))
        assert set(received) == set(expected)
        for key, tensor in expected.items():
            assert received[key].dtype == tensor.dtype and torch.equal(received[key], tensor), (index, key)


def test_received_tensors_own_their_memory():
    sent = _layer_tensors(4)
    exported = export_shm(sent)
    received = open_layer(exported.handle)
    exported.release()  # the segment is gone; what was received must not change
    for key, tensor in sent.items():
        assert torch.equal(received[key], tensor)
    with pytest.raises(LayerTransportError, match="is gone"):
        open_layer(exported.handle)


def test_bad_handles(tmp_path):
    exported = export_shm({"a": torch.arange(4, dtype=torch.int32)})
    try:
        outside = LayerHandle(transport="shm", name=exported.handle.name,
                              tensors=[TensorSlot(key="a", dtype="int32", shape=[1 << 20], offset=0)])
        with pytest.raises(LayerTransportError, match="outside"):
            open_layer(outside)
        wrong = LayerHandle(transport="shm", name=exported.handle.name,
                            tensors=[TensorSlot(key="a", dtype="nonsense", shape=[4], offset=0)])
        with pytest.raises(LayerTransportError, match="dtype"):
            open_layer(wrong)
    finally:
        exported.release()
    with pytest.raises(LayerTransportError, match="unknown layer transport"):
        open_layer(LayerHandle(transport="pigeon", name="x"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LayerTransportError, match="cannot read"):
        open_layer(LayerHandle(transport="file", name=str(tmp_path / "broken.safetensors")))
    with pytest.raises(LayerTransportError, match="CUDA IPC"):
        open_layer(LayerHandle(transport="cuda_ipc", name="cuda:0", payload=b"garbage"))


def test_a_lost_requantizer_is_started_again_only_while_there_is_work(tmp_path):
    """The real requantizer process under its supervisor, SIGKILLed: restarted while a job
    wants it (a new generation says hello), left down once none does (an idle process held
    ~230 MB for nothing after a failed last job); the next job starts one again."""
    import asyncio
    import os
    import signal

    work = {"wanted": True}
    lost: list[str] = []
    names: list[str] = []

    async def scenario() -> None:
        supervisor = _supervisor(tmp_path, lost, work)

        try:
            await supervisor.ensure_running()
            await _until(lambda: supervisor.ready)
            # What a requantizer killed between creating a layer's segment and registering it
            # with its resource tracker leaves: its segment, which no tracker unlinks.
            names.append(left := _untracked_segment(f"inlaid-{supervisor.pid}-left"))
            names.append(kept := _untracked_segment(f"inlaid-{os.getpid()}-kept"))  # a live process's: not touched
            os.kill(supervisor.pid, signal.SIGKILL)
            await _until(lambda: supervisor.ready and supervisor.generation == 2)  # work wanted it back
            assert not Path(f"/dev/shm/{left}").exists() and Path(f"/dev/shm/{kept}").exists()
            work["wanted"] = False
            os.kill(supervisor.pid, signal.SIGKILL)
            await _until(lambda: len(lost) == 2)
            await asyncio.sleep(1.5)  # past the restart delay
            assert supervisor.pid == 0 and supervisor.generation == 2 and not supervisor.ready
            await supervisor.ensure_running()  # the next job
            await _until(lambda: supervisor.ready and supervisor.generation == 3)
        finally:
            await supervisor.stop()
            for name in names:
                Path(f"/dev/shm/{name}").unlink(missing_ok=True)

    asyncio.run(scenario())
    assert all("died with signal SIGKILL" in reason for reason in lost)


def _supervisor(tmp_path: Path, lost: list[str], work: dict[str, bool]):  # type: ignore[no-untyped-def]
    """A requantizer supervisor reporting its losses to `lost`, wanting work while work["wanted"]."""
    from inlaid.serve.config_sections import RequantizerSettings
    from inlaid.serve.requantizer_supervisor import RequantizerSupervisor

    return RequantizerSupervisor(RequantizerSettings(), f"ipc://{tmp_path}/requantizer.ipc",
                                 on_message=lambda message: None, on_ready=lambda hello: None,
                                 on_lost=lost.append, wanted=lambda: work["wanted"])


async def _until(condition, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def _untracked_segment(name: str) -> str:
    """A shared-memory segment `name` that no resource tracker will unlink."""
    from multiprocessing import resource_tracker, shared_memory

    segment = shared_memory.SharedMemory(name=name, create=True, size=64)
    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    segment.close()
    return name


def test_an_idle_requantizer_is_asked_to_exit_and_the_next_job_starts_a_fresh_one(tmp_path):
    """The process was kept from its first job until the server stopped (a soak: 2 GB idle for
    24 minutes). Retired, it exits with no loss counted; a job coming while it exits gets a
    fresh one once it is gone."""
    import asyncio

    from inlaid.serve.ipc_dirs import process_alive

    work = {"wanted": False}
    lost: list[str] = []

    async def scenario() -> None:
        supervisor = _supervisor(tmp_path, lost, work)

        try:
            await supervisor.ensure_running()
            await _until(lambda: supervisor.ready)
            first = supervisor.pid
            supervisor.retire()
            assert not supervisor.ready  # no job goes to it any more
            await _until(lambda: supervisor.pid == 0)
            assert not process_alive(first) and supervisor.generation == 1
            await supervisor.ensure_running()  # the next job
            await _until(lambda: supervisor.ready and supervisor.generation == 2)
            work["wanted"] = True
            supervisor.retire()
            await supervisor.ensure_running()  # a job while it exits: nothing to do yet
            await _until(lambda: supervisor.ready and supervisor.generation == 3)
        finally:
            await supervisor.stop()

    asyncio.run(scenario())
    assert lost == []


def test_the_jobs_retire_the_requantizer_a_minute_after_they_last_went_idle(model_dir, monkeypatch):
    """Each time the jobs go idle the wait starts again (a timer of an earlier idle spell
    retired the process a second after the next job ended); a job, a cancel the requantizer
    may still compute, or a layer at the executors keeps it."""
    import asyncio

    from inlaid.serve import requantization_jobs as jobs_module
    from inlaid.serve.config import config_from_dict

    monkeypatch.setattr(jobs_module, "IDLE_EXIT_S", 0.5)
    jobs = jobs_module.RequantizationJobs(config_from_dict({"model": {"dir": str(model_dir)}}), None, 30,
                                          wake=lambda: None)
    retired: list[float] = []
    jobs.supervisor = type("Supervisor", (), {"retire": lambda self: retired.append(0.0)})()  # type: ignore[assignment]

    async def scenario() -> None:
        jobs._went_idle()
        await asyncio.sleep(1.0)
        assert len(retired) == 1
        jobs._went_idle()
        await asyncio.sleep(0.1)
        jobs._went_idle()  # a job came and ended: the first wait is void
        await asyncio.sleep(1.0)
        assert len(retired) == 2
        for busy in ("queue", "cancelling"):
            if busy == "queue":
                jobs.queue.append("qa")
            else:
                jobs.queue.clear()
                jobs._cancelling = "qa@v1"
            jobs._went_idle()
            await asyncio.sleep(1.0)
        assert len(retired) == 2

    asyncio.run(scenario())
