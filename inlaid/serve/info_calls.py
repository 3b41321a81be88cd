"""The coordinator's read-only calls: Hello, Health, GetStats and GetMetrics. Torch-free.

Each is answered at once from what the coordinator already holds; none reaches an executor.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from inlaid.protocol import (
    PROTOCOL_VERSION, ErrorCode, ErrorReply, GetMetrics, GetStats, Health, HealthReply, Hello, HelloReply,
    MetricsReply,
)
from inlaid.serve.config import ServerConfig, base_model_id
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.metrics import ServerMetrics
from inlaid.serve.requantizer_status import requantizer_info, requantizer_state
from inlaid.serve.stats import server_stats
from inlaid.serve.supervisor import STALLED_AFTER_FRACTION

SERVER_VERSION = "0.1.0"
INFO_CALLS = (Hello, Health, GetStats, GetMetrics)  # what this module answers

Reply = Callable[[bytes, msgspec.Struct], None]  # (client identity, message)


class InfoCalls:
    def __init__(self, config: ServerConfig, pool: ExecutorPool, dynamic: DynamicTasks, counters: dict[str, int],
                 metrics: ServerMetrics, reply: Reply, accepting: Callable[[], bool],
                 count_refused: Callable[[str], None], held: Callable[[], int | None] = lambda: None) -> None:
        """counters: the coordinator's request/step/token counts (read, never written);
        accepting(): False once the server shuts down; count_refused(code): a frame refused;
        held(): the requests a starting server holds, None once it serves (startup_hold.py)."""
        self.config = config
        self.pool = pool
        self.dynamic = dynamic
        self.counters = counters
        self.metrics = metrics
        self._reply = reply
        self._accepting = accepting
        self._count_refused = count_refused
        self._held = held
        self.started_at = time.monotonic()

    def answer(self, identity: bytes, message: Hello | Health | GetStats | GetMetrics) -> None:
        if isinstance(message, Hello):
            self._hello(identity, message)
        elif isinstance(message, Health):
            self._health(identity, message)
        elif isinstance(message, GetStats):
            gaps = [gap for shard in self.pool.shards if shard.step_loop for gap in shard.step_loop.step_gaps]
            store = self.dynamic.store
            self._reply(identity, server_stats(message.request_id, self.pool.shards, self.counters, gaps,
                                               requantizer=requantizer_info(self.dynamic),
                                               state_unsaved=store.unsaved if store else "",
                                               requests_held=self._held() or 0))
        else:
            self._reply(identity, MetricsReply(request_id=message.request_id, text=self.metrics.exposition()))

    def _hello(self, identity: bytes, message: Hello) -> None:
        if message.protocol_version != PROTOCOL_VERSION:
            self._count_refused(ErrorCode.PROTOCOL_VERSION)
            return self._reply(identity, ErrorReply(
                request_id=message.request_id, code=ErrorCode.PROTOCOL_VERSION,
                message=f"server speaks protocol {PROTOCOL_VERSION}, client {message.protocol_version}"))
        self._reply(identity, HelloReply(request_id=message.request_id, protocol_version=PROTOCOL_VERSION,
                                         server_version=SERVER_VERSION, model=base_model_id(self.config.engine.model_dir),
                                         max_model_len=self.pool.shards[0].engine.max_model_len,
                                         max_frame_bytes=self.config.limits.max_frame_bytes))

    def _health(self, identity: bytes, message: Health) -> None:
        # "ok" while any executor serves; executor_ready only when every one is up. "starting"
        # also while the start-up tuning runs with the executors ready: requests wait till then.
        shards = self.pool.shards
        ready = [shard.ready for shard in shards]
        running = {shard.index: shard.step_running_seconds() for shard in shards}
        # A quarter of the timeout: far past any step a working executor takes, and time
        # left before the kill for a balancer or an operator to see it.
        stalled_after = self.config.limits.step_timeout_s * STALLED_AFTER_FRACTION
        serving = [shard for shard in shards if shard.ready and running[shard.index] < stalled_after]
        status = ("shutting_down" if not self._accepting()
                  else "starting" if self._held() is not None or not any(ready)
                  else "ok" if serving else "stalled")
        self._reply(identity, HealthReply(
            request_id=message.request_id, status=status, executor_ready=all(ready),
            uptime_seconds=time.monotonic() - self.started_at, requantizer=requantizer_state(self.dynamic),
            step_running_seconds=max(running.values(), default=0.0),
            executor_restarts=sum(shard.supervisor.restarts for shard in shards if shard.supervisor)))
