"""Which executor a request goes to, and when waiting work moves to another. Torch-free, pure.

The coordinator keeps one engine (scheduler, KV blocks, adapter slots) per executor; this
module only decides *where* a request waits, the executor's scheduling policy decides *when*
it runs. Two decisions, both on a snapshot of every executor's load:

* `choose` (a request arrives): among the ready executors with room for it (a sequence
  slot and the KV blocks of its prompt), prefer one that already holds its adapter (in a
  slot, or used by work it has), then one with a free adapter slot (no eviction), then any.
  Among equals, `pack` (Punica's rule, the default) takes the busiest, so that the others
  can drain; `spread` takes the least busy. With no room anywhere the request queues on
  a ready executor holding its adapter, else on the one with the least work per sequence slot.
  An executor that failed to load a task's adapter lately (`failed_tasks`) takes none of its
  requests while another can: its copy of the files is unreadable (one executor's may differ,
  or its device be full), and it kept drawing the spill, each request failing `adapter_failed`
  (an outside probe: 16 of 24 requests failed while the other executor served the task).
* `rebalance` (after every step, and when an executor is lost or comes back): work that
  waits where it cannot be admitted now -- beyond its executor's room, or on an executor
  that is down -- moves to a ready executor with room, the longest-waiting first (those
  past `overdue_s` before all others, whatever their adapter). This is the spill rule: a
  hot task fills the executors holding its adapter, and its overflow spreads to the others
  instead of queueing behind them; a rare task's request never waits behind a full
  executor while another has room. Work on a down executor moves even without room.

Only waiting requests move (they hold no KV blocks); running ones stay where their cache is.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

PlacementRule = Literal["pack", "spread"]
PLACEMENT_RULES: tuple[str, ...] = ("pack", "spread")


@dataclass(frozen=True)
class Demand:
    """A request as placement sees it."""

    key: Hashable  # the coordinator's handle on the request
    task: str | None  # adapter name; None for the base model
    blocks: int  # KV blocks its tokens so far need (prompt, plus output when recomputed)
    waited_s: float = 0.0  # since the server received it


@dataclass
class ExecutorLoad:
    """One executor's state as its engine books it."""

    index: int
    ready: bool
    max_seqs: int
    free_blocks: int
    running: int  # sequences in the running batch
    waiting: list[Demand] = field(default_factory=list)  # queued here, in arrival order
    tasks: frozenset[str] = frozenset()  # adapters in a slot or used by running work
    free_slots: int = 0  # adapter slots holding nothing
    failed_tasks: frozenset[str] = frozenset()  # adapters it failed to load lately: no place for their work


@dataclass(frozen=True)
class Move:
    key: Hashable
    source: int
    target: int


class _Room:
    """Sequence slots and KV blocks left on one executor, as decisions consume them."""

    def __init__(self, load: ExecutorLoad, queued: Sequence[Demand]) -> None:
        self.load = load
        self.seqs = load.max_seqs - load.running - len(queued)
        self.blocks = load.free_blocks - sum(d.blocks for d in queued)
        self.tasks = set(load.tasks) | {d.task for d in queued if d.task is not None}
        self.free_slots = load.free_slots
        self.work = load.running + len(queued)

    def fits(self, demand: Demand) -> bool:
        return (self.load.ready and self.seqs >= 1 and self.blocks >= demand.blocks
                and demand.task not in self.load.failed_tasks)

    def holds(self, task: str | None) -> bool:
        return task is None or task in self.tasks

    def take(self, demand: Demand) -> None:
        self.seqs -= 1
        self.blocks -= demand.blocks
        self.work += 1
        if demand.task is not None and demand.task not in self.tasks:
            self.tasks.add(demand.task)
            self.free_slots = max(0, self.free_slots - 1)


def _preference(room: _Room, demand: Demand, rule: PlacementRule) -> tuple[int, int, int, int]:
    """Sort key, smallest best: a holder, then a free adapter slot, then by the rule's load."""
    holder = 0 if room.holds(demand.task) else 1
    no_free_slot = 0 if holder == 0 or room.free_slots > 0 else 1
    busy = -room.work if rule == "pack" else room.work
    return holder, no_free_slot, busy, room.load.index


def _best(rooms: Sequence[_Room], demand: Demand, rule: PlacementRule) -> _Room | None:
    fitting = [room for room in rooms if room.fits(demand)]
    return min(fitting, key=lambda room: _preference(room, demand, rule)) if fitting else None


def _least_loaded(rooms: Sequence[_Room], demand: Demand) -> _Room | None:
    ready = [room for room in rooms if room.load.ready] or list(rooms)
    if not ready:
        return None
    # Queued on a holder of its adapter it will not need a load; if a seat frees up elsewhere
    # first, `rebalance` moves it there.
    return min(ready, key=lambda room: (demand.task in room.load.failed_tasks, 0 if room.holds(demand.task) else 1,
                                        room.work / max(1, room.load.max_seqs), room.load.index))


def choose(demand: Demand, loads: Sequence[ExecutorLoad], rule: PlacementRule = "pack") -> int:
    """The executor a new request waits on. Executors still loading take work only when
    none is ready (it runs once they are)."""
    if not loads:
        raise ValueError("no executors to place on")
    rooms = [_Room(load, load.waiting) for load in loads]
    room = _best(rooms, demand, rule) or _least_loaded(rooms, demand)
    assert room is not None
    return room.load.index


def _admissible(load: ExecutorLoad) -> tuple[list[Demand], list[Demand]]:
    """The executor's waiting work split into what it can admit now (in its order) and the rest."""
    if not load.ready:
        return [], list(load.waiting)
    seqs = load.max_seqs - load.running
    blocks = load.free_blocks
    kept: list[Demand] = []
    excess: list[Demand] = []
    for demand in load.waiting:
        if demand.task in load.failed_tasks:  # it failed to load that adapter: elsewhere if it can
            excess.append(demand)
        elif seqs >= 1 and blocks >= demand.blocks:
            kept.append(demand)
            seqs -= 1
            blocks -= demand.blocks
        else:
            excess.append(demand)
    return kept, excess


def rebalance(loads: Sequence[ExecutorLoad], rule: PlacementRule = "pack", overdue_s: float = 5.0) -> list[Move]:
    """Moves of waiting requests from where they cannot run now to where they can."""
    split = {load.index: _admissible(load) for load in loads}
    rooms = {load.index: _Room(load, split[load.index][0]) for load in loads}
    stranded = [(demand, load.index) for load in loads for demand in split[load.index][1]]
    # Overdue first, then the longest waiting: the spill order that bounds every wait.
    stranded.sort(key=lambda item: (item[0].waited_s < overdue_s, -item[0].waited_s))
    moves: list[Move] = []
    for demand, source in stranded:
        others = [room for index, room in rooms.items() if index != source]
        target = _best(others, demand, rule)
        if target is None and not rooms[source].load.ready:
            # Its executor is down or loading: any ready one serves it sooner.
            target = _least_loaded([room for room in others if room.load.ready], demand)
        if target is None:
            continue
        target.take(demand)
        moves.append(Move(demand.key, source, target.load.index))
    return moves
