"""Where the Hessians a task holds in the base's aggregate came from, and whether adding it
again brings anything new.

A task added again with the very adapter files and calibration samples its stored Hessians
were computed from has nothing to re-quantize. It used to queue a job all the same: the
samples ran again through the base as served now (not the one the checkpoint was computed
on), the task's Hessians came out a little different, and on the 4-bit suite base re-adding
`sentiment` with its own committed samples moved the aggregate by 1.25 % (median) and
re-quantized all 30 layers, changing most other tasks' greedy answers (an outside probe).
A deployment script that adds its tasks at every run must not re-roll the base each time.

Sources, by content (paths move, bytes do not):
  * a task added live whose job finished: its copies in the state directory;
  * a task of the checkpoint: the adapter signature and calibration sha256 recorded in its
    inlaid_quant.json (checkpoints written before the signature was recorded: unknown, so
    the job runs as before).
A name whose Hessians left the aggregate (removed, replaced) has none, and neither has one the
stored state no longer holds in full (a removed task's, once another job rewrote the layers).
"""

from __future__ import annotations

import filecmp
from pathlib import Path

from inlaid.engine.adapter_config import adapter_signature
from inlaid.quant.checkpoint_files import read_inlaid_metadata
from inlaid.quant.errors import CheckpointError
from inlaid.serve.state_gc import hessian_dirs, state_holds_task
from inlaid.serve.task_store import READY, TaskStore, file_sha256, same_adapter_files


def stored_hessians_match(name: str, adapter_dir: str, calibration: str, store: TaskStore,
                          quantized_dir: str | None, num_layers: int) -> str:
    """Where `name`'s stored Hessians came from ("its job (version 3)", "the checkpoint")
    when those were these adapter files and these calibration samples and the stored state
    still holds them; "" otherwise."""
    if name in store.dropped:
        return ""
    source = _source(name, adapter_dir, calibration, store, quantized_dir)
    state_dirs = hessian_dirs(store.hessian_dir, quantized_dir) if source else None
    return source if state_dirs is not None and state_holds_task(name, state_dirs, num_layers) else ""


def _source(name: str, adapter_dir: str, calibration: str, store: TaskStore, quantized_dir: str | None) -> str:
    record = store.tasks.get(name)
    if record is not None and record.version:  # a job of its own computed them (or is computing them)
        if record.phase != READY or not record.calibration:
            return ""
        try:
            same_samples = filecmp.cmp(record.calibration, calibration, shallow=False)
        except OSError:
            return ""
        same = same_samples and same_adapter_files(record.adapter_dir, adapter_dir)
        return f"its job (version {record.version})" if same else ""
    if not quantized_dir:
        return ""
    try:
        metadata = read_inlaid_metadata(Path(quantized_dir))
    except CheckpointError:
        return ""
    entry = next((task for task in (metadata or {}).get("tasks", []) if task.get("name") == name), None)
    if entry is None or not entry.get("adapter_signature") or not entry.get("calib_sha256"):
        return ""
    try:
        samples = file_sha256(calibration)
    except OSError:
        return ""
    signature = adapter_signature(adapter_dir)  # "-": unreadable, which no recorded signature is
    same = samples == entry["calib_sha256"] and signature != "-" and signature == entry["adapter_signature"]
    return "the checkpoint" if same else ""
