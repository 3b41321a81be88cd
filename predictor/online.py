"""The online length predictor: learns from the server's finished requests, bounded memory.

Every finished request updates the model at once with one small online step
(`LengthPredictor.update`, microseconds) and goes into a reservoir of the most recent
`capacity` requests in which no task keeps more than `per_task_capacity` (a popular task
cannot push a rare one out). Every `refit_every` new requests (0: never) the ridge model
is refitted on the whole reservoir: on a background thread in the server (the event loop
only hashes the prompt and appends), or inline when `background` is off. The state
(model, task means, reservoir) is saved to and loaded from one `.npz` file.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inlaid.predictor.model import LengthPredictor

_Row = tuple[np.ndarray, np.ndarray, float]  # feature indices, values, output tokens


class OnlineLengthPredictor:
    def __init__(
        self,
        model: LengthPredictor | None = None,
        capacity: int = 4096,
        per_task_capacity: int = 512,
        refit_every: int = 64,
        background: bool = True,
        state_path: str | Path | None = None,
    ) -> None:
        if capacity < 1 or per_task_capacity < 1 or refit_every < 0:
            raise ValueError("capacity and per_task_capacity must be >= 1, refit_every >= 0")
        self.model = model or LengthPredictor()
        self.capacity = capacity
        self.per_task_capacity = per_task_capacity
        self.refit_every = refit_every
        self.background = background
        self.state_path = Path(state_path) if state_path else None  # saved after each refit and on close
        self._rows: dict[str, deque[_Row]] = {}
        self._size = 0
        self._since_fit = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fits = 0

    @property
    def size(self) -> int:
        return self._size

    def predict(self, task: str | None, prompt_token_ids: Sequence[int]) -> float:
        return self.model.predict(task, prompt_token_ids)

    def observe(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        """A finished request: one online learning step now, a refit when one is due."""
        index, value = self.model.features(task, prompt_token_ids)
        with self._lock:
            self._add(task, prompt_token_ids, index, value, output_tokens)
            self.model.update(index, value, output_tokens)
            self._since_fit += 1
            due = 0 < self.refit_every <= self._since_fit
        if due:
            self.refit(wait=not self.background)

    def remember(self, task: str | None, prompt_token_ids: Sequence[int], output_tokens: int) -> None:
        """A past request into the reservoir (and the task means), no learning step: seeding
        a predictor with history before one `refit`."""
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
        while self._size > self.capacity:
            max(self._rows.values(), key=len).popleft()
            self._size -= 1

    def refit(self, wait: bool = True) -> None:
        """Refit on the reservoir now (on a thread unless `wait`); one refit at a time."""
        if self._thread is not None and self._thread.is_alive():
            if not wait:
                return  # the running refit will be followed by the next due one
            self._thread.join()
        with self._lock:
            rows = [row for task_rows in self._rows.values() for row in task_rows]
            self._since_fit = 0
        if not rows:
            return
        if wait:
            self._fit(rows)
        else:
            self._thread = threading.Thread(target=self._fit, args=(rows,), name="length-predictor-fit", daemon=True)
            self._thread.start()

    def _fit(self, rows: list[_Row]) -> None:
        weights = self.model.solve_both([(index, value) for index, value, _ in rows], [y for _, _, y in rows])
        # Swapped under the lock, so no online step writes into a replaced model. Steps made
        # since the snapshot are superseded; their requests are in the next refit.
        with self._lock:
            self.model.set_weights(*weights)
            self.fits += 1
        if self.state_path is not None:
            self.save(self.state_path)

    def close(self) -> None:
        """Wait for a running refit, then save the state (when it has a path)."""
        if self._thread is not None:
            self._thread.join()
        if self.state_path is not None:
            self.save(self.state_path)

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
        state["reservoir_tasks"] = np.asarray(tasks, dtype=str)
        state["reservoir_targets"] = np.asarray(targets, dtype=np.float64)
        state["reservoir_lengths"] = np.asarray(lengths, dtype=np.int64)
        state["reservoir_indices"] = np.concatenate(indices) if indices else np.zeros(0, np.int32)
        state["reservoir_values"] = np.concatenate(values) if values else np.zeros(0, np.float32)
        path = Path(path)
        temporary = path.with_name(f"{path.name}.{threading.get_ident()}.tmp.npz")
        np.savez_compressed(temporary, **state)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | Path, **options: object) -> "OnlineLengthPredictor":
        with np.load(Path(path), allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
        predictor = cls(**options)  # type: ignore[arg-type]
        predictor.model.load_state(state)
        offsets = np.concatenate([[0], np.cumsum(state["reservoir_lengths"])])
        for position, (task, target) in enumerate(zip(state["reservoir_tasks"], state["reservoir_targets"])):
            rows = predictor._rows.setdefault(str(task), deque())
            start, end = offsets[position], offsets[position + 1]
            rows.append((state["reservoir_indices"][start:end], state["reservoir_values"][start:end], float(target)))
            predictor._size += 1
        return predictor
