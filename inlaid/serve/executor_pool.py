"""Several executors under one coordinator. Torch-free.

Each executor is a shard: its own engine (scheduler, KV-block and adapter-slot bookkeeping,
the scheduling policy's queue), its own supervisor (process, restarts) and its own step
loop. One engine per executor rather than one shared: the engine's bookkeeping *is* one
device's state (block ids, slot ids, the running batch), so sharing it would mean
device-indexing every block and slot; kept apart, each executor plans, preempts and
recovers exactly as a single one does. The policy orders the work inside a shard; the
placement rules (`placement.py`) decide which shard a request waits on, and move waiting
work between shards (`rebalance`). Sequence ids are shared, so a request keeps its id
when it moves.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec

from inlaid.engine.config import EngineConfig
from inlaid.engine.engine import Engine
from inlaid.engine.scheduler import FifoPolicy, SchedulingPolicy
from inlaid.protocol import BatchPlan, ExecutorInfo
from inlaid.serve.config import ServerConfig
from inlaid.serve.placement import Demand, ExecutorLoad, Move, choose, rebalance
from inlaid.serve.requests import ActiveRequest
from inlaid.serve.step_loop import StepLoop
from inlaid.serve.supervisor import ExecutorSupervisor

log = logging.getLogger("inlaid.coordinator")


class ShardEngine(Engine):
    """One executor's engine on the coordinator's side. Its plans also name the adapter
    directories that executor may forget (`BatchPlan.adapter_drops`): the executor is another
    process and learns of adapters only from plans, so without them it would keep the host
    copy of every removed or replaced task until it restarts."""

    def __init__(self, config: EngineConfig, policy: SchedulingPolicy | None, seq_ids: Iterator[int]) -> None:
        super().__init__(config, runner=None, policy=policy, seq_ids=seq_ids)
        self._executor_adapters: dict[str, str] = {}  # name -> the directory this executor last loaded for it

    def begin_step(self) -> BatchPlan | None:
        plan = super().begin_step()
        if plan is None:
            return None  # an idle executor learns at its next plan: nothing grows while it is idle
        registered = self.scheduler.adapters.paths
        # The registry unregisters a removed task once its last request ended, and a task is
        # replaced only while none of its requests is in flight: a path gone from `registered` is
        # used by no sequence of this plan or a later one.
        gone = {path for name, path in self._executor_adapters.items() if registered.get(name) != path}
        if gone:
            gone -= set(registered.values())  # another task may serve the same directory
            self._executor_adapters = {name: path for name, path in self._executor_adapters.items()
                                       if registered.get(name) == path}
        for load in plan.adapter_loads:
            self._executor_adapters[load.name] = load.path
        return msgspec.structs.replace(plan, adapter_drops=sorted(gone)) if gone else plan


# tasks_served's key for the requests of tasks since removed: their names go (each name
# ever added would stay for the life of the process), their count stays, so the sum over
# the keys (requests ended on this executor) never goes back. Reserved form: no task's name.
REMOVED_TASKS_LABEL = "__removed__"
REFUSED_MOVE_RETRY_S = 10.0  # a move the target's engine refused is not tried again sooner
# How long an executor that failed to load a task's adapter takes none of that task's work
# while another executor can (placement.py): long enough to stop a retry storm drawing the
# spill to it, short enough that a fixed file (or a restarted executor) serves again soon.
ADAPTER_FAILURE_MEMORY_S = 60.0


@dataclass
class ExecutorShard:
    index: int
    engine: Engine
    supervisor: ExecutorSupervisor | None = None
    step_loop: StepLoop | None = None
    tasks_served: Counter[str] = field(default_factory=Counter)  # requests that ended here, by task label
    moved_in: int = 0  # requests moved here from another executor
    admissions: int = 0  # adapter rows admitted (a chunk from position 0)
    affinity_hits: int = 0  # of those, with their adapter already in a slot
    # task -> (when its adapter failed to load here (monotonic), the directory it was registered with)
    adapter_failures: dict[str, tuple[float, str | None]] = field(default_factory=dict)

    def adapter_failed(self, task: str) -> None:
        self.adapter_failures[task] = (time.monotonic(), self.engine.scheduler.adapters.paths.get(task))

    def failed_tasks(self, now: float) -> frozenset[str]:
        """Tasks whose adapter failed to load here in the last ADAPTER_FAILURE_MEMORY_S, from
        the directory still registered: placement sends their work elsewhere while it can
        (placement.py). A task removed, or added again from other files, is forgotten at once."""
        paths = self.engine.scheduler.adapters.paths
        for task in [t for t, (at, path) in self.adapter_failures.items()
                     if now - at > ADAPTER_FAILURE_MEMORY_S or paths.get(t) != path]:
            del self.adapter_failures[task]
        return frozenset(self.adapter_failures)

    @property
    def ready(self) -> bool:
        return self.supervisor is not None and self.supervisor.ready.is_set()

    def wake(self) -> None:
        if self.step_loop is not None:
            self.step_loop.work.set()

    def step_running_seconds(self, now: float | None = None) -> float:
        """How long the step on its executor has run (0 between steps): health and /metrics
        show a hung executor with it before the step timeout kills it. Read from the metrics
        port's thread too: one read of a float-or-None attribute."""
        since = self.step_loop.executing_since if self.step_loop is not None else None
        return (time.monotonic() if now is None else now) - since if since is not None else 0.0

    def forget_task(self, task: str) -> None:
        """`task` was removed and its last request ended (none can end here again): its
        count moves to REMOVED_TASKS_LABEL's, so a task added later under the name starts at 0."""
        served = self.tasks_served.pop(task, 0)
        if served:
            self.tasks_served[REMOVED_TASKS_LABEL] += served
        try:  # the policy's per-task state (counters, learned lengths) goes too
            self.engine.scheduler.policy.on_task_removed(task)
        except Exception:  # a plug-in's bug: its state stays, the removal stands
            log.exception("the scheduling policy failed to forget a removed task", extra={"task": task})

    def count_admissions(self, plan: BatchPlan) -> None:
        admitted = sum(1 for chunk in plan.chunks if chunk.start_pos == 0 and chunk.adapter_slot >= 0)
        self.admissions += admitted
        self.affinity_hits += max(0, admitted - len(plan.adapter_loads))

    def info(self) -> ExecutorInfo:
        scheduler = self.engine.scheduler
        supervisor = self.supervisor
        return ExecutorInfo(
            index=self.index, ready=self.ready, pid=supervisor.pid if supervisor and self.ready else 0,
            restarts=supervisor.restarts if supervisor else 0, device=self.engine.config.device,
            requests_running=len(scheduler.running), requests_waiting=len(scheduler.waiting),
            kv_blocks_free=scheduler.blocks.num_free_blocks, tasks_served=dict(self.tasks_served),
            moved_in=self.moved_in, adapter_admissions=self.admissions, adapter_hits=self.affinity_hits,
            step_running_seconds=self.step_running_seconds(),
        )  # fmt: skip


