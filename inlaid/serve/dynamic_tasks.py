"""Tasks added, removed and followed on a running server. Torch-free: the coordinator's side of
docs/dynamic-tasks.md.

An added task serves at once, on the base as it is. With calibration samples, on a GPTQ base
whose checkpoint stores its Hessian state, and with a state directory, its re-quantization
job is queued (`requantization_jobs.py` runs the jobs and the layer handover). Added tasks,
their copied files and their jobs persist in the state directory (`task_store.py`): a
restarted server serves them again and resumes an unfinished job (`task_restore.py`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from inlaid.engine.adapter_weights import max_weights_bytes
from inlaid.protocol import ErrorCode, ReplacedConfigEntry, TaskStatusReply
from inlaid.quant.checkpoint_files import read_inlaid_metadata
from inlaid.quant.errors import CheckpointError
from inlaid.serve.config import ServerConfig
from inlaid.serve.hessian_sources import (HessianSource, changes_nothing, checkpoint_hessians_of_other_files,
                                          judge_samples, repeats_its_job, stored_view, twin_note)
from inlaid.serve.requantization_jobs import RequantizationJobs
from inlaid.serve.state_gc import hessian_dirs, prune_dropped
from inlaid.serve.task_inputs import (MAX_CALIBRATION_FILE_BYTES, TaskInputs, check_calibration_file,
                                      requantized_name_refusal, same_adapter_files)
from inlaid.serve.task_records import QUEUED, READY, REQUANTIZING, SERVING, TaskRecord
from inlaid.serve.task_registry import TaskError, TaskRegistry, check_absolute
from inlaid.serve.task_restore import restore_tasks
from inlaid.serve.task_status import cancelled_job_note, not_served_note, task_status_reply
from inlaid.serve.task_store import StateDirError, TaskStore

log = logging.getLogger("inlaid.dynamic_tasks")

SAVE_RETRY_S = 5.0  # a registry the state directory could not take is tried again this often


def requantization_blocker(config: ServerConfig) -> str:
    """Why an added task cannot re-quantize this server's base ("" when it can)."""
    quantized = config.engine.quantized_dir
    if not quantized:
        return "the server serves a full-precision base: there is nothing to re-quantize"
    if config.state_dir is None:
        return "no server.state_dir: re-quantized layers would have nowhere to persist"
    if not config.requantizer.enabled:
        return "requantizer.enabled is false"
    try:
        metadata = read_inlaid_metadata(Path(quantized))
    except CheckpointError as error:
        return str(error)
    if metadata is None:
        return f"{quantized} was not written by `inlaid quantize` (no inlaid_quant.json, no Hessian state)"
    if metadata.get("method") == "rtn":
        return "the base is RTN-quantized: it does not depend on any task's calibration"
    if not metadata.get("hessian_state"):
        return f"{quantized} was written without its Hessian state (--no-hessian-state)"
    return ""


