"""The executor's host-memory copies of adapters, by path: loading an adapter into a slot it
lost earlier is then a copy, not a file read.

Each copy is of the files registered: a load names their signature (`adapter_signature`),
and a copy of other files is read again, or refused when the files at the path are no longer
the registered ones (replaced under a served task: what was checked is gone).

Bounded by entries and by bytes; the least recently loaded copy goes first, and the copy
just loaded stays even alone over the budget (it is about to be installed). Copies of
adapters no task serves any more are dropped when the coordinator says so
(`BatchPlan.adapter_drops`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from inlaid.engine.adapter_config import AdapterError, AdapterSpec, adapter_signature, read_adapter_spec
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
    signature: str = ""  # of the files read

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


class HostAdapterCache:
    def __init__(self, num_layers: int, max_entries: int, max_bytes: int) -> None:
        self.num_layers = num_layers
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0  # what the cached copies hold now
        self._copies: OrderedDict[str, AdapterCopy] = OrderedDict()

    def get(self, name: str, path: str, signature: str = "") -> AdapterCopy:
        """The adapter at `path`, read from its files unless a copy of them is held;
        `signature`: the files registered ("": whatever the path holds)."""
        copy = self._copies.get(path)
        if copy is not None and signature and copy.signature != signature:
            self.forget([path])  # a copy of other files than this load's
            copy = None
        if copy is None:
            before = adapter_signature(path)
            _check_unchanged(name, path, signature, before)
            spec = read_adapter_spec(name, path)
            tensors = load_adapter_tensors(spec, self.num_layers)
            _check_unchanged(name, path, before, adapter_signature(path))  # not replaced while being read
            copy = AdapterCopy(spec, tensors, before)
            self._copies[path] = copy
            self.nbytes += copy.nbytes
        self._copies.move_to_end(path)
        while len(self._copies) > 1 and (len(self._copies) > self.max_entries or self.nbytes > self.max_bytes):
            _, evicted = self._copies.popitem(last=False)
            self.nbytes -= evicted.nbytes
        return copy

    def forget(self, paths: list[str]) -> None:
        for path in paths:
            evicted = self._copies.pop(path, None)
            if evicted is not None:
                self.nbytes -= evicted.nbytes

    @property
    def paths(self) -> list[str]:
        """The adapters held, least recently loaded first."""
        return list(self._copies)


def _check_unchanged(name: str, path: str, registered: str, now: str) -> None:
    if registered and now != registered:
        raise AdapterError(f"adapter {name!r}: the files in {path} changed after it was registered (replaced or "
                           "rewritten); what was checked then is gone, so it is not served: add (register) the "
                           "task again to serve the new files")
