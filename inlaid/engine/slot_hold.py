"""The scheduler's slot hold: how a request refused for an adapter slot is not passed over for
ever. Torch-free.

With more busy adapters than device slots, a waiting request whose adapter has no slot is
refused while the requests behind it that use a resident adapter are admitted; as long as
their traffic lasts, every slot stays busy (vLLM #16876). Once its policy calls it overdue,
the scheduler holds one of the adapters computing in the step (the one with the fewest
running sequences) for it: that adapter admits no new request, and no other request may
evict it, until the overdue one is admitted. Its running requests finish, its slot frees
for the overdue request, and every other adapter goes on being admitted meanwhile. Closing
all admission instead drained the whole server for each such request (FIFO's saturation
throughput 17-20 % lower with 100 and 1,000 tasks on 32 slots).

One hold at a time. It keeps its adapter from the others only while its request is within
the policy's plannable ranking (a fairness bound can hold that request back; pinned then,
the adapter kept everyone out for nothing), and the scheduler drops it where a step would
otherwise plan nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.sequence import Sequence, SequenceStatus


class SlotHold:
    def __init__(self, slots: AdapterSlots) -> None:
        self._slots = slots
        self.seq: Sequence | None = None  # the overdue sequence held for
        self.adapter: str | None = None  # the adapter it waits on to drain
        self.pins = False  # this step: the adapter is kept from the other requests

    def start_step(self, waiting: Iterable[Sequence], plannable: list[Sequence]) -> None:
        """Before a step's walk: a hold whose sequence was admitted, finished or moved to
        another scheduler, or whose adapter lost its slot, is dropped; the hold pins only if
        its sequence is among `plannable`."""
        seq = self.seq
        if seq is not None and (seq.status is not SequenceStatus.WAITING or seq not in waiting
                                or self._slots.slot_of(self.adapter or "") is None):
            self.release()
        self.pins = self.seq is not None and any(other is self.seq for other in plannable)

    def keeps_out(self, seq: Sequence) -> bool:
        """Whether waiting `seq` is not admitted this step: a new request of the held adapter."""
        return self.pins and seq.adapter is not None and seq.adapter == self.adapter

    def pinned(self, seq: Sequence, step_adapters: set[str]) -> set[str]:
        """The adapters `seq` may not evict: the step's, and the held one unless `seq` is the
        request it is held for (where a policy paused the held adapter's requests, others
        evicted it and took the drained slot: the hold wandered from adapter to adapter)."""
        if not self.pins or self.adapter is None or seq is self.seq or self.adapter in step_adapters:
            return step_adapters
        return step_adapters | {self.adapter}

    def place(self, seq: Sequence, step_adapters: set[str], running: Iterable[Sequence]) -> bool:
        """`seq`, overdue, found every slot held by this step's adapters: hold the one with the
        fewest running sequences (ties by name). True when a hold stands (this one, or another
        that `seq` waits its turn behind); False when there is no slot to hold (none configured)."""
        if self.seq is not None:
            return True
        if not step_adapters:
            return False
        counts: dict[str, int] = {}
        for other in running:
            if other.adapter in step_adapters:
                counts[other.adapter] = counts.get(other.adapter, 0) + 1
        self.seq, self.adapter = seq, min(sorted(step_adapters), key=lambda name: counts.get(name, 0))
        self.pins = True  # (its request is being walked: within reach)
        return True

    def admitted(self, seq: Sequence) -> None:
        if seq is self.seq:
            self.release()

    def release(self) -> None:
        self.seq, self.adapter, self.pins = None, None, False