class DynamicTasks:
    def __init__(self, config: ServerConfig, registry: TaskRegistry, wake: Callable[[], None],
                 on_task_count: Callable[[int], None] = lambda count: None) -> None:
        """on_task_count(tasks served): after every live addition or removal."""
        self.config = config
        self.registry = registry
        self._on_task_count = on_task_count
        self.num_layers = registry.engine.model_config.num_layers
        self.blocker = requantization_blocker(config)
        self.store: TaskStore | None = None
        if config.state_dir is not None:
            try:
                self.store = TaskStore(config.state_dir, {"model_dir": config.engine.model_dir,
                                                          "quantized_dir": config.engine.quantized_dir})
            except StateDirError as error:
                raise ValueError(str(error)) from None
        self.jobs = RequantizationJobs(config, self.store, self.num_layers, wake, executors=len(registry.engines))
        self._save_retries: asyncio.Task[None] | None = None
        self._discard_after_save: set[str] = set()  # copies released while the registry was unsaved
        if self.store is not None:
            self.store.after_save = self._collect_after_save  # (start-up collected before: no job ran)
            for name in config.tasks:  # a task served from the config counts again (not one added over it)
                if name in self.store.dropped and name not in self.store.tasks:
                    self.store.dropped.remove(name)
            self._prune_dropped(self.store)
            self.jobs.queue.extend(restore_tasks(self.store, config, registry, self.blocker))  # start() runs them
            self.store.save()
            registry.on_released.append(self._discard_if_unused)

    async def start(self) -> None:
        if self.store is not None:
            self._save_retries = asyncio.get_running_loop().create_task(self._retry_unsaved(self.store))
            self._save_retries.add_done_callback(_log_unexpected_end)
        if not self.blocker:
            await self.jobs.start()

    async def stop(self) -> None:
        await self.jobs.stop()
        if self._save_retries is not None:
            self._save_retries.cancel()
            await asyncio.gather(self._save_retries, return_exceptions=True)
        if self.store is not None and self.store.unsaved:
            self.store.save()  # a last try (it never raises): what is lost otherwise was logged

    async def _retry_unsaved(self, store: TaskStore) -> None:
        """A registry the directory could not take (full, read-only) is written once it can:
        without a later change, a restart would have lost it. Between saves, the collection
        runs here too: a cancel taken up, or a swap failed on every executor, frees a job's
        files without any save."""
        while True:
            await asyncio.sleep(SAVE_RETRY_S)
            if store.unsaved:
                store.save()  # (it collects once it succeeds)
            else:
                self._collect_after_save()

    def _unsaved_note(self) -> str:
        """For an admin call's answer: its change serves, but is not on disk yet."""
        if self.store is None or not self.store.unsaved:
            return ""
        return (f"; NOT SAVED: {self.store.unsaved}. It serves now; the server saves it as soon as the state "
                "directory can be written again, and a restart before that undoes it")

    # ------------------------------------------------------------------ admin calls
    def prepare(self, name: str, adapter_dir: str, calibration: str | None) -> TaskInputs:
        """Check the calibration file and copy the task's files into the state directory (a
        fresh directory per addition). File work only: it runs in a worker thread."""
        check_absolute(adapter_dir, "adapter_dir")
        if calibration:
            check_absolute(calibration, "calibration")
            if self.store is not None and not self.blocker and (refusal := requantized_name_refusal(name)):
                raise TaskError(ErrorCode.INVALID_REQUEST, refusal)
            check_calibration_file(calibration)
        if self.store is None:
            return TaskInputs(name, adapter_dir, calibration, copied=False)
        try:
            engine = self.registry.engine
            adapter_copy, calibration_copy = self.store.copy_inputs(
                name, adapter_dir, calibration, max_weights_bytes(engine.model_config, engine.config.max_lora_rank),
                MAX_CALIBRATION_FILE_BYTES)
        except OSError as error:
            source = str(error.filename or "")
            # a failed copy may name the source whichever side failed (shutil's fast copy did; a
            # write error names no file): errors only the destination can cause (a full disk or
            # quota, a read-only mount) are the state's
            writing = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
            if not writing and (source == calibration or os.path.dirname(source) == os.path.normpath(adapter_dir)):
                # the caller's file (gone or unreadable since it was checked), not the directory's
                raise TaskError(ErrorCode.INVALID_REQUEST, f"{source} cannot be read: "
                                                           f"{error.strerror or error}; nothing was added") from None
            where = (f" ({'copying ' if writing else ''}{error.filename})" if error.filename
                     else "")  # a full disk, a read-only mount
            raise TaskError(ErrorCode.INTERNAL, f"the task's files cannot be copied into the state directory "
                                                f"{self.store.root}{where}: {error.strerror or error}; nothing "
                                                "was added") from None
        # absolute whatever the state_dir was given as: each copy is checked again as a caller's path
        adapter_copy = os.path.abspath(adapter_copy)
        calibration_copy = os.path.abspath(calibration_copy) if calibration_copy else None
        if calibration_copy:  # what the requantizer reads is the copy: the source may have changed since
            try:
                check_calibration_file(calibration_copy)
            except TaskError as error:
                self.store.discard_copy(adapter_copy)
                raise TaskError(error.code, f"the calibration file changed while it was being added: "
                                            f"{error.message}") from None
        record = self.store.tasks.get(name)
        served = record.adapter_dir if record is not None else self.config.tasks.get(name)
        serves_as_now = served is not None and same_adapter_files(served, adapter_copy)
        inputs = TaskInputs(name, adapter_copy, calibration_copy, copied=True, serves_as_now=serves_as_now,
                            served_path=served if serves_as_now else None, stored_view=stored_view(self.store, name))
        if calibration_copy:  # what its Hessians would come from (hashed here: a worker thread)
            judge_samples(inputs, self.store, self.config.engine.quantized_dir, self.num_layers)
        elif served is None:
            inputs.checkpoint_hessians_differ = checkpoint_hessians_of_other_files(
                name, adapter_copy, self.store, self.config.engine.quantized_dir, self.num_layers)
        return inputs

    def add(self, inputs: TaskInputs) -> str:
        """Serve the task at once; queue its re-quantization when it brought calibration samples."""
        name, store = inputs.name, self.store
        record = store.tasks.get(name) if store else None
        try:
            if record is not None and record.phase in (QUEUED, REQUANTIZING):
                doing = "is queued to re-quantize the base" if record.phase == QUEUED else "is re-quantizing the base"
                if store is not None and repeats_its_job(inputs, store, self.registry.tasks.get(name)):
                    # A deployment script adding its tasks at every run (docs) met task_busy here.
                    state = "is queued" if record.phase == QUEUED else "is running"
                    return self._add_unchanged(inputs, f"its re-quantization job (version {record.version}) {state}, "
                                                       "as before")
                raise TaskError(ErrorCode.TASK_BUSY, f"task {name!r} {doing} (a job of its own add); remove it first "
                                                     "(which cancels the job) or wait until it is ready")
            if store is not None and changes_nothing(inputs, store, self.registry.tasks.get(name)):
                return self._add_unchanged(inputs)
            inputs.already_served = self.registry.serves_unchanged(name, inputs.adapter_dir, inputs.signature)
            text = self.registry.add(name, inputs.adapter_dir, inputs.signature)
        except TaskError:
            if store is not None and inputs.copied:
                store.discard_copy(inputs.adapter_dir)
            raise
        self._on_task_count(len(self.registry.tasks))
        replaced_entry = None if inputs.already_served else self.replaced_config_entry(name, inputs.adapter_dir)
        inputs.replaced_config_entry = replaced_entry
        if replaced_entry is not None:  # allowed (an adapter updated
            # without a restart), never silently: said here, and as a fact in the AdminReply
            text += (f"; it replaces the config's [tasks] entry ({replaced_entry.adapter_dir}) "
                     + ("until it is removed, restarts included (the state directory keeps it)"
                        if replaced_entry.kept_across_restarts else "until the server restarts (no server.state_dir)"))
            log.warning("a live addition replaces a task of the config's [tasks]",
                        extra={"task": name, "config_adapter_dir": self.config.tasks[name],
                               "adapter_dir": inputs.adapter_dir})
        if store is None:
            return text + (f"; not re-quantized: {self.blocker}" if inputs.calibration else "")
        record = TaskRecord(name=name, adapter_dir=inputs.adapter_dir, calibration=inputs.calibration, phase=SERVING,
                            layers_total=self.num_layers)
        if inputs.hessians_from and inputs.stored_view != stored_view(store, name):
            inputs.hessians_from = ""  # a removal or another addition ran since `prepare` judged them
        if not inputs.calibration:
            record.message = "added without calibration samples: served on the current base"
        elif self.blocker:
            record.message = f"not re-quantized: {self.blocker}"
        elif inputs.hessians_from:
            record.message = (f"added again with the adapter files and calibration samples its Hessians came from "
                              f"({inputs.hessians_from}): nothing to re-quantize, the base stays as it is")
        else:
            record.phase, record.version = QUEUED, store.next_version
            store.next_version += 1
            store.hessian_sources[name] = HessianSource(record.version, inputs.copy_signature, inputs.calib_sha256)
            if name in store.dropped:
                store.dropped.remove(name)  # its job computes its Hessians afresh
        replaced = store.tasks.get(name)
        if (record.phase == SERVING and (not inputs.calibration or inputs.hessians_from) and replaced is not None
                and replaced.phase == READY and inputs.serves_as_now):
            # the same files (and samples, or none): its layers still serve (it read version 0)
            samples = " and calibration samples (nothing to re-quantize)" if inputs.calibration else ""
            message = f"added again with the same files{samples}: its re-quantization (version {replaced.version}) "
            record = replace(replaced, adapter_dir=inputs.adapter_dir,
                             calibration=inputs.calibration or replaced.calibration, message=message + "still serves")
        if replaced is not None and replaced.suspended_phase in (QUEUED, REQUANTIZING):  # a held job (task_restore.py)
            text += (f"; its unfinished re-quantization (stopped at layer {replaced.layers_done} of "
                     f"{replaced.layers_total}, held until a restart that can run it) is dropped: this add replaces it")
        replaces = ((replaced is not None or replaced_entry is not None)
                    and not inputs.serves_as_now and not inputs.hessians_from)  # (else they came from these files)
        if record.phase != QUEUED and (replaces or inputs.checkpoint_hessians_differ):
            dropped_note = self._drop_replaced_hessians(store, name, "with the adapter it replaces" if replaces else
                                                        "by the checkpoint's quantization (with other adapter files)")
            text += dropped_note
            inputs.hessians_dropped = bool(dropped_note)
        store.tasks[name] = record
        store.save()
        if replaced is not None:  # the registry has released it (replaced while idle), or never served it
            self._discard_if_unused(replaced.adapter_dir)
        if record.phase == QUEUED:
            self.jobs.submit(name)
            text += f"; serving on the current base, re-quantization queued (version {record.version})"
            text += twin_note(inputs.twin)
            return text + self._unsaved_note()
        return f"{text}; {record.message}" + self._unsaved_note()

    def _add_unchanged(self, inputs: TaskInputs, job_note: str = "") -> str:
        """Nothing to load, copy or re-quantize: the name stays where it is served, the fresh copy goes
        (on the copy it was "replaced", and `task_busy` with requests in flight: a script re-adding failed).
        `job_note`: the files and samples of the name's job still queued or running, said so."""
        assert self.store is not None and inputs.served_path is not None
        text = self.registry.add(inputs.name, inputs.served_path, inputs.signature)
        inputs.already_served = True
        self.store.discard_copy(inputs.adapter_dir)
        if job_note:
            return f"{text}; added again with the same files and calibration samples: {job_note}"
        record = self.store.tasks.get(inputs.name)
        kept = ""
        if record is not None and record.phase == READY:  # its job's layers (if it swapped any) still serve
            kept = f"its re-quantization (version {record.version}) " + self._what_still_serves(record)
            kept += not_served_note(self.store, record)
        if inputs.calibration:
            return (f"{text}; added again with the same files and the calibration samples its Hessians came from "
                    f"({inputs.hessians_from}): nothing to re-quantize" + (f"; {kept}" if kept else ""))
        return f"{text}; added again with the same files: " + (kept or "served as it was")

    def _what_still_serves(self, record: TaskRecord) -> str:
        """Of a ready job's layers: served at its version, or replaced by later jobs' (all of them
        replaced was said to have "changed no layer", against the status's 30 superseded: a probe)."""
        assert self.store is not None
        own = self.store.layers_of(record.version)
        later = self.store.layers_superseded(record)
        replaced = f"{later} {'layer' if later == 1 else 'layers'} it changed now serve later versions' re-quantization"
        if own:
            return "still serves" + (f" ({replaced})" if later else "")
        if later:
            return f"serves no layer of its own: the {replaced}"
        return "changed no layer: the base serves as it was"

    def _drop_replaced_hessians(self, store: TaskStore, name: str,
                                whose: str = "with the adapter it replaces") -> str:
        """Another adapter serves `name` now, with no job of its own: the Hessians stored for the
        name, computed with the adapter it replaces, leave the aggregate (every later job weighed
        it and its quality gate by them), as a removal's do. Returns what the reply says of it:
        nothing where an earlier replacement had dropped them (said again, it blamed the adapter
        this add replaces for Hessians another one had computed: an outside probe)."""
        if name in store.dropped:
            return ""
        store.dropped.append(name)
        self._prune_dropped(store)  # forgets the name if the state holds nothing of it
        if name not in store.dropped:
            return ""
        return (f"; the Hessians stored for it were computed {whose} and leave the aggregate "
                "(add it with its calibration file to re-quantize the base for this adapter)")

    def replaced_config_entry(self, name: str, adapter_dir: str) -> ReplacedConfigEntry | None:
        """The config's [tasks] entry an addition of `name` replaces (None: no task of that name
        there, or its own adapter re-added without a state directory): for the AddTask's AdminReply."""
        configured = self.config.tasks.get(name)
        if configured is None or (self.store is None and os.path.realpath(adapter_dir) == os.path.realpath(configured)):
            return None
        return ReplacedConfigEntry(adapter_dir=configured, kept_across_restarts=self.store is not None)

    def remove(self, name: str) -> str:
        store = self.store
        if store is not None and name in store.tasks and name not in self.registry.tasks \
                and name not in self.registry.draining:  # stored, but a restart could not serve it
            text = f"task {name!r} removed (it was not served: {store.tasks[name].message})"
        else:
            text = self.registry.remove(name)
        self._on_task_count(len(self.registry.tasks))
        if name in self.config.tasks:
            text += self._config_task_removed(name)
        if store is None:
            return text
        record = store.tasks.pop(name, None)
        if record is not None and record.phase in (QUEUED, REQUANTIZING):
            self.jobs.cancel(record)
            swapped = store.layers_of(record.version)
            text += cancelled_job_note(record, swapped)
        if name not in store.dropped:
            store.dropped.append(name)
        # (its own name stays: a cancelled job may still write a layer's state with its Hessians)
        self._prune_dropped(store, keep=name)
        store.save()  # then collects the layer files its job leaves (`_collect_after_save`)
        if record is not None:  # now if nothing is in flight; else when its last request ends
            self._discard_if_unused(record.adapter_dir)
        return text + self._unsaved_note()

    def _config_task_removed(self, name: str) -> str:
        """What the removal of a name of the config's [tasks] means, which a bare "removed"
        hid: the config serves it again at the next start."""
        text = (f"; {name!r} is in the config's [tasks]: the name is not served until the next restart, which "
                f"serves the config's adapter ({self.config.tasks[name]}) again (take it out of the config to "
                "keep it removed)")
        if self.store is not None and not self.blocker:
            text += (". Its Hessians leave the aggregate now; they rejoin at that restart only if no re-quantization "
                     "ran in between, else only when it is added again with its calibration file")
        return text

    def _collect_after_save(self) -> None:
        """After every save (TaskStore.after_save): the adapter copies released while the
        registry could not be saved (a removal on a full disk kept its copy until the next
        start: an outside probe), and the layer files that neither the registry just written
        nor a job nor an executor still uses (`state_gc.py` says why these)."""
        store = self.store
        assert store is not None
        released, self._discard_after_save = self._discard_after_save, set()
        for adapter_dir in sorted(released):
            self._discard_if_unused(adapter_dir)
        active = (record.version for record in store.tasks.values() if record.phase in (QUEUED, REQUANTIZING))
        try:
            store.collect_layers(*self.jobs.files_in_use(active))
        except OSError as error:  # (the layers directory unreadable) the next pass tries again; the
            # periodic one must not end the loop that also retries unsaved registries
            log.warning("the state directory's collection failed", extra={"error": str(error)})

    def _prune_dropped(self, store: TaskStore, keep: str = "") -> None:
        """Forget the dropped names the stored state no longer holds (`state_gc.py`): the list
        grew with every name ever removed, each sent to every job since. Kept besides: `keep`
        and the task of a cancelled job still computing (it may write its costs or Hessians
        yet: forgotten, they would weigh in every later aggregate)."""
        dirs = hessian_dirs(store.hessian_dir, self.config.engine.quantized_dir)
        if dirs is not None:
            writing = {keep, self.jobs.cancelling_task}
            store.dropped = prune_dropped(store.dropped, dirs, self.num_layers, keep=lambda name: name in writing)

    def _discard_if_unused(self, adapter_dir: str) -> None:
        """Delete the state directory's copy of an adapter (and of its calibration file) once
        no stored task refers to it and no task in the registry, draining ones included, is
        registered with it. Called when the registry releases a directory and when a record
        leaves the store: whichever comes last deletes. Directories the user configured are
        never copies and stay (`TaskStore.discard_copy`). Restarts still collect what is left."""
        store = self.store
        if store is None or self.registry.serves(adapter_dir):
            return
        if store.unsaved:  # the registry on disk may still name it: a restart must find its files
            self._discard_after_save.add(adapter_dir)  # tried again after the next save
            return
        if any(record.adapter_dir == adapter_dir for record in store.tasks.values()):
            return
        if store.discard_copy(adapter_dir):
            log.info("adapter copy deleted", extra={"adapter_dir": adapter_dir})

    def status(self, request_id: str, name: str) -> TaskStatusReply:
        return task_status_reply(request_id, name, self.store, self.registry, self.num_layers,
                                 full_precision=not self.config.engine.quantized_dir,
                                 change_threshold=self.config.requantizer.change_threshold)


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the state directory's save retries ended", extra={"error": repr(task.exception())})
