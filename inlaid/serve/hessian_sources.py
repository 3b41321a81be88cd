"""Where the Hessians a task holds in the base's aggregate came from, and whether adding it
again brings anything new.

A task added again with the very adapter files and calibration samples its stored Hessians
were computed from has nothing to re-quantize. It used to queue a job all the same: on the
4-bit suite base, re-adding `sentiment` with its own committed samples read as a 1.25 %
(median) aggregate move (the change was measured without its earlier Hessians, fixed since
in incremental_linears.py), re-quantized all 30 layers and changed most other tasks' greedy
answers (an outside probe). A deployment script that adds its tasks at every run must not
re-roll the base, nor spend minutes of the requantizer, each time.

Sources, by content (paths move, bytes do not), the adapter signature and the calibration
file's sha256:
  * a task whose own job wrote its Hessians: `TaskStore.hessian_sources`, recorded when the
    job is queued and complete when it finishes (kept when the task is removed: its
    Hessians stay in the state and rejoin with a config task at a restart; a cancelled or
    failed job wrote some layers only and matches nothing);
  * else a task of the checkpoint: what its inlaid_quant.json records (checkpoints written
    before the signature was recorded: unknown, so the job runs as before).
A name whose Hessians left the aggregate (removed, replaced) has none, and neither has one the
stored state no longer holds in full (a removed task's, once another job rewrote the layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from inlaid.engine.adapter_config import adapter_signature
from inlaid.quant.checkpoint_files import read_inlaid_metadata
from inlaid.quant.errors import CheckpointError
from inlaid.serve.state_gc import hessian_dirs, state_holds_task

if TYPE_CHECKING:  # the store keeps HessianSource records: it imports this module
    from inlaid.serve.task_inputs import TaskInputs
    from inlaid.serve.task_store import TaskStore


@dataclass
class HessianSource:
    """What a task's Hessians in the stored state were computed from (its latest job's inputs):
    `complete` once that job finished, so that a cancelled or failed one, which wrote some
    layers only, matches nothing."""
    version: int
    adapter_signature: str
    calib_sha256: str
    complete: bool = False


# task -> (adapter signature, calibration sha256, where its stored Hessians came from)
Sources = dict[str, tuple[str | None, str | None, str]]


def recorded_sources(store: TaskStore, quantized_dir: str | None) -> Sources:
    """What each task's stored Hessians were computed from, as recorded: its latest job's inputs
    (a job not finished matches nothing: None, None), else the checkpoint's metadata."""
    sources: Sources = {name: (known.adapter_signature, known.calib_sha256, f"its job (version {known.version})")
                        if known.complete else (None, None, "") for name, known in store.hessian_sources.items()}
    try:
        metadata = read_inlaid_metadata(Path(quantized_dir)) if quantized_dir else None
    except CheckpointError:
        metadata = None
    for entry in (metadata or {}).get("tasks", []):
        sources.setdefault(str(entry.get("name")),
                           (entry.get("adapter_signature"), entry.get("calib_sha256"), "the checkpoint"))
    return sources


def stored_hessians_match(name: str, signature: str, calib_sha256: str, store: TaskStore, sources: Sources,
                          quantized_dir: str | None, num_layers: int) -> str:
    """Where `name`'s stored Hessians came from ("its job (version 3)", "the checkpoint")
    when those were the adapter files of this `signature` (adapter_config.adapter_signature)
    and the calibration file of this sha256, and the stored state still holds them; ""
    otherwise. `sources`: `recorded_sources`."""
    if name in store.dropped or signature == "-":  # "-": unreadable files, which match nothing
        return ""
    record = store.tasks.get(name)
    if record is not None and record.version and name not in store.hessian_sources:
        return ""  # a job of a registry written before sources were recorded: unknown
    recorded = sources.get(name)
    source = recorded[2] if recorded is not None and recorded[:2] == (signature, calib_sha256) else ""
    state_dirs = hessian_dirs(store.hessian_dir, quantized_dir) if source else None
    return source if state_dirs is not None and state_holds_task(name, state_dirs, num_layers) else ""


