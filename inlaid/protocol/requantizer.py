"""Coordinator <-> requantizer: one re-quantization job at a time, layer by layer."""

from __future__ import annotations

import msgspec

from inlaid.protocol.executor import LayerHandle

# ---------------------------------------------------------------- coordinator <-> requantizer
# The requantizer speaks first (RequantizerHello); the coordinator sends one job at a time.
# For every layer the requantizer sends LayerReady and waits for LayerCommitted (so at most
# one layer's new weights are in flight), then JobFinished at the end.


class RequantizerHello(msgspec.Struct, frozen=True, kw_only=True, tag="requantizer_hello"):
    protocol_version: int
    generation: int
    pid: int
    threads: int
    niceness: int
    idle_priority: bool  # Linux SCHED_IDLE: runs only when nothing else wants the CPU


class RequantizeJob(msgspec.Struct, frozen=True, kw_only=True, tag="requantize_job"):
    """Add task `task` to the served quantization, producing version `version`."""

    job_id: str
    task: str
    adapter_dir: str
    calibration: str
    version: int
    start_layer: int  # layers before it are done (a resumed job)
    model_dir: str  # the full-precision base
    checkpoint_dir: str  # the served GPTQ checkpoint (with its Hessian state)
    served_layers: dict[int, str]  # layer -> file of its currently served tensors
    state_dir: str  # merged Hessian state: read first, written back
    layers_dir: str  # where re-quantized layers are written
    drop_tasks: list[str] = []  # removed tasks: their Hessians leave the state
    change_threshold: float = 0.0
    quality_tolerance: float | None = 1.0
    max_samples: int | None = None
    device: str = "cpu"  # the executor's: picks the handover transport
    duty_cycle: float = 1.0  # the share of one core's time the job may use while the machine is busy
    idle_duty_cycle: float = 1.0  # the same while nothing else uses the CPU


class LinearOutcome(msgspec.Struct, frozen=True, kw_only=True):
    linear: str
    action: str  # requantized | kept-unchanged | kept-quality
    change: float  # relative change of the aggregate Hessian
    reason: str = ""
    errors_served: dict[str, float] = {}  # each task's relative error on the served weight
    errors_new: dict[str, float] = {}  # ... on the re-quantized weight


class LayerReady(msgspec.Struct, frozen=True, kw_only=True, tag="layer_ready"):
    """Layer `layer` of job `job_id` is decided. With a handle, swap it in and answer
    LayerCommitted; without (no linear changed), just answer."""

    job_id: str
    layer: int
    version: int
    handle: LayerHandle | None
    file: str  # the persisted tensors ("" when nothing changed)
    linears: list[LinearOutcome]
    forward_seconds: float
    quantize_seconds: float
    peak_rss_bytes: int = 0  # the requantizer's so far (a job can end without its JobFinished)


class LayerCommitted(msgspec.Struct, frozen=True, kw_only=True, tag="layer_committed"):
    job_id: str
    layer: int
    swapped: bool
    error: str = ""


class JobFinished(msgspec.Struct, frozen=True, kw_only=True, tag="job_finished"):
    job_id: str
    ok: bool
    error: str = ""
    peak_rss_bytes: int = 0


class CancelJob(msgspec.Struct, frozen=True, kw_only=True, tag="cancel_job"):
    job_id: str


class RequantizerShutdown(msgspec.Struct, frozen=True, kw_only=True, tag="requantizer_shutdown"):
    """Stop (a running job stops at the next layer boundary) and exit 0."""


RequantizerInbound = RequantizeJob | LayerCommitted | CancelJob | RequantizerShutdown
RequantizerOutbound = RequantizerHello | LayerReady | JobFinished

__all__ = [
    "CancelJob",
    "JobFinished",
    "LayerCommitted",
    "LayerReady",
    "LinearOutcome",
    "RequantizeJob",
    "RequantizerHello",
    "RequantizerInbound",
    "RequantizerOutbound",
    "RequantizerShutdown",
]
