"""The executor's host-memory copies of adapters, by path: loading an adapter into a slot it
lost earlier is then a copy, not a file read.

Each copy is of the files registered: a load names their signature (`adapter_signature`),
held copies are found by path and signature, and files read that are not the registered ones
are refused (replaced under a served task: what was checked is gone).

Bounded by entries and by bytes; the least recently loaded copy goes first, and the copy
just loaded stays even alone over the budget (it is about to be installed). Copies of
adapters no task serves any more are dropped when the coordinator says so
(`BatchPlan.adapter_drops`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from inlaid.bounded_files import read_bounded
from inlaid.engine.adapter_config import (
    WEIGHTS_FILE, AdapterError, AdapterSpec, content_signature, read_adapter_config, spec_from_config_bytes,
)
from inlaid.engine.lora import load_adapter_tensors

# The byte budget, in device slot pools: the cache only saves a file read when an adapter
# that lost its slot comes back, so it need not outgrow the slot pool the operator already
# sized (max_lora_slots x max_lora_rank). Two pools' worth holds at least max_lora_slots
# adapters whatever their rank and stored dtype (a float32 file at the pool's max rank is at
# most twice a bfloat16 slot), and far more at usual ranks: 16 of the 19.6 MB rank-32 float16
# adapters of the default 135M model with 2 float32 slots of rank 64.
HOST_ADAPTER_CACHE_POOLS = 2


@dataclass
class AdapterCopy:
    """An adapter's weights kept in host memory."""

    spec: AdapterSpec
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


class HostAdapterCache:
    def __init__(self, num_layers: int, max_entries: int, max_bytes: int, max_weights_bytes: int = 1 << 40) -> None:
        """max_weights_bytes: the largest weights file read (`adapter_weights.max_weights_bytes`): a
        registered path's file swapped for a huge one was read whole into the executor's memory
        before its signature refused it (a reviewer)."""
        self.num_layers = num_layers
        self.max_weights_bytes = max_weights_bytes
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0  # what the cached copies hold now
        # (path, signature) -> copy: two registrations of one path whose files changed between
        # them (another name, the old one not added again) each keep the copy they were checked with
        self._copies: OrderedDict[tuple[str, str], AdapterCopy] = OrderedDict()

    def get(self, name: str, path: str, signature: str = "") -> AdapterCopy:
        """The adapter at `path` as registered with `signature` (its files' `adapter_signature`;
        "": whatever the path holds), read from its files unless a copy of them is held."""
        key = (path, signature)
        copy = self._copies.get(key)
        if copy is None:
            directory, config = read_adapter_config(name, path)
            try:  # one read: parsed and hashed alike
                weights = read_bounded(directory / WEIGHTS_FILE, self.max_weights_bytes)
            except OSError as error:
                raise AdapterError(f"adapter {name!r}: cannot read {directory / WEIGHTS_FILE}: {error}") from None
            if signature and content_signature(config, weights) != signature:
                raise AdapterError(f"adapter {name!r}: the files in {path} changed after it was registered (replaced "
                                   "or rewritten); what was checked then is gone, so it is not served: add (register) "
                                   "the task again to serve the new files")
            spec = spec_from_config_bytes(name, str(directory), config)
            copy = AdapterCopy(spec, load_adapter_tensors(spec, self.num_layers, weights))
            self._copies[key] = copy
            self.nbytes += copy.nbytes
        self._copies.move_to_end(key)
        while len(self._copies) > 1 and (len(self._copies) > self.max_entries or self.nbytes > self.max_bytes):
            _, evicted = self._copies.popitem(last=False)
            self.nbytes -= evicted.nbytes
        return copy

    def forget(self, paths: list[str]) -> None:
        """Drop every copy of these paths."""
        gone = set(paths)
        for key in [key for key in self._copies if key[0] in gone]:
            self.nbytes -= self._copies.pop(key).nbytes

    @property
    def paths(self) -> list[str]:
        """The adapters held, least recently loaded first."""
        return [path for path, _ in self._copies]
