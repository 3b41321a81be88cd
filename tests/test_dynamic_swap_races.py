"""Races between a layer's handover and the processes around it, without processes: a
requantizer lost while its layer's swap is at the executors, and executors that disagree on a
layer after a swap or restore failed on some of them. The real `RequantizationJobs` and
`TaskStore` run; the requantizer's end of the socket is a stand-in (`_StandInRequantizer`)
that writes its layer files with the requantizer's own `_save_layer`."""

from __future__ import annotations

import asyncio

import pytest

from inlaid.protocol import (
    LayerCommitted, LayerHandle, LayerReady, LayerSwapResult, RequantizeJob, RequantizerHello,
)
from inlaid.serve.config import config_from_dict
from inlaid.serve.requantization_jobs import RequantizationJobs
from inlaid.serve.task_records import READY, REQUANTIZING, CommittedLayer, TaskRecord
from inlaid.serve.task_store import TaskStore, file_sha256

BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}


class _StandInRequantizer:
    """Stands in for the supervisor and its process: keeps what the jobs send; `lose()` is
    what the supervisor does when the process dies and its successor says hello."""

    ready = True
    stopped = False
    pid = 1

    def __init__(self) -> None:
        self.generation = 1
        self.sent: list = []

    async def send(self, message) -> None:
        self.sent.append(message)

    async def ensure_running(self) -> None:
        pass

    def jobs(self) -> list[RequantizeJob]:
        return [message for message in self.sent if isinstance(message, RequantizeJob)]


def _jobs(tmp_path, executors: int = 1, layers_done: int = 0) -> tuple[RequantizationJobs, TaskStore, _StandInRequantizer]:
    config = config_from_dict({"server": {"state_dir": "state"}}, base_dir=tmp_path)
    store = TaskStore(tmp_path / "state", BASE)
    store.tasks["code"] = TaskRecord(name="code", adapter_dir="a", calibration="c", phase=REQUANTIZING, version=1,
                                     layers_total=30, layers_done=layers_done)
    store.next_version = 2
    jobs = RequantizationJobs(config, store, 30, wake=lambda: None, executors=executors)
    requantizer = _StandInRequantizer()
    jobs.supervisor = requantizer  # type: ignore[assignment]
    jobs.queue.append("code")
    return jobs, store, requantizer


def _queue_text(jobs: RequantizationJobs, store: TaskStore) -> None:
    """A second task, `text`, queued behind `code`."""
    store.tasks["text"] = TaskRecord(name="text", adapter_dir="b", calibration="d", phase=REQUANTIZING, version=2,
                                     layers_total=30)
    store.next_version = 3
    jobs.queue.append("text")


def _layer_ready(jobs: RequantizationJobs, layer: int, file: str, version: int = 1, peak_rss_bytes: int = 0) -> None:
    """The requantizer hands layer `layer` over (shared memory): the live swap."""
    jobs._on_message(LayerReady(job_id="code@v1", layer=layer, version=version,
                                handle=LayerHandle(transport="shm", name="s"), file=file, linears=[],
                                forward_seconds=1.0, quantize_seconds=1.0, peak_rss_bytes=peak_rss_bytes))


def _lose_requantizer(jobs: RequantizationJobs, requantizer: _StandInRequantizer, restarted: bool = True) -> None:
    """It is SIGKILLed; with `restarted`, its successor says hello."""
    requantizer.generation += 1
    jobs._on_lost("requantizer (pid 1) died with signal SIGKILL")
    if restarted:
        jobs._on_ready(RequantizerHello(protocol_version=0, generation=requantizer.generation, pid=2, threads=1,
                                        niceness=19, idle_priority=True))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _lost_with_its_layer_at_the_executors(tmp_path, layer: int, peak_rss_bytes: int = 0):
    """The job runs from `layer`, hands it over, executor 0 takes the swap, the requantizer is
    lost and its successor says hello."""
    jobs, store, requantizer = _jobs(tmp_path, layers_done=layer)
    await jobs._dispatch()
    _layer_ready(jobs, layer, str(tmp_path / "x"), peak_rss_bytes=peak_rss_bytes)
    jobs.take_swaps(0)
    _lose_requantizer(jobs, requantizer)
    await _settle()
    return jobs, store, requantizer


