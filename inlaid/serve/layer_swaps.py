"""The layer handover to the executors: the live swap, the committed layers each lacks, each one's view of them."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from inlaid.protocol import LayerHandle, LayerSwap, LayerSwapResult
from inlaid.serve.task_records import CommittedLayer
from inlaid.serve.task_store import TaskStore

log = logging.getLogger("inlaid.requantization")

CHECKPOINT_VERSION = 0  # what a layer loaded from the checkpoint carries (ModelRunner.layer_versions)


@dataclass
class _LiveSwap:
    swap: LayerSwap
    file: str
    job_id: str
    sent_to: set[int] = field(default_factory=set)  # executors with it in a plan, the result not yet back
    results: dict[int, LayerSwapResult] = field(default_factory=dict)  # executor -> its answer
    # The file's sha256, computed in a worker thread while the executors swap the layer in
    # (hashing on the event loop would stall every stream for as long).
    digest: asyncio.Future[str] | None = None

    @property
    def reached(self) -> bool:
        """Some executor has it (or had it in a plan)."""
        return bool(self.sent_to or self.results)


@dataclass
class JobCounts:
    """Since the server started: for stats and /metrics."""

    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0  # by the removal of its task, queued or running
    layers_done: int = 0  # swapped into every executor, or kept as served (nothing to swap)


def _file_swap(layer: int, entry: CommittedLayer) -> LayerSwap:
    """The swap that installs a committed layer from its file."""
    return LayerSwap(layer=layer, version=entry.version, handle=LayerHandle(transport="file", name=entry.file))


class LayerSwaps:
    """The executor's side of the re-quantization jobs, mixed into `RequantizationJobs`,
    which sets the attributes below and supplies `_record_of`, `_later`, `_send` and
    `_live_settled` (every executor has answered the live swap: tell its job)."""

    store: TaskStore | None
    checkpoint_dir: str  # the quantized checkpoint the executors load (names a revert's handle)
    counts: JobCounts
    executors: int
    _live: _LiveSwap | None
    _restore: list[dict[int, LayerSwap]]
    _swap_step_ids: Iterator[int]

    def _committed_swaps(self) -> dict[int, LayerSwap]:
        """Every committed layer as a file swap: what a fresh executor lacks."""
        if self.store is None:
            return {}
        return {layer: _file_swap(layer, entry) for layer, entry in self.store.layers.items()}

    def for_executor(self, executor: int) -> "ExecutorSwaps":
        return ExecutorSwaps(self, executor)

    def has_swaps(self, executor: int = 0) -> bool:
        live = self._live
        return bool(self._restore[executor]) or (
            live is not None and executor not in live.sent_to and executor not in live.results)

    def next_swap_step_id(self) -> int:
        return next(self._swap_step_ids)

    def take_swaps(self, executor: int = 0) -> list[LayerSwap]:
        """The swaps for the executor's next plan: committed layers it lacks, then the live one."""
        restore = self._restore[executor]
        swaps = [restore[layer] for layer in sorted(restore)]
        restore.clear()
        live = self._live
        if live is not None and executor not in live.sent_to and executor not in live.results:
            swaps.append(live.swap)
            live.sent_to.add(executor)
        return swaps

    def on_executor_lost(self, executor: int = 0) -> None:
        self._restore[executor] = self._committed_swaps()
        if self._live is not None:  # its result (or the layer it swapped in) died with it: send it again
            self._live.sent_to.discard(executor)
            self._live.results.pop(executor, None)

    def on_swap_result(self, result: LayerSwapResult, executor: int = 0) -> None:
        store = self.store
        if store is None:
            return
        live = self._live
        if (live is not None and executor in live.sent_to
                and (live.swap.layer, live.swap.version) == (result.layer, result.version)):
            live.sent_to.discard(executor)
            live.results[executor] = result
            if len(live.results) < self.executors:
                return  # the others have not answered yet
            self._live = None
            failures = [r.error or "failed" for r in live.results.values() if not r.ok]
            if not failures:  # the commit: served everywhere, so recorded (whatever became of its job)
                entry = store.layers[result.layer] = CommittedLayer(version=result.version, file=live.file)
                if live.digest is not None and live.digest.done():
                    entry.sha256 = live.digest.result()
                elif live.digest is not None:  # recorded once known (a restart before: finiteness check only)
                    live.digest.add_done_callback(functools.partial(self._record_digest, result.layer, entry))
                record = self._record_of(live.job_id)
                if record is not None:
                    record.layers_done = result.layer + 1
                self.counts.layers_done += 1
                store.save()
            elif self.executors > 1:  # (one executor kept the registry's layer: only a restore precedes a swap)
                if len(failures) < self.executors:
                    log.error("a layer swap failed on some executors only; every executor goes back to the "
                              "committed layer", extra={"layer": result.layer, "error": failures[0]})
                # Those that took it serve an uncommitted layer; one that failed may have kept a
                # layer a failed restore elsewhere dropped meanwhile (it was left out then: below).
                self._back_to_registry(result.layer, list(range(self.executors)))
            self._live_settled(live, failures)
            return
        if not result.ok and result.version == CHECKPOINT_VERSION:  # a revert (`_back_to_registry`)
            log.error("an executor could not go back to the checkpoint's layer",
                      extra={"layer": result.layer, "error": result.error, "executor": executor})
        elif not result.ok:
            log.error("a committed layer could not be restored (or gone back to); it leaves the registry",
                      extra={"layer": result.layer, "version": result.version, "error": result.error,
                             "executor": executor})
            entry = store.layers.get(result.layer)
            if entry is not None and entry.version == result.version:
                del store.layers[result.layer]
                store.save()
                # Every executor, the failed one too (a revert that failed leaves it on a layer the
                # registry never held), but one that has the live swap of this layer: it gets
                # that swap replaced there, or reverted with the others if it fails (above).
                live = self._live
                self._back_to_registry(result.layer, [
                    e for e in range(self.executors) if not (
                        live is not None and live.swap.layer == result.layer and (e in live.sent_to or e in live.results))])

    def _back_to_registry(self, layer: int, executors: list[int]) -> None:
        """Executors that serve a layer the registry does not hold (a restore that failed on
        another dropped it; a live swap that failed on another was not committed) go back to
        what it holds, the checkpoint's layer if nothing, before their next step, so that all
        serve one version and a restart serves it too. Plans run in order: this comes after
        any swap of the layer already sent there, and replaces one still queued. An executor
        that already serves what the registry holds swaps it in again: a failure path, rare."""
        entry = self.store.layers.get(layer) if self.store is not None else None
        swap = (_file_swap(layer, entry) if entry is not None else
                LayerSwap(layer=layer, version=CHECKPOINT_VERSION,
                          handle=LayerHandle(transport="checkpoint", name=self.checkpoint_dir)))
        for executor in executors:
            self._restore[executor][layer] = swap

    def _record_digest(self, layer: int, entry: CommittedLayer, digest: asyncio.Future[str]) -> None:
        if self.store is not None and not digest.cancelled() and self.store.layers.get(layer) is entry:
            entry.sha256 = digest.result()  # (else superseded meanwhile)
            self.store.save()


class ExecutorSwaps:
    """One executor's view of the swaps: the `step_loop.SwapSource` its step loop asks."""

    def __init__(self, jobs: LayerSwaps, executor: int) -> None:
        self.jobs = jobs
        self.executor = executor

    def has_swaps(self) -> bool:
        return self.jobs.has_swaps(self.executor)

    def take_swaps(self) -> list[LayerSwap]:
        return self.jobs.take_swaps(self.executor)

    def next_swap_step_id(self) -> int:
        return self.jobs.next_swap_step_id()
