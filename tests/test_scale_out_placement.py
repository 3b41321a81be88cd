"""Placement across executors (inlaid/serve/placement.py): known answers, invariants on random
states, and a simulated mixed-task load against a single shared FIFO queue as the reference."""

from __future__ import annotations

import random
from collections import deque

import pytest

from inlaid.serve.placement import Demand, ExecutorLoad, Move, choose, rebalance


def load(index: int, *, ready: bool = True, max_seqs: int = 4, free_blocks: int = 100, running: int = 0,
         waiting: list[Demand] | None = None, tasks: tuple[str, ...] = (), free_slots: int = 2,
         failed: tuple[str, ...] = ()) -> ExecutorLoad:
    return ExecutorLoad(index=index, ready=ready, max_seqs=max_seqs, free_blocks=free_blocks, running=running,
                        waiting=waiting or [], tasks=frozenset(tasks), free_slots=free_slots,
                        failed_tasks=frozenset(failed))


def demand(key: int, task: str | None = "a", blocks: int = 2, waited_s: float = 0.0) -> Demand:
    return Demand(key=key, task=task, blocks=blocks, waited_s=waited_s)


# ------------------------------------------------------------------ choose: known answers
def test_choose_prefers_the_executor_holding_the_adapter_even_when_busier_or_idler() -> None:
    loads = [load(0, running=1, tasks=("b",)), load(1, running=3, tasks=("a",))]
    assert choose(demand(1, "a"), loads, "pack") == 1
    loads = [load(0, running=3, tasks=("b",)), load(1, running=0, tasks=("a",))]
    assert choose(demand(1, "a"), loads, "pack") == 1
    assert choose(demand(1, "a"), loads, "spread") == 1


def test_choose_pack_fills_the_busiest_that_fits_and_spread_the_idlest() -> None:
    loads = [load(0, running=1), load(1, running=2), load(2, running=4)]  # 2 is full
    assert choose(demand(1, None), loads, "pack") == 1
    assert choose(demand(1, None), loads, "spread") == 0


def test_choose_counts_blocks_of_queued_work_and_prefers_a_free_slot_to_an_eviction() -> None:
    queued = [demand(9, "x", blocks=60)]
    loads = [load(0, running=2, free_blocks=100, waiting=queued), load(1, running=1, free_blocks=100)]
    assert choose(demand(1, "a", blocks=50), loads, "pack") == 1  # 0 has 40 uncommitted blocks
    loads = [load(0, running=3, free_slots=0, tasks=("x", "y")), load(1, running=1, free_slots=1, tasks=("z",))]
    assert choose(demand(1, "a"), loads, "pack") == 1  # busier 0 would evict an adapter


def test_choose_without_room_queues_on_the_least_loaded_ready_executor() -> None:
    loads = [load(0, running=4, waiting=[demand(7)]), load(1, running=4), load(2, ready=False)]
    assert choose(demand(1, "b"), loads) == 1
    # nothing ready yet (all loading): still placed, it runs once that executor is up
    assert choose(demand(1), [load(0, ready=False), load(1, ready=False, running=0)]) in (0, 1)


def test_choose_never_picks_a_down_executor_while_one_is_ready() -> None:
    loads = [load(0, ready=False, tasks=("a",)), load(1, running=4, tasks=("b",))]
    assert choose(demand(1, "a"), loads) == 1


def test_an_executor_that_failed_to_load_an_adapter_takes_its_work_only_when_none_else_can() -> None:
    """An outside probe: executor 1 could not read a task's adapter, yet drew the task's spill
    (the holder was full), failing 16 of 24 requests while executor 0 served the task."""
    holder_full = load(0, running=4, tasks=("a",))
    assert choose(demand(1, "a"), [holder_full, load(1, failed=("a",))]) == 0  # queued on the holder
    assert choose(demand(1, "b"), [holder_full, load(1, failed=("a",))]) == 1  # other tasks: as before
    assert choose(demand(1, "a"), [load(0, running=4, failed=("a",)), load(1, running=1, failed=("a",))]) == 1
    # Waiting there already, it moves to an executor with room; with no room elsewhere it stays.
    stuck = load(1, waiting=[demand(7, "a"), demand(8, "b")], failed=("a",))
    assert rebalance([load(0, running=1), stuck]) == [Move(7, 1, 0)]
    assert rebalance([load(0, running=4), stuck]) == []
    assert rebalance([load(0, running=1, failed=("a",)), stuck]) == []


