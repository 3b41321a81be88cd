"""The online length predictor: learns from the server's finished requests, bounded memory.

Every finished request moves its task's level at once (`LengthPredictor.update`, a
residual mean, microseconds) and goes into a reservoir of the most recent
`capacity` requests in which no task keeps more than `per_task_capacity` (a popular task
cannot push a rare one out). Every `refit_every` new requests (0: never) the ridge model
is refitted on the whole reservoir: on a background thread in the server (the event loop
only hashes the prompt and appends), or inline when `background` is off. The state
(model, task means, reservoir) is saved to and loaded from one `.npz` file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

import numpy as np

from inlaid.predictor.model import LengthPredictor
from inlaid.serve.ipc_dirs import process_alive

_Row = tuple[np.ndarray, np.ndarray, float]  # feature indices, values, output tokens

log = logging.getLogger(__name__)

# The arrays every state `save` writes (the model's own are checked by its `load_state`).
_RESERVOIR_KEYS = ("reservoir_tasks", "reservoir_targets", "reservoir_lengths", "reservoir_indices",
                   "reservoir_values")


class PredictorStateError(ValueError):
    """A predictor state file that `OnlineLengthPredictor.save` did not write (corrupt,
    truncated, or another program's file)."""


class OnlineLengthPredictor:
    def __init__(
        self,
        model: LengthPredictor | None = None,
        capacity: int = 4096,
        per_task_capacity: int = 512,
        refit_every: int = 64,
        background: bool = True,
        state_path: str | Path | None = None,
        tokenizer: TokenizerIdentity | None = None,
    ) -> None:
        if capacity < 1 or per_task_capacity < 1 or refit_every < 0:
            raise ValueError("capacity and per_task_capacity must be >= 1, refit_every >= 0")
        self.model = model or LengthPredictor()
        self.capacity = capacity
        self.per_task_capacity = per_task_capacity
        self.refit_every = refit_every
        self.background = background
        self.state_path = Path(state_path) if state_path else None  # saved after each refit and on close
        # whose token ids its features hash: saved with the state, and a state of another's refused
        self.tokenizer = tokenizer
        self.adopted = False  # loaded from a state that named no tokenizer (`load`)
        self._rows: dict[str, deque[_Row]] = {}
        self._forgotten: set[str] = set()  # tasks forgotten while a refit runs (after its snapshot)
        self._fitting = False
        self._size = 0
        self._since_fit = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._learnt_since_logged_save = 0  # requests `observe`d since a closing save was logged
        self.fits = 0

    @property
    def size(self) -> int:
        return self._size

    def predict(self, task: str | None, prompt_token_ids: Sequence[int]) -> float:
        return self.model.predict(task, prompt_token_ids)

    def observe(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        """A finished request: its task's level moves now, a refit when one is due."""
        _check_length(output_tokens)
        index, value = self.model.features(task, prompt_token_ids)
        with self._lock:
            self._add(task, prompt_token_ids, index, value, output_tokens)
            self.model.update(task, index, value, output_tokens)
            self._since_fit += 1
            self._learnt_since_logged_save += 1
            due = 0 < self.refit_every <= self._since_fit
        if due:
            self.refit(wait=not self.background)

    def remember(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        """A past request into the reservoir (and the task means), no learning step: seeding
        a predictor with history before one `refit`."""
        _check_length(output_tokens)
        index, value = self.model.features(task, prompt_token_ids)
        with self._lock:
            self._add(task, prompt_token_ids, index, value, output_tokens)

    def _add(self, task: str | None, prompt_token_ids: Sequence[int], index: np.ndarray, value: np.ndarray,
             output_tokens: int) -> None:
        self.model.fallback.observe(task, prompt_token_ids, output_tokens)
        rows = self._rows.setdefault("<base>" if task is None else task, deque())
        rows.append((index, value, float(output_tokens)))
        self._size += 1
        if len(rows) > self.per_task_capacity:
            rows.popleft()
            self._size -= 1
        self._trim_to_capacity()

    def _trim_to_capacity(self) -> None:
        while self._size > self.capacity:
            # (an emptied task's deque goes: kept, every task ever seen stayed, and this scan over
            # them all ran on every request, 2 ms an observe after 40,000 tasks; now at most
            # `capacity` tasks hold rows)
            task_key, longest = max(self._rows.items(), key=lambda item: len(item[1]))
            longest.popleft()
            self._size -= 1
            if not longest:
                del self._rows[task_key]

    def forget(self, task: str | None) -> None:
        """A removed task: its reservoir rows, task mean and level go (a task added later under
        the name starts as a new one)."""
        key = "<base>" if task is None else task
        with self._lock:
            rows = self._rows.pop(key, None)
            self._size -= len(rows) if rows else 0
            if self._fitting:
                self._forgotten.add(key)
            self.model.forget(task)

    def refit(self, wait: bool = True) -> None:
        """Refit on the reservoir now (on a thread unless `wait`); one refit at a time."""
        if self._thread is not None and self._thread.is_alive():
            if not wait:
                return  # the running refit will be followed by the next due one
            self._thread.join()
        with self._lock:
            rows = [row for task_rows in self._rows.values() for row in task_rows]
            tasks = [task for task, task_rows in self._rows.items() if task_rows]
            self._forgotten.clear()
            self._fitting = bool(rows)
            self._since_fit = 0
        if not rows:
            return
        if wait:
            self._fit(rows, tasks)
        else:
            self._thread = threading.Thread(target=self._fit, args=(rows, tasks), name="length-predictor-fit",
                                            daemon=True)
            self._thread.start()

    def _fit(self, rows: list[_Row], tasks: list[str]) -> None:
        weights = self.model.solve_both([(index, value) for index, value, _ in rows], [y for _, _, y in rows])
        # Swapped under the lock, so no residual is added against a replaced model. Residuals
        # since the snapshot are dropped; their requests are in the next refit.
        with self._lock:
            # (a task forgotten since the snapshot is not fitted again: it starts as a new one)
            self.model.set_weights(*weights, tasks=[task for task in tasks if task not in self._forgotten])
            self._forgotten.clear()
            self._fitting = False
            self.fits += 1
        self._save_state()

    def close(self) -> None:
        """Wait for a running refit, then save the state (when it has a path). A save on
        close that keeps requests learnt since the last such line is logged: once, though a
        server's executors share one model and each closes it, and not for the policies the
        start-up tuning replaces before any request (the file then holds what it was read from)."""
        if self._thread is not None:
            self._thread.join()
        if self._save_state() and self._learnt_since_logged_save:
            self._learnt_since_logged_save = 0
            log.info("length predictor state saved", extra={"path": str(self.state_path), "records": self.size})

    def _save_state(self) -> bool:
        """Save to `state_path` after a refit or on close. A failure (disk full, the
        directory removed while serving) is logged, not raised: it runs on the refit
        thread, where it would kill the thread with a traceback, and at shutdown, where it
        would skip the server's cleanup. The model in memory serves on; the next save retries.
        True when the file was written."""
        if self.state_path is None:
            return False
        try:
            self.save(self.state_path)
        except OSError as error:
            log.warning("cannot save the length predictor's state; it stays in memory only",
                        extra={"path": str(self.state_path), "error": error.strerror or str(error)})
            return False
        return True

    # ------------------------------------------------------------------ state
    def save(self, path: str | Path) -> None:
        """Atomically (write, then rename): a crash never leaves half a file."""
        with self._lock:
            state = self.model.state()
            tasks, targets, lengths, indices, values = [], [], [], [], []
            for task, rows in self._rows.items():
                for index, value, target in rows:
                    tasks.append(task)
                    targets.append(target)
                    lengths.append(len(index))
                    indices.append(index)
                    values.append(value)
            since_fit = self._since_fit
        if self.tokenizer is not None:
            state["tokenizer_sha256"] = np.asarray(self.tokenizer.sha256)
            state["tokenizer_model"] = np.asarray(self.tokenizer.model)
        state["reservoir_since_fit"] = np.asarray(since_fit)  # a restart's next refit stays when it was due
        state["reservoir_tasks"] = np.asarray(tasks, dtype=str)
        state["reservoir_targets"] = np.asarray(targets, dtype=np.float64)
        state["reservoir_lengths"] = np.asarray(lengths, dtype=np.int64)
        state["reservoir_indices"] = np.concatenate(indices) if indices else np.zeros(0, np.int32)
        state["reservoir_values"] = np.concatenate(values) if values else np.zeros(0, np.float32)
        path = Path(os.path.realpath(path))  # a symbolic link stays one: its target is written
        _remove_dead_writers_files(path)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
        try:
            np.savez_compressed(temporary, **state)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)  # half a file (disk full) must not stay behind
            raise

    @classmethod
    def load(cls, path: str | Path, **options: object) -> "OnlineLengthPredictor":
        """The predictor saved in `path`; PredictorStateError (naming the file) for anything
        `save` did not write. Never unpickles: a state is plain numeric and string arrays."""
        path = Path(path)
        predictor = cls(**options)  # type: ignore[arg-type]
        try:
            state = _read_state(path)
            predictor.model.load_state(state)
            _check_targets(state["reservoir_targets"])
            indices = state["reservoir_indices"]
            if len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < predictor.model.hasher.size:
                raise ValueError("reservoir feature indices outside the model")  # a refit would fail on them
        except OSError as error:  # unreadable (permissions, a directory): the file may well be fine
            raise PredictorStateError(f"cannot read the length predictor state {path}: "
                                      f"{error.strerror or error}") from None
        # zlib.error and NotImplementedError: a damaged archive's compressed data or zip header
        except (EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, KeyError, IndexError, TypeError,
                ValueError) as error:
            reason = f"no array {error}" if isinstance(error, KeyError) else str(error)
            # numpy's advice (allow_pickle=True) is never the answer: a state holds no objects.
            if "Object arrays" in reason:
                reason = "it holds pickled Python objects, which are never loaded"
            elif "pickle" in reason:  # numpy's reading of anything that is neither .npz nor .npy
                reason = "not an .npz archive"
            raise PredictorStateError(f"{path} is not a length predictor state written by Inlaid ({reason:.200}); "
                                      "delete or move it to start with a fresh predictor") from None
        _check_tokenizer(path, state, predictor.tokenizer)
        # a state that names no tokenizer is taken as this server's (and saved so): said by the caller
        predictor.adopted = predictor.tokenizer is not None and "tokenizer_sha256" not in state
        offsets = np.concatenate([[0], np.cumsum(state["reservoir_lengths"])])
        for position, (task, target) in enumerate(zip(state["reservoir_tasks"], state["reservoir_targets"])):
            rows = predictor._rows.setdefault(str(task), deque())
            start, end = offsets[position], offsets[position + 1]
            rows.append((state["reservoir_indices"][start:end], state["reservoir_values"][start:end], float(target)))
            predictor._size += 1
            if len(rows) > predictor.per_task_capacity:  # saved by a predictor with larger bounds: its newest kept
                rows.popleft()
                predictor._size -= 1
        predictor._trim_to_capacity()
        since_fit = state.get("reservoir_since_fit")  # (states saved before 2026-12-07 lack it: 0)
        if since_fit is not None and since_fit.shape == () and since_fit.dtype.kind in "iu":
            predictor._since_fit = int(min(max(0, int(since_fit)), predictor.refit_every))
        return predictor


@dataclass(frozen=True)
class TokenizerIdentity:
    """Whose token ids a predictor's features hash: the model's name (for messages) and the
    sha256 of what in its tokenizer decides the ids (`scheduler_config.predictor_tokenizer`)."""
    model: str
    sha256: str


def _check_tokenizer(path: Path, state: dict[str, np.ndarray], tokenizer: TokenizerIdentity | None) -> None:
    """PredictorStateError for a state learned on another tokenizer's ids: loaded without a
    word, it predicted this model's requests from another vocabulary's n-grams (an outside
    probe). A state that names none (written by `python -m inlaid.predictor train`, or before
    states named it) is taken as it is."""
    if tokenizer is None or "tokenizer_sha256" not in state:
        return
    saved = str(state["tokenizer_sha256"])
    if saved != tokenizer.sha256:
        learned_on = str(state["tokenizer_model"]) if "tokenizer_model" in state else "another model"
        raise PredictorStateError(f"{path} was learned on the token ids of {learned_on} (tokenizer {saved[:12]}), "
                                  f"not on this server's tokenizer ({tokenizer.model}, tokenizer "
                                  f"{tokenizer.sha256[:12]}: its vocabulary, normalizer or pre-tokenizer differ): its "
                                  "length predictions would not hold; point [scheduler] predictor_state at another "
                                  "file, or move this one away to start afresh")


_LEFTOVER_AGE_S = 600.0  # a save takes seconds: a temporary file this old is no save in progress


def _remove_dead_writers_files(path: Path) -> None:
    """Delete `<state>.<pid>.<thread>.tmp.npz` files whose process is gone and which are older
    than any save takes: a save killed (SIGKILL, power loss) between its write and its rename
    left one, and every later kill would add another (each the size of a state). Both tests:
    a writer on another machine (a shared `predictor_state`) or in another pid namespace
    looks dead here, but its file is seconds old."""
    for leftover in path.parent.glob(f"{glob_escape(path.name)}.*.*.tmp.npz"):
        writer = leftover.name[len(path.name) + 1:-len(".tmp.npz")].split(".")
        if len(writer) != 2 or not all(part.isdigit() for part in writer):
            continue  # not a name save() gives
        try:
            recent = time.time() - leftover.stat().st_mtime < _LEFTOVER_AGE_S
        except OSError:
            continue  # gone already (another save cleaned it)
        if not recent and not process_alive(int(writer[0])):
            leftover.unlink(missing_ok=True)


def _check_length(output_tokens: float) -> None:
    # One NaN shifted every later prediction and made the saved state unloadable.
    if not (isinstance(output_tokens, (int, float, np.integer, np.floating)) and 0 <= output_tokens < math.inf):
        raise ValueError(f"output_tokens must be a finite number >= 0, got {output_tokens!r}")


def _check_targets(targets: np.ndarray) -> None:
    """Reservoir output lengths must be lengths a request can have: targets of 1e308 loaded
    and, after a refit, every prediction was 1e9 tokens (an outside probe). The bound is the
    traces' (imported here: inlaid.scheduling depends on this package, not the reverse)."""
    from inlaid.scheduling.traces import MAX_REQUEST_TOKENS

    if targets.dtype.kind not in "iuf" or (len(targets) and not (
            0 <= float(targets.min()) and float(targets.max()) <= MAX_REQUEST_TOKENS)):
        raise ValueError(f"reservoir output lengths outside [0, {MAX_REQUEST_TOKENS}] tokens")


def _read_state(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a state file, checked to fit together (a KeyError or ValueError otherwise)."""
    with open(path, "rb") as file:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("not an .npz archive")
        with archive:
            state = {key: archive[key] for key in archive.files}
    for key, array in state.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            # accepted, it failed every request at its prediction, or every refit
            raise ValueError(f"non-finite numbers in {key}")
    tasks, targets, lengths, indices, values = (state[key] for key in _RESERVOIR_KEYS)
    if lengths.dtype.kind not in "iu" or indices.dtype.kind not in "iu" or (lengths < 0).any():
        raise ValueError("reservoir lengths or feature indices are not counts")
    if values.dtype.kind not in "iuf":  # complex values loaded, then every refit failed on them
        raise ValueError(f"reservoir feature values are {values.dtype}, not real numbers")
    # Unsigned lengths summed to float offsets, which cannot slice (a TypeError escaped the check).
    state["reservoir_lengths"] = lengths = lengths.astype(np.int64)
    if not (len(tasks) == len(targets) == len(lengths)) or not (len(indices) == len(values) == int(lengths.sum())):
        raise ValueError("reservoir arrays of different lengths")
    return state