class ExecutorPool:
    def __init__(self, config: ServerConfig, policy_factory: Callable[[], SchedulingPolicy | None]) -> None:
        settings = config.executors
        seq_ids = itertools.count()  # shared: a moved request keeps its sequence id
        self.shards = [
            ExecutorShard(index, ShardEngine(dataclasses.replace(config.engine, device=device), policy_factory(),
                                             seq_ids))
            for index, device in enumerate(config.executor_devices())
        ]  # fmt: skip
        for shard in self.shards:
            shard.engine.scheduler.executor_index = shard.index
        self.rule = settings.placement
        self.overdue_s = settings.overdue_s
        # Moves a target's engine refused, (request, target) -> until when it is not tried again:
        # rebalanced every 0.1 s, a refusing plug-in logged a traceback 10 times a second.
        self._refused: dict[tuple[str, int], float] = {}

    @property
    def engines(self) -> list[Engine]:
        return [shard.engine for shard in self.shards]

    def replace_policies(self, policy_factory: Callable[[], SchedulingPolicy | None]) -> None:
        """A fresh policy from `policy_factory` for every engine, before any request arrived;
        the replaced ones are closed."""
        for shard in self.shards:
            shard.engine.scheduler.replace_policy(policy_factory() or FifoPolicy()).close()

    def close_policies(self) -> bool:
        """Close every engine's policy (the length predictor saves its state); False when one
        failed (a plug-in's bug: logged with its traceback, the others still close)."""
        closed = True
        for engine in self.engines:
            policy = engine.scheduler.policy
            try:
                policy.close()
            except Exception:  # noqa: BLE001  (any plug-in policy's error: the shutdown goes on)
                log.exception("a scheduling policy failed to close", extra={"policy": type(policy).__qualname__})
                closed = False
        return closed

    def __len__(self) -> int:
        return len(self.shards)

    def others_ready(self, shard: ExecutorShard) -> bool:
        """Whether an executor other than `shard`'s is up (its supervisor's hello arrived)."""
        return any(other.ready for other in self.shards if other is not shard)

    # ------------------------------------------------------------------ placement
    def _blocks(self, engine: Engine, num_tokens: int) -> int:
        return -(-(num_tokens + 1) // engine.scheduler.blocks.block_size)

    def loads(self, requests: Mapping[str, ActiveRequest]) -> list[ExecutorLoad]:
        """Every shard's load as placement sees it; `requests`: in-flight ones by engine id."""
        now = time.monotonic()
        engine_ids = {request.seq_id: engine_id for engine_id, request in requests.items()}
        loads = []
        for shard in self.shards:
            scheduler = shard.engine.scheduler
            adapters = scheduler.adapters
            resident = {name for name in adapters.paths if adapters.slot_of(name) is not None}
            waiting = [Demand(key=engine_ids[seq.seq_id], task=seq.adapter,
                              blocks=self._blocks(shard.engine, len(seq.token_ids)),
                              waited_s=now - requests[engine_ids[seq.seq_id]].received_at)
                       for seq in scheduler.waiting if seq.seq_id in engine_ids]  # fmt: skip
            # A step running past overdue_s (a hung or stopped executor, until the step timeout
            # kills it) counts as not ready: its waiting requests move to one that steps (an
            # outside probe: 10-12 s waits behind a SIGSTOPped executor, overdue_s 5).
            stalled = shard.step_running_seconds(now) > self.overdue_s
            loads.append(ExecutorLoad(
                index=shard.index, ready=shard.ready and not stalled, max_seqs=scheduler.limits.max_num_seqs,
                free_blocks=scheduler.blocks.num_free_blocks, running=len(scheduler.running), waiting=waiting,
                tasks=frozenset(resident | {s.adapter for s in scheduler.running if s.adapter is not None}),
                free_slots=adapters.num_slots - len(resident), failed_tasks=shard.failed_tasks(now),
            ))  # fmt: skip
        return loads

    def choose(self, task: str | None, num_tokens: int, requests: Mapping[str, ActiveRequest]) -> ExecutorShard:
        """The shard a new request of `num_tokens` prompt tokens waits on."""
        if len(self.shards) == 1:
            return self.shards[0]
        demand = Demand(key=None, task=task, blocks=self._blocks(self.shards[0].engine, num_tokens))
        return self.shards[choose(demand, self.loads(requests), self.rule)]

    def rebalance(self, requests: Mapping[str, ActiveRequest]) -> list[Move]:
        """Move waiting requests that cannot run where they wait (placement.rebalance); each
        request's `executor` follows it. Returns the moves made."""
        if len(self.shards) == 1:
            return []
        made = []
        now = time.monotonic()
        self._refused = {move: until for move, until in self._refused.items() if until > now and move[0] in requests}
        for move in rebalance(self.loads(requests), self.rule, self.overdue_s):
            source, target = self.shards[move.source], self.shards[move.target]
            if (str(move.key), move.target) in self._refused:
                continue
            handed = source.engine.take_waiting(str(move.key))
            if handed is None:
                continue
            try:
                target.engine.put(handed)
            except Exception:  # noqa: BLE001  (a plug-in policy's on_arrival): in neither engine, it was lost
                log.exception("a waiting request could not move to another executor; it waits where it was",
                              extra={"request": str(move.key), "source": move.source, "target": move.target})
                self._refused[(str(move.key), move.target)] = now + REFUSED_MOVE_RETRY_S
                source.engine.put(handed)
                continue
            request = requests[str(move.key)]
            request.executor = target.index
            target.moved_in += 1
            made.append(move)
            target.wake()
        return made