# ------------------------------------------------------------------ rebalance: known answers
def test_rebalance_moves_only_what_cannot_be_admitted_where_it_waits() -> None:
    queued = [demand(k, "a", waited_s=k) for k in range(1, 6)]
    loads = [load(0, running=2, waiting=queued, tasks=("a",)), load(1, running=0)]
    moves = rebalance(loads, "pack")
    # executor 0 admits two more (4 seqs); of the three left, the longest-waiting move first
    # and executor 1 (4 free seqs) takes all three
    assert moves == [Move(5, 0, 1), Move(4, 0, 1), Move(3, 0, 1)]


def test_rebalance_moves_everything_off_a_down_executor_room_or_not() -> None:
    queued = [demand(k) for k in range(6)]
    loads = [load(0, ready=False, waiting=queued), load(1, running=3), load(2, running=4)]
    moves = rebalance(loads)
    assert sorted(m.key for m in moves) == list(range(6))
    assert all(m.source == 0 for m in moves)
    assert [m.target for m in moves][0] == 1  # the one with room takes the first


def test_rebalance_sends_overdue_work_first_whatever_its_adapter() -> None:
    queued = [demand(1, "hot", waited_s=1.0), demand(2, "rare", waited_s=30.0), demand(3, "hot", waited_s=2.0)]
    loads = [load(0, running=4, waiting=queued, tasks=("hot",)), load(1, running=3, tasks=("hot",))]
    assert rebalance(loads, overdue_s=10.0) == [Move(2, 0, 1)]  # one seat on 1: the overdue rare one


def test_rebalance_does_nothing_when_no_executor_has_room() -> None:
    loads = [load(0, running=4, waiting=[demand(1)]), load(1, running=4, waiting=[demand(2)])]
    assert rebalance(loads) == []


# ------------------------------------------------------------------ invariants on random states
def _random_loads(rng: random.Random) -> list[ExecutorLoad]:
    tasks = ["t0", "t1", "t2", "t3", None]
    loads = []
    key = 0
    for index in range(rng.randint(1, 4)):
        max_seqs = rng.randint(1, 6)
        waiting = []
        for _ in range(rng.randint(0, 6)):
            waiting.append(demand(key, rng.choice(tasks), rng.randint(1, 20), rng.uniform(0, 20)))
            key += 1
        loads.append(load(index, ready=rng.random() > 0.25, max_seqs=max_seqs, free_blocks=rng.randint(0, 80),
                          running=rng.randint(0, max_seqs), waiting=waiting,
                          tasks=tuple(t for t in tasks[:4] if rng.random() < 0.3), free_slots=rng.randint(0, 2)))
    return loads


@pytest.mark.parametrize("rule", ["pack", "spread"])
def test_rebalance_invariants_on_random_states(rule: str) -> None:
    rng = random.Random(18)
    for _ in range(400):
        loads = _random_loads(rng)
        by_index = {lo.index: lo for lo in loads}
        moves = rebalance(loads, rule, overdue_s=10.0)  # type: ignore[arg-type]
        keys = [m.key for m in moves]
        assert len(keys) == len(set(keys))
        for move in moves:
            assert move.source != move.target
            assert by_index[move.target].ready
            assert move.key in {d.key for d in by_index[move.source].waiting}
        # Recount every target independently: what stays admissible plus what arrives fits,
        # unless it took work off a down executor (that moves even without room).
        for lo in loads:
            arrived = [d for src in loads for d in src.waiting if Move(d.key, src.index, lo.index) in moves]
            if all(by_index[m.source].ready for m in moves if m.target == lo.index):
                stays = _admissible_prefix(lo)
                seqs = lo.max_seqs - lo.running - len(stays) - len(arrived)
                blocks = lo.free_blocks - sum(d.blocks for d in stays) - sum(d.blocks for d in arrived)
                assert seqs >= 0 and blocks >= 0, (lo, arrived)
        # A ready executor never gives away work it can admit now.
        for lo in loads:
            if lo.ready:
                kept = {d.key for d in _admissible_prefix(lo)}
                assert not kept & {m.key for m in moves if m.source == lo.index}
        # A down executor keeps nothing while a ready one exists.
        if any(lo.ready for lo in loads):
            for lo in loads:
                if not lo.ready:
                    assert {d.key for d in lo.waiting} <= set(keys)


def _admissible_prefix(lo: ExecutorLoad) -> list[Demand]:
    """Reference: the executor admits, in its order, whatever still fits (first fit)."""
    seqs, blocks, kept = lo.max_seqs - lo.running, lo.free_blocks, []
    for d in lo.waiting:
        if seqs >= 1 and blocks >= d.blocks:
            kept.append(d)
            seqs -= 1
            blocks -= d.blocks
    return kept