def test_a_requantizer_lost_while_its_layer_is_at_the_executors_does_not_rewrite_that_layer(tmp_path):
    """The reviewer's sequence: the requantizer wrote layer 3's file (version 1) and handed it
    over; an executor took the swap; the requantizer died. The old code resent the job at once
    from layer 3, so the new requantizer wrote layer_003.v1 again (other bytes: its forward
    ran again) while the first swap's late commit recorded the first file's checksum: the
    registry and the file disagreed, and the next start dropped the layer. Now the job is
    resent once the layer is committed, from layer 4."""
    torch = pytest.importorskip("torch")
    from inlaid.serve.requantizer import _save_layer

    def run_layers(job: RequantizeJob, seed: float) -> None:
        """What `requantizer.run_job` writes for each layer it reaches (one here)."""
        if job.start_layer <= 3:
            _save_layer({"model.layers.3.mlp.down_proj.scales": torch.full((4,), seed)}, job.layers_dir, 3, job.version)

    async def scenario() -> None:
        jobs, store, requantizer = _jobs(tmp_path, layers_done=3)
        await jobs._dispatch()
        [first] = requantizer.jobs()
        assert first.start_layer == 3
        run_layers(first, 1.0)
        file = str(store.layers_dir / "layer_003.v1.safetensors")
        _layer_ready(jobs, 3, file)
        assert [swap.layer for swap in jobs.take_swaps(0)] == [3]  # in the executor's plan now
        assert jobs._live is not None and jobs._live.digest is not None
        await jobs._live.digest

        _lose_requantizer(jobs, requantizer)
        await _settle()
        for job in requantizer.jobs()[1:]:  # what the old code sent here: from layer 3
            run_layers(job, 2.0)

        jobs.on_swap_result(LayerSwapResult(layer=3, version=1, ok=True))  # the late commit
        await _settle()
        entry = store.layers[3]
        assert entry.sha256 == file_sha256(entry.file)  # the registry holds the file's checksum
        assert TaskStore(tmp_path / "state", BASE).layers[3].sha256 == entry.sha256  # a restart restores it
        assert store.tasks["code"].layers_done == 4
        resent = requantizer.jobs()[1:]
        assert [job.start_layer for job in resent] == [4]
        assert not [m for m in requantizer.sent if isinstance(m, LayerCommitted)]  # no job of its own heard it
        assert store.tasks["code"].message.endswith("resuming at layer 4")  # as the lost one left it
        run_layers(resent[0], 2.0)
        assert file_sha256(entry.file) == entry.sha256

    asyncio.run(scenario())


def test_a_swap_that_fails_after_its_requantizer_was_lost_is_redone(tmp_path):
    """The swap the lost requantizer handed over fails (its shared memory went with it):
    the job then resumes at that layer, not after it, and nothing was committed."""

    async def scenario() -> None:
        jobs, store, requantizer = await _lost_with_its_layer_at_the_executors(tmp_path, 3)
        assert len(requantizer.jobs()) == 1
        jobs.on_swap_result(LayerSwapResult(layer=3, version=1, ok=False, error="segment s is gone"))
        await _settle()
        record = store.tasks["code"]
        assert record.phase == REQUANTIZING and record.message.endswith("resuming at layer 3")
        assert 3 not in store.layers and [job.start_layer for job in requantizer.jobs()] == [3, 3]

    asyncio.run(scenario())


def test_executors_go_back_to_the_registry_when_a_swap_or_restore_fails_on_another(tmp_path):
    """Two executors. A restore that fails on one drops the layer from the registry: the other,
    whose restore is still queued, goes to the checkpoint's layer instead (the old code sent
    it the dropped file and it served it; `test_dynamic_runner_swap.py` applies these on
    real runners). A live swap that fails on one only: both go back to the committed layer
    (the one that took it serves an uncommitted one). A revert that fails (a reviewer's
    sequence): that executor goes to the checkpoint's layer, not left on the dropped one."""
    jobs, store, _ = _jobs(tmp_path, executors=2)
    store.layers[5] = CommittedLayer(version=1, file=str(tmp_path / "l5"))
    store.layers[6] = CommittedLayer(version=1, file=str(tmp_path / "l6"))
    jobs._restore = [jobs._committed_swaps() for _ in range(2)]
    assert [swap.layer for swap in jobs.take_swaps(1)] == [5, 6]
    jobs.on_swap_result(LayerSwapResult(layer=5, version=1, ok=False, error="unreadable"), executor=1)
    assert 5 not in store.layers
    assert [(s.layer, s.version, s.handle.transport) for s in jobs.take_swaps(0)] == [(5, 0, "checkpoint"), (6, 1, "file")]
    assert [(s.layer, s.version, s.handle.transport) for s in jobs.take_swaps(1)] == [(5, 0, "checkpoint")]

    async def live_swap() -> None:
        jobs.current = "code"
        jobs._sent_job = (1, "code@v1")
        _layer_ready(jobs, 6, str(tmp_path / "l6v2"), version=2)
        jobs.take_swaps(0), jobs.take_swaps(1)
        jobs.on_swap_result(LayerSwapResult(layer=6, version=2, ok=True), executor=0)
        jobs.on_swap_result(LayerSwapResult(layer=6, version=2, ok=False, error="bad tensors"), executor=1)
        await _settle()

    asyncio.run(live_swap())
    assert store.layers[6].version == 1
    for executor in (0, 1):
        assert [(s.layer, s.version, s.handle.name) for s in jobs.take_swaps(executor)] == [(6, 1, str(tmp_path / "l6"))]

    # executor 0's revert to layer 6 v1 fails (its file unreadable now): the layer leaves the
    # registry and both go to the checkpoint's, executor 0 included (it served v2 still)
    jobs.on_swap_result(LayerSwapResult(layer=6, version=1, ok=False, error="unreadable"), executor=0)
    assert 6 not in store.layers
    for executor in (0, 1):
        assert [(s.layer, s.version, s.handle.transport) for s in jobs.take_swaps(executor)] == [(6, 0, "checkpoint")]


