"""Cheap request features for the output-length predictor: numpy only.

A request is (task, prompt token ids). Its features live in one hashed space of
`2**bits` columns (the hashing trick: no vocabulary to store, new tasks need no schema):

- per task: an indicator, log(1 + prompt length) and prompt length / 100, so every task
  gets its own intercept and its own length slope (translation output grows with the
  source sentence, a sentiment label does not);
- shared across tasks: log(1 + prompt length), and the presence of each token unigram and
  bigram of the prompt, scaled to unit norm. Instructions ("Translate to French", "Answer
  the question") and content words carry over between tasks, which is what lets a task
  seen a few times borrow from the others.

Hashes are stable across processes (no Python `hash`), so saved models stay valid.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

DEFAULT_BITS = 18
TASK_COLUMNS = 3  # the first columns of a row are the task's own (indicator, log length, length)
_BASE = 0x9E3779B1  # odd multipliers spread consecutive token ids over the table
_SECOND = 0x85EBCA77


def _string_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


class FeatureHasher:
    def __init__(self, bits: int = DEFAULT_BITS) -> None:
        if not 8 <= bits <= 30:
            raise ValueError(f"bits must be in [8, 30], got {bits}")
        self.bits = bits
        self.size = 1 << bits
        self._mask = self.size - 1
        self._task_columns: dict[str, list[int]] = {}

    def _slot(self, text: str) -> int:
        return _string_hash(text) & self._mask

    def transform(self, task: str | None, prompt_token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(column indices int32, values float32) of one request; indices may repeat (they add)."""
        task_key = task if task is not None else "<base>"
        length = len(prompt_token_ids)
        log_length = float(np.log1p(length))
        dense_index = self._task_columns.get(task_key)
        if dense_index is None:
            dense_index = [self._slot(f"task:{task_key}"), self._slot(f"task-loglen:{task_key}"),
                           self._slot(f"task-len:{task_key}"), self._slot("loglen")]
            if len(self._task_columns) < 100_000:  # bounded: beyond it, hash every time
                self._task_columns[task_key] = dense_index
        dense_value = [1.0, log_length, length / 100.0, log_length]
        tokens = np.asarray(prompt_token_ids, dtype=np.uint64)
        grams = tokens * np.uint64(_BASE)
        if len(tokens) > 1:
            bigrams = (tokens[:-1] * np.uint64(_SECOND) + tokens[1:] + np.uint64(1)) * np.uint64(_BASE)
            grams = np.concatenate([grams, bigrams ^ np.uint64(0xFFFF_FFFF)])
        ngram_index = np.unique(((grams >> np.uint64(16)) & np.uint64(self._mask)).astype(np.int64))
        ngram_value = np.full(len(ngram_index), 1.0 / np.sqrt(max(1, len(ngram_index))), dtype=np.float32)
        index = np.concatenate([np.asarray(dense_index, dtype=np.int64), ngram_index]).astype(np.int32)
        value = np.concatenate([np.asarray(dense_value, dtype=np.float32), ngram_value])
        return index, value

    @staticmethod
    def shared_part(index: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The row without its task's own columns: what it says about a task never seen."""
        return index[TASK_COLUMNS:], value[TASK_COLUMNS:]

    def matrix(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]):  # -> scipy.sparse.csr_matrix
        from scipy.sparse import csr_matrix

        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(index) for index, _ in rows])
        indices = np.concatenate([index for index, _ in rows]) if rows else np.zeros(0, np.int32)
        data = np.concatenate([value for _, value in rows]) if rows else np.zeros(0, np.float32)
        matrix = csr_matrix((data.astype(np.float64), indices, indptr), shape=(len(rows), self.size))
        matrix.sum_duplicates()
        return matrix