def test_choose_invariants_on_random_states() -> None:
    rng = random.Random(7)
    for _ in range(400):
        loads = _random_loads(rng)
        new = demand(-1, rng.choice(["t0", "t1", None]), rng.randint(1, 20))
        chosen = next(lo for lo in loads if lo.index == choose(new, loads))
        if any(lo.ready for lo in loads):
            assert chosen.ready

        def fits(lo: ExecutorLoad) -> bool:
            return (lo.ready and lo.max_seqs - lo.running - len(lo.waiting) >= 1
                    and lo.free_blocks - sum(d.blocks for d in lo.waiting) >= new.blocks)

        def holds(lo: ExecutorLoad) -> bool:
            return new.task is None or new.task in lo.tasks or any(d.task == new.task for d in lo.waiting)

        if any(fits(lo) for lo in loads):
            assert fits(chosen)
            if any(fits(lo) and holds(lo) for lo in loads):
                assert holds(chosen)


# ------------------------------------------------------------------ a simulated mixed-task load
def _simulate(placed: bool, rng_seed: int = 3, ticks: int = 400) -> tuple[dict[str, int], list[int], float]:
    """Two executors of 4 sequences, each request runs 5 ticks once admitted; Zipf-like
    task popularity (one hot task, rare ones). placed=True: choose + rebalance; False: the
    reference, one shared FIFO queue feeding whichever executor has a free seat."""
    rng = random.Random(rng_seed)
    weights = {"hot": 0.55, "warm": 0.25, "cool": 0.12, "rare1": 0.05, "rare2": 0.03}
    service, max_seqs = 5, 4
    queues: list[deque[tuple[int, str, int]]] = [deque(), deque()]
    shared: deque[tuple[int, str, int]] = deque()
    running: list[list[tuple[int, str]]] = [[], []]  # (ends at, task)
    resident: list[list[str]] = [[], []]  # adapter slots, least recently used first (3 slots)
    waits: dict[str, int] = {}
    hits = admissions = 0
    key = 0
    for now in range(ticks):
        for i in range(2):
            running[i] = [r for r in running[i] if r[0] > now]
        for _ in range(rng.choice([0, 1, 2, 3])):  # 1.5 arrivals per tick against 8/5 capacity
            task = rng.choices(list(weights), list(weights.values()))[0]
            item = (key, task, now)
            key += 1
            if placed:
                loads = _sim_loads(queues, running, resident, max_seqs, now)
                queues[choose(demand(item[0], task, 1), loads)].append(item)
            else:
                shared.append(item)
        if placed:
            loads = _sim_loads(queues, running, resident, max_seqs, now)
            for move in rebalance(loads, overdue_s=20.0):
                item = next(x for x in queues[move.source] if x[0] == move.key)
                queues[move.source].remove(item)
                queues[move.target].append(item)
        for i in range(2):
            source = queues[i] if placed else shared
            while source and len(running[i]) < max_seqs:
                _, task, arrived = source.popleft()
                waits[f"{task}:{len(waits)}"] = now - arrived
                admissions += 1
                hits += task in resident[i]
                resident[i] = ([t for t in resident[i] if t != task] + [task])[-3:]
                running[i].append((now + service, task))
    per_task_max = {}
    for name, wait in waits.items():
        task = name.split(":")[0]
        per_task_max[task] = max(per_task_max.get(task, 0), wait)
    return per_task_max, [len(q) for q in queues] + [len(shared)], hits / max(1, admissions)


def _sim_loads(queues, running, resident, max_seqs, now) -> list[ExecutorLoad]:  # type: ignore[no-untyped-def]
    return [ExecutorLoad(index=i, ready=True, max_seqs=max_seqs, free_blocks=1000, running=len(running[i]),
                         waiting=[demand(k, t, 1, float(now - a)) for k, t, a in queues[i]],
                         tasks=frozenset(resident[i]) | {t for _, t in running[i]}, free_slots=3 - len(resident[i]))
            for i in range(2)]


def test_simulated_mixed_load_starves_no_task_and_keeps_affinity() -> None:
    placed_waits, _, placed_hits = _simulate(placed=True)
    fifo_waits, _, fifo_hits = _simulate(placed=False)
    assert set(placed_waits) == set(fifo_waits) == {"hot", "warm", "cool", "rare1", "rare2"}
    # No task waits longer than the worst wait of an ideal shared FIFO queue plus one service
    # time (the rare tasks included): placement never strands work behind a full executor.
    worst_fifo = max(fifo_waits.values())
    assert max(placed_waits.values()) <= worst_fifo + 5, (placed_waits, fifo_waits)
    # Affinity: admissions find their adapter already resident more often than FIFO does.
    assert placed_hits > fifo_hits, (placed_hits, fifo_hits)