def checkpoint_hessians_of_other_files(name: str, adapter_dir: str, store: TaskStore, quantized_dir: str | None,
                                      num_layers: int) -> bool:
    """Whether the checkpoint's stored Hessians for `name` were computed with other adapter
    files than `adapter_dir`'s, for a name this state has no record of (a checkpoint task's
    name given to another adapter live): they must then leave the aggregate, as a replaced
    task's do (they kept weighing every later job and its quality gate, without a word: an
    outside probe). False where the checkpoint does not record the files (unknown)."""
    if name in store.dropped or name in store.tasks or name in store.hessian_sources:
        return False
    recorded = recorded_sources(store, quantized_dir).get(name)
    if recorded is None or recorded[0] is None or recorded[0] == adapter_signature(adapter_dir):
        return False
    state_dirs = hessian_dirs(store.hessian_dir, quantized_dir)
    return state_dirs is not None and state_holds_task(name, state_dirs, num_layers)


def twin_task(name: str, signature: str, calib_sha256: str, store: TaskStore, sources: Sources) -> str:
    """Another task whose stored Hessians came from these very files and samples ("" if none):
    a job for `name` then weighs them twice in the aggregate (an outside probe added a copy of
    `sentiment` under a new name: 30 of 30 layers re-quantized, without a word)."""
    if signature == "-":
        return ""
    return next((other for other, (*files, _) in sorted(sources.items())
                 if other != name and other not in store.dropped and files == [signature, calib_sha256]), "")


def judge_samples(inputs: TaskInputs, store: TaskStore, quantized_dir: str | None, num_layers: int) -> None:
    """Fill in what an add with calibration samples brings (file work: a worker thread)."""
    from inlaid.serve.task_store import file_sha256  # (the store imports this module for HessianSource)

    assert inputs.calibration is not None
    inputs.copy_signature = adapter_signature(inputs.adapter_dir)
    inputs.calib_sha256 = file_sha256(inputs.calibration)
    sources = recorded_sources(store, quantized_dir)  # the checkpoint's metadata, read once
    inputs.hessians_from = stored_hessians_match(inputs.name, inputs.copy_signature, inputs.calib_sha256, store,
                                                 sources, quantized_dir, num_layers)
    inputs.twin = twin_task(inputs.name, inputs.copy_signature, inputs.calib_sha256, store, sources)


def twin_note(twin: str) -> str:
    """What an add's reply says of a twin (`twin_task`)."""
    return (f"; note: its adapter files and calibration samples are byte for byte task {twin!r}'s, so the "
            "aggregate weighs them twice") if twin else ""


def stored_view(store: TaskStore, name: str) -> tuple[object, ...]:
    """What the name's stored Hessians were judged by (in a worker thread): a removal or another
    addition on the event loop before the add changes it."""
    record = store.tasks.get(name)
    return ((record.adapter_dir, record.version, record.phase) if record is not None else None,
            name in store.dropped)


def repeats_its_job(inputs: TaskInputs, store: TaskStore, served_now: str | None) -> bool:
    """The name's job (queued or running) was made from these very adapter files and samples,
    served from `served_now`, where it is served now: adding them again changes nothing."""
    source = store.hessian_sources.get(inputs.name)
    return (inputs.copied and bool(inputs.calibration) and inputs.served_path is not None
            and served_now == inputs.served_path and source is not None
            and (source.adapter_signature, source.calib_sha256) == (inputs.copy_signature, inputs.calib_sha256))


def changes_nothing(inputs: TaskInputs, store: TaskStore, served_now: str | None) -> bool:
    """The name serves these very files from `served_now`, where it is served now, and brings no
    samples or the ones its stored Hessians came from (on a store no call has changed since)."""
    return (inputs.copied and inputs.served_path is not None and served_now == inputs.served_path
            and inputs.stored_view == stored_view(store, inputs.name)
            and (not inputs.calibration or bool(inputs.hessians_from)))
