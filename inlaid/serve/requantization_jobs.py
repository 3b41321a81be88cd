"""The re-quantization jobs of added tasks, and the layers they hand to the executor. Torch-free.

One job at a time, in order of addition, runs in the requantizer process. Each finished
layer comes back as a handle (LayerReady); the next plan sent to the executor carries it as
a LayerSwap, applied between two steps; once every executor confirms it (LayerSwapResult),
the layer is *committed* (STATE_DIR/registry.json) and the requantizer may go on
(LayerCommitted). Committed layers are what a restarted executor or server restores, as
file swaps on its first plan, so what is served and what is recorded never diverge.

A requantizer that dies, or hangs and is killed (its supervisor's `_liveness`; a cancel it
does not take up, `cancel`), is restarted and its job resumes at the first uncommitted
layer; `max_attempts` losses in one job fail the task. The executors' side of the
handover (the live swap, the layers to restore) is `layer_swaps.LayerSwaps`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import msgspec
import zmq

from inlaid.protocol import (CancelJob, JobFinished, LayerCommitted, LayerReady, LayerSwap, RequantizeJob,
                             RequantizerHello)
from inlaid.serve.config import ServerConfig
from inlaid.serve.ipc_dirs import private_ipc_dir
from inlaid.serve.layer_swaps import JobCounts, LayerSwaps, _LiveSwap
from inlaid.serve.requantizer_supervisor import RequantizerSupervisor
from inlaid.serve.task_records import (FAILED, READY, REQUANTIZING, RESTARTED, RESUMING_AT, Decision, TaskRecord,
                                      job_id)
from inlaid.serve.task_status import compact_effect, ready_report
from inlaid.serve.task_store import TaskStore, layer_digest

log = logging.getLogger("inlaid.requantization")

# How long a shutdown waits for the executors' answers to a layer swap they are applying.
STOP_SWAP_WAIT_S = 5.0
# How often a cancelled job's requantizer is looked at until it takes the cancel up: a stopped
# one (SIGSTOP) never will and is killed then. A running one reads the cancel after its
# current input group (four per layer) or while it waits for a commit, and answers it with
# JobFinished: a group may take a while on a large model, a restart the model's load; a hang
# there is `_liveness`'s to catch.
CANCEL_TIMEOUT_S = 5.0
# A requantizer with no job for this long is asked to exit (`RequantizerSupervisor.retire`): a
# soak saw one hold 2 GB for 24 minutes after its last job, until the server stopped.
IDLE_EXIT_S = 60.0



class RequantizationJobs(LayerSwaps):
    """`store` None: no state directory, so no job and nothing to restore."""

    def __init__(self, config: ServerConfig, store: TaskStore | None, num_layers: int,
                 wake: Callable[[], None], executors: int = 1) -> None:
        """executors: how many executors serve the base; a layer is committed once every one
        of them has swapped it in."""
        self.config = config
        self.executors = executors
        self.store = store
        self.checkpoint_dir = str(config.engine.quantized_dir or "")
        self.num_layers = num_layers
        self.wake = wake
        self.supervisor: RequantizerSupervisor | None = None
        self.queue: deque[str] = deque()  # task names, the running job's first
        self.current: str | None = None
        self._sent_job: tuple[int, str] | None = None  # (requantizer generation, job id) it runs
        self._cancelling: str | None = None  # a cancelled job the requantizer may still be computing
        self._live: _LiveSwap | None = None
        # The job whose requantizer was lost while the executors had its layer: resent once they answer.
        self._orphaned_live: str | None = None
        self._stopping = False
        # The served layer files the sent job reads, each when it reaches its layer: named at
        # dispatch, so a commit (a cancelled job's, at the executors still) may supersede one
        # before it is read; the collection keeps them until the job ends.
        self._job_reads: set[str] = set()
        # Per executor: the committed layers it lacks (all of them when it is fresh).
        self._restore: list[dict[int, LayerSwap]] = [self._committed_swaps() for _ in range(executors)]
        self._swap_step_ids = itertools.count(-1, -1)  # swap-only plans: never an engine step id
        self._background: set[asyncio.Task[Any]] = set()
        self._tempdir: str | None = None
        self.counts = JobCounts()
        self._idle_since = 0.0  # when the jobs last went idle (`_went_idle`)

    def files_in_use(self, active_versions: Iterable[int]) -> tuple[set[int], set[str]]:
        """(versions, layer file names) a job may still write, commit or have an executor read:
        the run-time collection keeps them (`state_gc.py`, (b) and (c) of its invariant).
        active_versions: the queued and re-quantizing tasks' versions."""
        versions = set(active_versions)
        files: set[str] = set()
        if self._live is not None:  # handed over, not committed yet: it may still be, even if cancelled
            versions.add(self._live.swap.version)
            files.add(self._live.file)
        if self._cancelling is not None:  # the requantizer may still write its layer
            version = self._cancelling.rpartition("@v")[2]
            if version.isdigit():
                versions.add(int(version))
        for restore in self._restore:
            files.update(swap.handle.name for swap in restore.values() if swap.handle.transport == "file")
        files.update(self._job_reads)
        return versions, files

    @property
    def cancelling_task(self) -> str | None:
        """The task of a cancelled job the requantizer may still be computing (its set-up
        included: it writes the task's costs and Hessians before it reads the cancel)."""
        return self._cancelling.rpartition("@v")[0] if self._cancelling is not None else None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start taking jobs (the requantizer itself is spawned with the first one)."""
        self._tempdir = private_ipc_dir("requantizer")
        self.supervisor = RequantizerSupervisor(
            self.config.requantizer, f"ipc://{self._tempdir}/requantizer.ipc",
            on_message=self._on_message, on_ready=self._on_ready, on_lost=self._on_lost,
            wanted=self._wants_requantizer, owes_progress=self._owes_progress,
            log_level=self.config.log_level, log_format=self.config.log_format)
        if self.queue:
            await self._dispatch()

    def _wants_requantizer(self) -> bool:
        # Not once stopping: a lost one's restart would only be killed by the shutdown.
        return not self._stopping and (self.current is not None or bool(self.queue))

    async def stop(self) -> None:
        self._stopping = True  # a swap landing now dispatches nothing: no requantizer is started to be killed
        await self._let_the_live_swap_land()
        if self.supervisor is not None:
            await self.supervisor.stop()
        for task in list(self._background):
            task.cancel()
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    async def _let_the_live_swap_land(self) -> None:
        """An executor applying the live swap reads the requantizer's shared memory, which the
        requantizer unlinks as it exits: stopping it first failed that swap at every shutdown
        during an add (an ERROR in the executor's log). Its answer is one step away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_SWAP_WAIT_S
        while self._live is not None and self._live.sent_to and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def _later(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def submit(self, name: str) -> None:
        self.queue.append(name)
        self._later(self._dispatch())

    def cancel(self, record: TaskRecord) -> None:
        """Stop the task's job (after its current input group) or take it out of the queue.

        The requantizer reads the cancel at once when it waits for a commit; mid-layer it
        reads it after each input group. The next job is sent only once the cancel is
        taken up (a message of the cancelled job arrives: its JobFinished), or once the
        process is gone: a stopped one (SIGSTOP) takes up nothing and is killed within
        CANCEL_TIMEOUT_S (`_cancel_deadline`). That kill counts against no task."""
        if self.current != record.name:
            if record.name in self.queue:
                self.queue.remove(record.name)
                self.counts.cancelled += 1
            return
        self.counts.cancelled += 1
        cancelled, sent, supervisor = job_id(record), self._sent_job, self.supervisor
        waiting = self._live is not None and self._live.job_id == cancelled  # for our commit: at the boundary
        self._later(self._send(CancelJob(job_id=cancelled)))
        self._finish_current()
        if (supervisor is not None and sent is not None and sent[0] == supervisor.generation
                and not (waiting and not supervisor.stopped)):
            self._cancelling = cancelled
            self._later(self._cancel_deadline(cancelled, sent[0], waiting))
        self._later(self._dispatch())

    async def _cancel_deadline(self, cancelled: str, generation: int, waiting: bool) -> None:
        while True:
            await asyncio.sleep(CANCEL_TIMEOUT_S)
            supervisor = self.supervisor
            if self._cancelling != cancelled or supervisor is None or supervisor.generation != generation:
                return  # taken up, or the process is already gone
            if supervisor.stopped:
                supervisor.kill(f"requantizer (pid {supervisor.pid}) was killed: it did not take up the cancel of "
                                f"job {cancelled} (it is stopped)")
                return
            if waiting:  # it was stopped at the boundary and runs again: it has read the cancel
                self._cancel_taken_up()
                return
            # running mid-layer: it takes the cancel up when its input group ends

    def _went_idle(self) -> None:
        """No job now: the requantizer retires IDLE_EXIT_S later unless a job (or this call) comes first."""
        self._idle_since = since = time.monotonic()
        self._later(self._retire_when_idle(since))

    async def _retire_when_idle(self, since: float) -> None:
        await asyncio.sleep(IDLE_EXIT_S)
        idle = self.current is None and not self.queue and self._cancelling is None and self._live is None
        if idle and self._idle_since == since and self.supervisor is not None:
            self.supervisor.retire()

    def _cancel_taken_up(self) -> None:
        self._cancelling = None
        self._later(self._dispatch())

    # ------------------------------------------------------------------ the requantizer's side
    def _record_of(self, job: str) -> TaskRecord | None:
        if self.store is None or self.current is None:
            return None
        record = self.store.tasks.get(self.current)
        return record if record is not None and job_id(record) == job else None

    def _job(self, record: TaskRecord) -> RequantizeJob:
        assert self.store is not None and record.calibration is not None
        settings = self.config.requantizer
        record.aggregate_drops = [name for name in self.store.dropped if name != record.name]
        return RequantizeJob(
            job_id=job_id(record), task=record.name, adapter_dir=record.adapter_dir, calibration=record.calibration,
            version=record.version, start_layer=record.layers_done, model_dir=self.config.engine.model_dir,
            checkpoint_dir=str(self.config.engine.quantized_dir),
            served_layers={layer: entry.file for layer, entry in self.store.layers.items()},
            state_dir=str(self.store.hessian_dir), layers_dir=str(self.store.layers_dir),
            drop_tasks=list(record.aggregate_drops),
            change_threshold=settings.change_threshold,
            quality_tolerance=settings.quality_tolerance if settings.quality_tolerance >= 0 else None,
            max_samples=settings.max_samples or None, device=self.config.engine.device,
            duty_cycle=settings.duty_cycle, idle_duty_cycle=settings.idle_duty_cycle)

    async def _send(self, message: msgspec.Struct) -> None:
        if self.supervisor is None or not self.supervisor.ready:
            return  # a restarted requantizer gets the whole job again
        try:
            await self.supervisor.send(message)
        except zmq.ZMQError as error:
            log.warning("requantizer unreachable", extra={"error": str(error)})

    async def _dispatch(self) -> None:
        store, supervisor = self.store, self.supervisor
        if store is None or supervisor is None or self._stopping or self._cancelling is not None:
            return  # after a cancel, the next job waits for the requantizer to be free (`cancel`)
        if self.current is None:
            if not self.queue:
                self._went_idle()
                return
            self.current = self.queue[0]
        record = store.tasks[self.current]
        if record.layers_done >= self.num_layers and self._sent_job != (supervisor.generation, job_id(record)):
            # Every layer committed, and no requantizer to say so (lost, or the server restarted,
            # before its JobFinished): resent, the job would only run its forward through every layer.
            self._end_job(record, ok=True, error="")  # (which sends the next job)
            return
        if not supervisor.ready:
            await supervisor.ensure_running()  # its hello dispatches again
            return
        job = self._job(record)
        if self._sent_job == (supervisor.generation, job.job_id):
            return
        if self._live is not None:
            # A layer is still at the executors (a lost requantizer's, or a cancelled job's):
            # the job is sent once it settles (`_live_settled`). Resent now, a lost one's job
            # started at that layer and rewrote its file (same version, same name) under the
            # checksum the late commit records; another job's first layer took the executors'
            # place from it, and those that took it served a layer the registry never held.
            return
        self._sent_job = (supervisor.generation, job.job_id)
        self._job_reads = set(job.served_layers.values())  # a resent job reads the files named now
        record.phase = REQUANTIZING
        record.started_at = record.started_at or time.time()
        store.save()
        log.info("re-quantization dispatched", extra={"task": record.name, "version": record.version,
                                                      "start_layer": job.start_layer})
        await self._send(job)

    def _finish_current(self) -> None:
        if self.current in self.queue:
            self.queue.remove(self.current)
        self.current = None
        self._sent_job = None
        self._orphaned_live = None
        self._job_reads = set()
        if self._live is not None and not self._live.reached:
            self._live = None  # never reached the executor; the requantizer releases it

    def _owes_progress(self) -> bool:
        """The requantizer runs a job we sent it and is not waiting for our LayerCommitted."""
        sent, supervisor, live = self._sent_job, self.supervisor, self._live
        if sent is None or supervisor is None or sent[0] != supervisor.generation:
            return False
        return live is None or live.job_id != sent[1]

    def _on_ready(self, _hello: RequantizerHello) -> None:
        self._later(self._dispatch())

    def _on_lost(self, reason: str) -> None:
        self._sent_job = None
        self._cancelling = None  # a cancelled job dies with the process; nothing is charged for it
        if self._live is not None and not self._live.reached:
            self._live = None  # its shared memory went with the requantizer; the job redoes the layer
        record = self.store.tasks.get(self.current) if self.store and self.current else None
        if record is None:
            return
        record.attempts += 1
        if record.attempts >= self.config.requantizer.max_attempts:
            self._end_job(record, ok=False, error=f"the requantizer was lost {record.attempts} times during this "
                                                  f"task's job, counted across server restarts (the last: {reason})")
        else:
            # a layer at the executors still (kept above) is committed, most likely, before it resumes
            if self._live is not None and self._live.job_id == job_id(record):
                self._orphaned_live = self._live.job_id
            resume_at = record.layers_done + int(self._orphaned_live is not None)
            record.message = f"{reason}; resuming at layer {resume_at}"  # RESUMING_AT reads it
            assert self.store is not None
            self.store.save()

    def _on_message(self, message: msgspec.Struct) -> None:
        if self._cancelling is not None and getattr(message, "job_id", None) == self._cancelling:
            # it has read the cancel (JobFinished), or is at a layer boundary and reads it next
            # (the cancel was sent before anything else)
            self._cancel_taken_up()
        if isinstance(message, LayerReady):
            self._on_layer_ready(message)
        elif isinstance(message, JobFinished):
            record = self._record_of(message.job_id)
            if record is not None:
                record.peak_rss_bytes = max(record.peak_rss_bytes, message.peak_rss_bytes)
                self._end_job(record, message.ok, message.error)

    def _on_layer_ready(self, ready: LayerReady) -> None:
        record = self._record_of(ready.job_id)
        if record is None or self.store is None:
            return  # a cancelled job's last layer: the requantizer releases it when cancelled
        record.decisions = [d for d in record.decisions if d["layer"] != ready.layer] + [
            Decision(layer=ready.layer, linear=o.linear, action=o.action, reason=o.reason, change=o.change,
                     errors_served=dict(o.errors_served), errors_new=dict(o.errors_new))
            for o in ready.linears]
        record.forward_seconds += ready.forward_seconds
        record.quantize_seconds += ready.quantize_seconds
        record.peak_rss_bytes = max(record.peak_rss_bytes, ready.peak_rss_bytes)
        if (resumed := RESUMING_AT.search(record.message)) is not None:  # it has: say so, not that it will
            if record.message.startswith(RESTARTED):
                record.message = f"resumed at layer {resumed.group(1)} after a server restart"
            else:
                record.message = (f"resumed at layer {resumed.group(1)} after the requantizer was lost "
                                  f"({record.attempts} of {self.config.requantizer.max_attempts} losses allowed; "
                                  "the log says why)")
        if ready.handle is None:
            record.layers_done = ready.layer + 1
            self.counts.layers_done += 1
            self.store.save()
            self._later(self._send(LayerCommitted(job_id=ready.job_id, layer=ready.layer, swapped=False)))
            return
        self.store.save()
        self._live = _LiveSwap(LayerSwap(layer=ready.layer, version=ready.version, handle=ready.handle),
                               ready.file, ready.job_id)
        self._live.digest = asyncio.get_running_loop().run_in_executor(None, layer_digest, ready.file)
        self.wake()

    def _live_settled(self, live: _LiveSwap, failures: list[str]) -> None:
        """Every executor has answered the live swap: the requantizer that runs its job hears
        it; a job held back by it (`_dispatch`) is sent now: a lost requantizer's resumes after
        the layer, or at it if the swap failed (likely the lost requantizer's shared memory,
        gone with it: a layer that is bad again fails the job then, as any failed swap does)."""
        if self._orphaned_live == live.job_id:
            self._orphaned_live = None
            record = self._record_of(live.job_id)
            if record is not None and failures:
                record.message = RESUMING_AT.sub(f"; resuming at layer {record.layers_done}", record.message)
        else:
            self._later(self._send(LayerCommitted(job_id=live.job_id, layer=live.swap.layer, swapped=not failures,
                                                  error=failures[0] if failures else "")))
        self._later(self._dispatch())

    def _end_job(self, record: TaskRecord, ok: bool, error: str) -> None:
        assert self.store is not None
        record.finished_at = time.time()
        compact_effect(record, self.config.requantizer.change_threshold)
        if ok:
            self.counts.succeeded += 1
            record.phase = READY
            if (source := self.store.hessian_sources.get(record.name)) and source.version == record.version:
                source.complete = True  # every layer holds its job's Hessians now
            record.message = ready_report(record, self.store, self.num_layers, self.config.requantizer.change_threshold)
        else:
            self.counts.failed += 1
            record.phase = FAILED
            record.message = (f"re-quantization failed; served on the base as it is: {error.rstrip('.')}. To retry, "
                              "add the task again with its calibration file: that is a new job, from layer 0, under a "
                              "new version")
            if record.name not in self.store.dropped:
                self.store.dropped.append(record.name)  # its partial Hessians serve no aggregate
        log.info("re-quantization ended", extra={"task": record.name, "phase": record.phase, "detail": record.message})
        self._finish_current()
        self.store.save()
        self._later(self._dispatch())
