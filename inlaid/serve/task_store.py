"""The server's state directory: dynamically added tasks and the quantization they built.
Torch-free (the coordinator owns it).

    STATE_DIR/registry.json             tasks, their re-quantization progress, committed layers
    STATE_DIR/adapters/<name>.<id>/     a copy of each added adapter (a fresh directory per
                                        addition: the executor caches adapters by path),
                                        deleted once its task is removed and drained or replaced
    STATE_DIR/calibration/<name>.<id>.jsonl
    STATE_DIR/quant/layers/layer_007.v3.safetensors   re-quantized layers (written by the requantizer)
    STATE_DIR/quant/hessian_state/layer_007.safetensors  merged Hessian state (ditto)

A layer is *committed* once the executor has swapped it in; registry.json lists exactly the
committed layers, so a restarted server (or executor) serves what was served before. Every
write goes to a temporary file renamed over the old one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
REGISTRY_FILE = "registry.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# The phases of an added task.
SERVING = "serving"  # served on the current base; no re-quantization (none asked, or none possible)
QUEUED = "queued"
REQUANTIZING = "requantizing"
READY = "ready"  # every layer decided; the changed ones are served
FAILED = "failed"  # served on the base as it is; the message says why


class StateDirError(RuntimeError):
    """The state directory is unusable (unreadable registry, or built on another base)."""


@dataclass
class TaskRecord:
    name: str
    adapter_dir: str
    calibration: str | None
    phase: str
    version: int = 0  # the quantization version its re-quantization produces
    layers_done: int = 0
    layers_total: int = 0
    decisions: list[dict] = field(default_factory=list)  # per linear: layer, linear, action, reason, change
    message: str = ""
    attempts: int = 0  # requantizer deaths during this task's job
    added_at: float = field(default_factory=time.time)
    started_at: float = 0.0  # first dispatch of its job
    finished_at: float = 0.0
    forward_seconds: float = 0.0
    quantize_seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclass
class CommittedLayer:
    version: int
    file: str


class TaskStore:
    def __init__(self, state_dir: str | Path, base: dict[str, str | None]) -> None:
        """`base`: what the state extends (model dir, quantized dir); a state directory
        written for another base is refused."""
        self.root = Path(state_dir).expanduser()
        self.layers_dir = self.root / "quant" / "layers"
        self.hessian_dir = self.root / "quant" / "hessian_state"
        for directory in (self.root / "adapters", self.root / "calibration", self.layers_dir, self.hessian_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.tasks: dict[str, TaskRecord] = {}
        self.layers: dict[int, CommittedLayer] = {}
        self.dropped: list[str] = []  # tasks whose stored Hessians no aggregate uses any more
        self.next_version = 1
        path = self.root / REGISTRY_FILE
        if path.is_file():
            self._load(path)
        self._collect_garbage()

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON object was expected, not {type(raw).__name__}")
            if raw.get("format") != FORMAT_VERSION:
                raise StateDirError(f"{path} has format {raw.get('format')!r}; this version of inlaid reads format "
                                    f"{FORMAT_VERSION}: use another server.state_dir")
            if raw.get("base") != self.base:
                raise StateDirError(f"{self.root} holds the state of another base ({raw.get('base')}); this "
                                    f"server serves {self.base}: use another server.state_dir")
            self.tasks = {name: TaskRecord(**record) for name, record in raw["tasks"].items()}
            for record in self.tasks.values():
                record.adapter_dir = self._absolute(record.adapter_dir)
                record.calibration = record.calibration and self._absolute(record.calibration)
            self.layers = {int(layer): CommittedLayer(**entry) for layer, entry in raw["layers"].items()}
            for entry in self.layers.values():
                entry.file = self._absolute(entry.file)
            self.dropped = list(raw["dropped"])
            self.next_version = int(raw["next_version"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # a wrong shape, too
            raise StateDirError(f"{path} is unreadable: {type(error).__name__}: {error}") from error

    def save(self) -> None:
        tasks = {name: {**asdict(record), "adapter_dir": self._relative(record.adapter_dir),
                        "calibration": record.calibration and self._relative(record.calibration)}
                 for name, record in self.tasks.items()}
        layers = {str(layer): {**asdict(entry), "file": self._relative(entry.file)}
                  for layer, entry in sorted(self.layers.items())}
        raw = {"format": FORMAT_VERSION, "base": self.base, "next_version": self.next_version, "tasks": tasks,
               "layers": layers, "dropped": self.dropped}
        temporary = self.root / (REGISTRY_FILE + ".tmp")
        with open(temporary, "w") as handle:
            json.dump(raw, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.root / REGISTRY_FILE)

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
    def copy_inputs(self, name: str, adapter_dir: str, calibration: str | None) -> tuple[str, str | None]:
        """Copy an adapter (and calibration file) into the state directory; returns the copies.
        Touches no registry state (safe in a worker thread): each copy gets a fresh name."""
        suffix = uuid.uuid4().hex[:10]
        target = self.root / "adapters" / f"{name}.{suffix}"
        target.mkdir(parents=True)
        for file_name in ADAPTER_FILES:
            source = Path(adapter_dir) / file_name
            if source.is_file():
                shutil.copyfile(source, target / file_name)
        copied_calibration = None
        if calibration:
            copied = self.root / "calibration" / f"{name}.{suffix}.jsonl"
            shutil.copyfile(calibration, copied)
            copied_calibration = str(copied)
        return str(target), copied_calibration

    def discard_copy(self, adapter_dir: str) -> bool:
        """Delete an adapter copy `copy_inputs` made, and the calibration copied with it (same
        name). Anything else (a directory of the config's [tasks], or an adapter added without
        a state directory) is the user's and stays. Returns whether it was a copy. The caller
        checks that no task and no request in flight uses it."""
        copy = Path(os.path.abspath(adapter_dir))  # normalized, no symlink followed
        if copy.parent != Path(os.path.abspath(self.root / "adapters")):
            return False
        shutil.rmtree(copy, ignore_errors=True)
        (self.root / "calibration" / f"{copy.name}.jsonl").unlink(missing_ok=True)
        return True

    def _collect_garbage(self) -> None:
        """Copies and layer files nothing refers to any more (removed tasks, superseded layers)."""
        live = {Path(r.adapter_dir).name for r in self.tasks.values()}
        for directory in (self.root / "adapters").iterdir():
            if directory.name not in live:
                shutil.rmtree(directory, ignore_errors=True)
        live_calibration = {Path(r.calibration).name for r in self.tasks.values() if r.calibration}
        for file in (self.root / "calibration").iterdir():
            if file.name not in live_calibration:
                file.unlink(missing_ok=True)
        # An unfinished job redoes every layer it has not committed, so only committed files count.
        committed = {Path(entry.file).name for entry in self.layers.values()}
        for file in self.layers_dir.iterdir():
            if file.name not in committed:
                file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ queries
    @property
    def served_version(self) -> int:
        return max((entry.version for entry in self.layers.values()), default=0)
