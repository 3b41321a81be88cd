"""The server's state directory: dynamically added tasks and the quantization they built.
Torch-free (the coordinator owns it).

    STATE_DIR/registry.json             tasks, their re-quantization progress, committed layers
    STATE_DIR/adapters/<name>.<id>/     a copy of each added adapter (a fresh directory per
                                        addition: the executor caches adapters by path),
                                        deleted once its task is removed and drained or replaced
    STATE_DIR/calibration/<name>.<id>.jsonl
    STATE_DIR/quant/layers/layer_007.v3.safetensors   re-quantized layers (written by the requantizer)
                                        (the ones nothing uses any more collected as it runs: state_gc.py)
    STATE_DIR/quant/hessian_state/layer_007.safetensors  merged Hessian state (ditto)

    STATE_DIR/server.lock               the server's exclusive lock on the directory (its pid inside)

A layer is *committed* once the executor has swapped it in; registry.json lists exactly the
committed layers (each with the sha256 of its file), so a restarted server (or executor)
serves what was served before. Every write goes to a temporary file of its own (named for
the writing process and thread) renamed over the old one.

One server per state directory: the store takes the directory's lock before it reads or
collects anything (inlaid/serve/state_dir_lock.py says why and how).

Nothing is ever deleted on a guess: the registry is type-checked as it loads, anything it
cannot be read as (a broken link, a directory, a wrong-typed field) refuses the start, and a
state directory holding files but no registry is refused too, since its garbage collection
would take every stored adapter and layer with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import uuid
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable, Collection

from inlaid.bounded_files import copy_bounded
from inlaid.engine.adapter_config import ADAPTER_FILES, CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE
from inlaid.serve.hessian_sources import HessianSource
from inlaid.serve.state_dir_lock import StateDirError, lock_state_dir
from inlaid.serve.state_gc import ADAPTER_COPY, collect_copies, collect_hessian_temporaries, collect_layer_files
from inlaid.serve.task_records import CommittedLayer, TaskRecord, checked, entries, layer_index, task_record

log = logging.getLogger("inlaid.dynamic_tasks")

FORMAT_VERSION = 1
REGISTRY_FILE = "registry.json"


# The subdirectories whose files only registry.json accounts for (and collects).
STORED_DIRS = ("adapters", "calibration", "quant/layers", "quant/hessian_state")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def layer_digest(path: str) -> str:
    """The sha256 a layer is committed with; "" if its file cannot be read (it is then
    restored with the executor's finiteness check only)."""
    try:
        return file_sha256(path)
    except OSError as error:
        log.warning("a re-quantized layer file cannot be read for its checksum", extra={"file": path,
                                                                                          "error": str(error)})
        return ""


class TaskStore:
    def __init__(self, state_dir: str | Path, base: dict[str, str | None]) -> None:
        """`base`: what the state extends (model dir, quantized dir); a state directory
        written for another base is refused."""
        self.root = Path(state_dir).expanduser()
        self.layers_dir = self.root / "quant" / "layers"
        self.hessian_dir = self.root / "quant" / "hessian_state"
        # Before anything is read or collected: a second server's garbage collection would
        # delete the first one's uncommitted layers.
        self.lock = lock_state_dir(self.root)
        self._remove_stale_temporaries()
        for name in ("quant", *STORED_DIRS):
            if (self.root / name).is_symlink():  # collection would delete unused files wherever it points
                raise StateDirError(f"{self.root / name} is a symbolic link: the server deletes the files it no longer "
                                    "uses in it, so it must be a directory of the state directory's own")
        try:
            for name in STORED_DIRS:
                (self.root / name).mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file where a directory belongs, no permission...
            raise StateDirError(f"{self.root} cannot be used as a state directory: {error}") from error
        self.base = base
        self.tasks: dict[str, TaskRecord] = {}
        self.layers: dict[int, CommittedLayer] = {}
        self.dropped: list[str] = []  # tasks whose stored Hessians no aggregate uses any more
        # `dropped` as the last job that ended ready saw it (what a later job's move owes to the
        # drops since): None in a registry written before it was kept (unknown), [] in a new one.
        self.last_job_drops: list[str] | None = []
        self.hessian_sources: dict[str, HessianSource] = {}  # absent: the checkpoint's, if any
        self.next_version = 1
        self.unsaved = ""  # why the last save failed ("": the registry holds the state in memory)
        # Called after every save that succeeded: the run-time collection (`state_gc.py`), set by
        # the server, which knows what its jobs and executors still use (None: none).
        self.after_save: Callable[[], None] | None = None
        path = self.root / REGISTRY_FILE
        if os.path.lexists(path):  # a broken link or a directory is no fresh state: it is refused
            self._load(path)
            self._verify_layers()
            self._collect_garbage()  # only ever against a registry that was read
        else:
            self._refuse_orphaned_files(path)

    def _refuse_orphaned_files(self, path: Path) -> None:
        """No registry: a fresh state directory, unless files are stored in it. The registry is
        written when the server first starts on it, so stored files without one mean it was
        deleted or lost; collecting them would delete every adapter copy and layer."""
        stored = {name: sum(1 for _ in (self.root / name).iterdir()) for name in STORED_DIRS}
        if any(stored.values()):
            held = ", ".join(f"{count} in {name}/" for name, count in stored.items() if count)
            raise StateDirError(f"{path} is missing but {self.root} holds stored files ({held}): the registry was "
                                "deleted or lost. Restore it from a backup, or empty the state directory (or use "
                                "another server.state_dir) to start afresh")

    def _load(self, path: Path) -> None:
        try:
            if not path.is_file():
                raise ValueError("not a regular file (a broken symbolic link, a loop of them, a directory, a "
                                 "device, FIFO or socket?)")
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON object was expected, not {type(raw).__name__}")
            if raw.get("format") != FORMAT_VERSION:
                raise StateDirError(f"{path} has format {raw.get('format')!r}; this version of inlaid reads format "
                                    f"{FORMAT_VERSION}: use another server.state_dir")
            if raw.get("base") != self.base:
                raise StateDirError(f"{self.root} holds the state of another base ({raw.get('base')}); this "
                                    f"server serves {self.base}: use another server.state_dir")
            self.tasks = {name: task_record(name, record) for name, record in entries(raw, "tasks").items()}
            for record in self.tasks.values():
                record.adapter_dir = self._absolute(record.adapter_dir)
                record.calibration = record.calibration and self._absolute(record.calibration)
            self.layers = {layer_index(key): checked(CommittedLayer, entry, f"layers.{key}")
                           for key, entry in entries(raw, "layers").items()}
            for entry in self.layers.values():
                entry.file = self._absolute(entry.file)
            self.dropped = checked(list[str], raw.get("dropped"), "dropped")
            self.last_job_drops = checked(list[str] | None, raw.get("last_job_drops"), "last_job_drops")
            self.hessian_sources = checked(dict[str, HessianSource], raw.get("hessian_sources", {}), "hessian_sources")
            self.next_version = checked(int, raw.get("next_version"), "next_version")
            if self.next_version < 1:
                raise ValueError(f"next_version: {self.next_version} < 1")
        except OSError as error:  # permissions, I/O: the file may be whole, so nothing is said to be lost
            raise StateDirError(f"{path} is unreadable: {type(error).__name__}: {error}") from error
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # a wrong shape, too
            # the server writes it whole (a rename) or not at all: damage came from outside
            raise StateDirError(f"{path} is unreadable: {type(error).__name__}: {error}. Restore it from a backup, "
                                "or move the state directory aside (or use another server.state_dir) to start "
                                "afresh, adding its tasks again") from error

    def _verify_layers(self) -> None:
        """Committed layers whose file is gone or changed since the commit (its sha256 differs)
        are restored by no executor: the checkpoint's layer serves instead, as when an
        executor cannot restore one. (Registries written before checksums: the executor's
        finiteness check at the swap is all there is.)"""
        for layer, entry in sorted(self.layers.items()):
            try:
                if not stat.S_ISREG(os.stat(entry.file).st_mode):
                    raise OSError(f"{entry.file} is not a regular file")
                actual = file_sha256(entry.file) if entry.sha256 else ""
                problem = (f"{entry.file} changed after it was committed: its sha256 is {actual}, the registry "
                           f"recorded {entry.sha256}") if actual != entry.sha256 else ""
            except OSError as error:
                problem = f"{entry.file} cannot be read: {error}"
            if problem:
                log.error("a committed layer could not be restored; the checkpoint's layer serves instead",
                          extra={"layer": layer, "version": entry.version, "error": problem})
                del self.layers[layer]

    def layers_of(self, version: int) -> int:
        """How many committed layers a job's version serves (0 for no job's: version 0)."""
        return sum(1 for entry in self.layers.values() if version and entry.version == version)

    def served_versions(self, record: TaskRecord) -> dict[int, int]:
        """The version serving each layer the record's job changed and finished (0: the
        checkpoint's): its own, a later task's, or an older one where its swap failed or its
        file was found damaged at a restart."""
        changed = {d["layer"] for d in record.decisions
                   if d["action"] == "requantized" and d["layer"] < record.layers_done}
        return {layer: self.layers[layer].version if layer in self.layers else 0 for layer in changed}

    def layers_superseded(self, record: TaskRecord) -> int:
        """How many of the layers the record's job changed a later version serves now."""
        return sum(1 for version in self.served_versions(record).values() if version > record.version)

    def save(self) -> bool:
        """Write the registry; False when the directory cannot be written (full, read-only):
        the state stays in memory, `unsaved` says why, and the next save writes it all. A
        failed save never raises: it came in the middle of an admin call or of a job's step
        (an exception there left the job half-ended), and what it changes is already served."""
        tasks = {name: {**asdict(record), "adapter_dir": self._relative(record.adapter_dir),
                        "calibration": record.calibration and self._relative(record.calibration)}
                 for name, record in self.tasks.items()}
        layers = {str(layer): {**asdict(entry), "file": self._relative(entry.file)}
                  for layer, entry in sorted(self.layers.items())}
        raw = {"format": FORMAT_VERSION, "base": self.base, "next_version": self.next_version, "tasks": tasks,
               "layers": layers, "dropped": self.dropped, "last_job_drops": self.last_job_drops,
               "hessian_sources": {name: asdict(source) for name, source in self.hessian_sources.items()}}
        # A name of its own: two writers on one fixed name renamed each other's file away
        # (FileNotFoundError), or renamed a half-written one into place.
        temporary = self.root / f"{REGISTRY_FILE}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(temporary, "x") as handle:
                json.dump(raw, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self.root / REGISTRY_FILE)
        except OSError as error:
            # on a read-only mount even unlinking a missing file fails (EROFS before ENOENT)
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            problem = f"{self.root / REGISTRY_FILE} cannot be written: {error.strerror or error}"
            if problem != self.unsaved:
                log.error("the state directory cannot be written: the state is kept in memory and saved as soon as "
                          "it can be (a restart before that loses the changes since the last save)",
                          extra={"error": problem})
            self.unsaved = problem
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        if self.unsaved:
            log.info("the state directory is written again", extra={"was": self.unsaved})
            self.unsaved = ""
        if self.after_save is not None:
            self.after_save()  # never raises (it logs what it could not do): the save succeeded
        return True

    def _remove_stale_temporaries(self) -> None:
        """Temporary registries a crash mid-save left: the lock is this process's, so only
        its own saves (another store of this process on the directory) can be under way."""
        ours = f"{REGISTRY_FILE}.{os.getpid()}."
        for stale in self.root.glob(f"{REGISTRY_FILE}.*tmp"):
            if not stale.name.startswith(ours) and stale.is_file() and not stale.is_symlink():
                stale.unlink(missing_ok=True)

    # Files inside the state directory are written relative to it, so that a state directory
    # copied or restored elsewhere uses its own files (absolute paths read the old place's).
    # Anything outside it (an adapter directory of the config's [tasks]) stays absolute.
    def _relative(self, path: str) -> str:
        root = os.path.abspath(self.root)
        absolute = os.path.abspath(path)
        return os.path.relpath(absolute, root) if absolute.startswith(root + os.sep) else path

    def _absolute(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(os.path.abspath(self.root), path)

    # ------------------------------------------------------------------ copies
    def copy_inputs(self, name: str, adapter_dir: str, calibration: str | None, weights_limit: int = 1 << 40,
                    calibration_limit: int = 1 << 40) -> tuple[str, str | None]:
        """Copy an adapter (and calibration file) into the state directory; returns the copies.
        Touches no registry state (safe in a worker thread): each copy gets a fresh name. Each
        file is copied bounded (`bounded_files.copy_bounded`: a path re-pointed at /dev/zero or a
        huge file after its checks filled the disk, a reviewer); a missing one is left out."""
        suffix = uuid.uuid4().hex[:10]
        target = self.root / "adapters" / f"{name}.{suffix}"
        copied = self.root / "calibration" / f"{name}.{suffix}.jsonl"
        limits = {CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: weights_limit}
        try:
            target.mkdir(parents=True)
            for file_name in ADAPTER_FILES:
                source = Path(adapter_dir) / file_name
                if os.path.lexists(source):
                    copy_bounded(source, target / file_name, limits[file_name])
            if calibration:
                copy_bounded(calibration, copied, calibration_limit)
        except BaseException:  # a full disk: no partial copy left behind (a restart collected it)
            self.discard_copy(str(target))
            raise
        return str(target), str(copied) if calibration else None

    def discard_copy(self, adapter_dir: str) -> bool:
        """Delete an adapter copy `copy_inputs` made, and the calibration copied with it (same
        name). Anything else (a directory of the config's [tasks], or an adapter added without
        a state directory) is the user's and stays. Returns whether it was a copy. The caller
        checks that no task and no request in flight uses it."""
        copy = Path(os.path.abspath(adapter_dir))  # normalized, no symlink followed
        if copy.parent != Path(os.path.abspath(self.root / "adapters")) or not ADAPTER_COPY.fullmatch(copy.name):
            return False
        shutil.rmtree(copy, ignore_errors=True)
        try:
            (self.root / "calibration" / f"{copy.name}.jsonl").unlink(missing_ok=True)
        except OSError as error:  # a read-only directory: the next start's collection takes it
            log.warning("a calibration copy could not be deleted", extra={"file": error.filename,
                                                                           "error": error.strerror})
        return True

    def _collect_garbage(self) -> None:
        """Copies and layer files nothing refers to any more (removed tasks, superseded layers);
        only names the server writes (`state_gc.ADAPTER_COPY`, ...): anything else stays."""
        copies = collect_copies(self.root, {Path(r.adapter_dir).name for r in self.tasks.values()},
                                {Path(r.calibration).name for r in self.tasks.values() if r.calibration})
        if copies:
            log.info("adapter copies nothing uses any more deleted", extra={"copies": copies})
        # An unfinished job redoes every layer it has not committed, so only committed files count.
        self.collect_layers()
        count, size = collect_hessian_temporaries(self.hessian_dir)
        if count:
            log.info("Hessian state temporaries a killed job left deleted", extra={"files": count, "bytes": size})

    def collect_layers(self, busy_versions: Collection[int] | None = None, busy_files: Collection[str] = ()) -> int:
        """Delete the layer files the registry does not name: all of them at start-up
        (busy_versions None: no job runs yet); at run time (`state_gc.py`) none of a version in
        busy_versions, none in busy_files. Returns how many went (logged with their bytes)."""
        keep = {Path(entry.file).name for entry in self.layers.values()} | {Path(file).name for file in busy_files}
        count, size = collect_layer_files(self.layers_dir, keep, busy_versions)
        if count:
            log.info("layer files nothing uses any more deleted", extra={"files": count, "bytes": size,
                                                                        "kept": len(keep)})
        return count

    # ------------------------------------------------------------------ queries
    @property
    def served_version(self) -> int:
        return max((entry.version for entry in self.layers.values()), default=0)
