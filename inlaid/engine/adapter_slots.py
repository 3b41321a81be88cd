"""Which adapter sits in which device slot, with LRU eviction. Torch-free.

The executor holds the slot pool tensors; this class decides the slot of every adapter
so that plans can name slots. An adapter used by a running sequence is pinned.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class UnknownAdapterError(KeyError):
    def __str__(self) -> str:
        return f"unknown adapter {self.args[0]!r}; register it first"


@dataclass
class SlotAssignment:
    slot: int
    loaded_now: bool  # the executor must load it into the slot this step


class AdapterSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.paths: dict[str, str] = {}  # registered adapters: name -> directory
        self.signatures: dict[str, str] = {}  # ... -> its files when registered (adapter_signature)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._free_slots: list[int] = list(range(num_slots))

    def register(self, name: str, path: str, signature: str = "") -> None:
        if self.paths.get(name, path) != path or self.signatures.get(name, signature) != signature:
            self.evict(name)  # a new version of a resident adapter: drop the stale slot contents
        self.paths[name] = path
        self.signatures[name] = signature

    def unregister(self, name: str) -> None:
        if name not in self.paths:
            raise UnknownAdapterError(name)
        del self.paths[name]
        self.signatures.pop(name, None)
        self.evict(name)

    def evict(self, name: str) -> None:
        """Free `name`'s slot (its load failed, or it was replaced or removed); a later use loads it again."""
        if name in self._slot_of:
            self._free_slots.append(self._slot_of.pop(name))

    def forget_slots(self) -> None:
        """The executor lost its slot contents (restarted): every adapter must be loaded again."""
        self._slot_of.clear()
        self._free_slots = list(range(self.num_slots))

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def can_acquire(self, name: str, pinned: set[str]) -> bool:
        """Whether `acquire` would give `name` a slot now (it is resident, a slot is free, or
        an unpinned adapter can be evicted)."""
        return name in self._slot_of or bool(self._free_slots) or any(n not in pinned for n in self._slot_of)

    def acquire(self, name: str, pinned: set[str]) -> SlotAssignment | None:
        """A slot for `name`, evicting the least recently used unpinned adapter if needed.

        Returns None when every slot holds a pinned adapter (the caller waits).
        """
        if name not in self.paths:
            raise UnknownAdapterError(name)
        if name in self._slot_of:
            self._slot_of.move_to_end(name)
            return SlotAssignment(self._slot_of[name], loaded_now=False)
        if not self._free_slots:
            victim = next((n for n in self._slot_of if n not in pinned), None)
            if victim is None:
                return None
            self._free_slots.append(self._slot_of.pop(victim))
        slot = self._free_slots.pop(0)
        self._slot_of[name] = slot
        return SlotAssignment(slot, loaded_now=True)