def test_the_next_job_waits_for_a_cancelled_jobs_layer_at_the_executors(tmp_path):
    """`code` is cancelled while its layer 3 is at the executors and its requantizer waits for
    the commit (so the cancel is taken up at once). The old code sent the next job, `text`, at
    once: its first layer then replaced the swap at the executors, and an executor that had
    taken layer 3 served a layer the registry never recorded. Now `text` is sent once layer 3
    has settled, with that layer among the served ones it reads."""

    async def scenario() -> None:
        jobs, store, requantizer = _jobs(tmp_path, layers_done=3)
        _queue_text(jobs, store)
        await jobs._dispatch()
        file = str(tmp_path / "layer_003.v1.safetensors")
        _layer_ready(jobs, 3, file)
        assert [swap.layer for swap in jobs.take_swaps(0)] == [3]
        jobs.cancel(store.tasks["code"])
        await _settle()
        assert [job.task for job in requantizer.jobs()] == ["code"]  # `text` waits for layer 3
        jobs.on_swap_result(LayerSwapResult(layer=3, version=1, ok=True))
        await _settle()
        assert store.layers[3].version == 1  # committed, whatever became of its job
        [_, text] = requantizer.jobs()
        assert text.task == "text" and text.start_layer == 0 and text.served_layers == {3: file}
        assert not jobs.has_swaps(0)

    asyncio.run(scenario())


def test_a_swap_landing_during_shutdown_starts_no_requantizer(tmp_path):
    """The requantizer was lost with its layer at the executors; the server stops, and waits
    for that swap to land (`stop`). Its landing used to dispatch the held-back job, and the
    supervisor started a requantizer only for the shutdown to kill it (a reviewer's sequence)."""

    async def scenario() -> None:
        jobs, _, requantizer = _jobs(tmp_path, layers_done=3)
        started: list[int] = []

        async def ensure_running() -> None:
            started.append(1)

        requantizer.ensure_running = ensure_running  # type: ignore[method-assign]
        requantizer.stop = lambda: asyncio.sleep(0)  # type: ignore[attr-defined]
        await jobs._dispatch()
        _layer_ready(jobs, 3, str(tmp_path / "x"))
        jobs.take_swaps(0)
        requantizer.ready = False
        _lose_requantizer(jobs, requantizer, restarted=False)
        stopping = asyncio.create_task(jobs.stop())
        await _settle()
        assert not jobs._wants_requantizer()  # the supervisor's own restart after a loss asks it
        jobs.on_swap_result(LayerSwapResult(layer=3, version=1, ok=True))
        await stopping
        await _settle()
        assert started == [] and len(requantizer.jobs()) == 1

    asyncio.run(scenario())


def test_a_lost_requantizers_last_layer_ends_its_job_when_it_lands(tmp_path):
    """The layer at the executors when the requantizer was lost is the model's last: once it
    is committed nothing is left, and the job ends there (resent, from layer 30 of 30, the
    requantizer ran its calibration forward through every layer to answer that it was done).
    Its peak memory is the one its layers reported: no JobFinished brings one."""

    async def scenario() -> None:
        jobs, store, requantizer = await _lost_with_its_layer_at_the_executors(tmp_path, 29, peak_rss_bytes=7 << 30)
        jobs.on_swap_result(LayerSwapResult(layer=29, version=1, ok=True))
        await _settle()
        record = store.tasks["code"]
        assert record.phase == READY and record.layers_done == 30 and store.layers[29].version == 1
        assert record.peak_rss_bytes == 7 << 30
        assert [job.start_layer for job in requantizer.jobs()] == [29] and jobs.current is None

    asyncio.run(scenario())


def test_a_job_whose_every_layer_is_committed_ends_without_a_requantizer(tmp_path):
    """The requantizer was lost (or the server killed) after the last layer's commit and before
    its JobFinished: the job was resent from layer 30 of 30, and a requantizer started only to
    run the calibration forward through every layer and say it was done (a reviewer's
    finding). Now dispatching it ends it, as READY, and the next job goes."""

    async def scenario() -> None:
        jobs, store, requantizer = _jobs(tmp_path, layers_done=30)
        _queue_text(jobs, store)
        await jobs._dispatch()
        await _settle()
        assert store.tasks["code"].phase == READY and store.tasks["code"].layers_done == 30
        assert [(job.task, job.start_layer) for job in requantizer.jobs()] == [("text", 0)]

    asyncio.run(scenario())
