"""Every message Inlaid sends, as msgspec Structs (msgpack frames over ZeroMQ), by link:

- `sampling`: SamplingParams, carried by client requests and by engine plans;
- `executor`: coordinator <-> executor (BatchPlan, StepResult, hellos, layer swaps) — also
  what the in-process engine runs, so it and the multi-process server run the same plans;
- `requantizer`: coordinator <-> requantizer (one job, layer by layer);
- `client`: client <-> coordinator, the public wire API (requests, replies, error codes;
  the server's reports of itself, health, stats and metrics, are in `server_state`).

This package imports nothing else of Inlaid: clients, the coordinator, the executor and the
requantizer all speak through it. `from inlaid.protocol import X` works for every message.
"""

from __future__ import annotations

from inlaid.protocol.client import *  # noqa: F403 (the facade: each module's __all__)
from inlaid.protocol.executor import *  # noqa: F403
from inlaid.protocol.requantizer import *  # noqa: F403
from inlaid.protocol.sampling import *  # noqa: F403
from inlaid.protocol import client, executor, requantizer, sampling

PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", *client.__all__, *executor.__all__, *requantizer.__all__, *sampling.__all__]
