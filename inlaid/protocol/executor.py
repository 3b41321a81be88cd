"""Coordinator <-> executor: the step plans and their results (also what the in-process
engine runs, so both run exactly the same plans)."""

from __future__ import annotations

import msgspec

from inlaid.protocol.sampling import SamplingParams

# ---------------------------------------------------------------- coordinator <-> executor


class ChunkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence's work in a step: compute KV for `token_ids` starting at `start_pos`.

    A decode step is a chunk of one token; a prefill may be split into several chunks.
    `sample` is set on the chunk that ends at the sequence's last known token.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    adapter_slot: int  # -1: no adapter
    sample: bool
    sampling: SamplingParams
    num_generated: int  # tokens generated so far: with the seed, makes sampling replayable


class AdapterLoad(msgspec.Struct, frozen=True, kw_only=True):
    """Load adapter `name` from `path` into device slot `slot` (evicting what was there)."""

    slot: int
    name: str
    path: str
    # the files registered (inlaid.engine.adapter_config.adapter_signature): a copy of other
    # files is refused, never served as this adapter ("": not checked)
    signature: str = ""


# The layer handover: a re-quantized decoder layer travels from the requantizer to the
# executor as a handle (shared memory on the CPU, CUDA IPC handles on a GPU, or a file when
# a restarted executor restores committed layers); a plan carries the swaps to apply before
# its step, each naming the quantization version it installs.


class TensorSlot(msgspec.Struct, frozen=True, kw_only=True):
    """Where one tensor lies inside a shared-memory segment."""

    key: str
    dtype: str  # torch dtype name without "torch."
    shape: list[int]
    offset: int  # bytes from the start of the segment


class LayerHandle(msgspec.Struct, frozen=True, kw_only=True):
    transport: str  # "shm" | "cuda_ipc" | "file" | "checkpoint" (the layer the executor loaded)
    name: str  # shared-memory segment name, or file path (checkpoint: its directory, for the log)
    tensors: list[TensorSlot] = []  # shm
    payload: bytes = b""  # cuda_ipc: the tensors' torch.multiprocessing reductions


class LayerSwap(msgspec.Struct, frozen=True, kw_only=True):
    """Install these GPTQ tensors as decoder layer `layer` (quantization `version`)."""

    layer: int
    version: int
    handle: LayerHandle


class BatchPlan(msgspec.Struct, frozen=True, kw_only=True, tag="batch_plan"):
    step_id: int
    chunks: list[ChunkPlan]
    adapter_loads: list[AdapterLoad] = []
    layer_swaps: list[LayerSwap] = []  # applied before the step: a step never mixes versions in a layer
    # Adapter directories this executor loaded that no registered task serves any more (the
    # task was removed and drained, or replaced): the executor forgets its host copies of
    # them before this plan's loads. A state directory gives every addition a fresh copy, so
    # without this an add/remove churn grows the executor's cache one adapter per cycle.
    adapter_drops: list[str] = []


class SampledToken(msgspec.Struct, frozen=True, kw_only=True):
    seq_id: int
    token_id: int


class SequenceFailure(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence of a plan could not be computed; the rest of the step was.

    `code` is the ErrorCode its request fails with (adapter_failed when its adapter could
    not be loaded, executor_failed when its token could not be sampled)."""

    seq_id: int
    code: str
    message: str


class StepResult(msgspec.Struct, frozen=True, kw_only=True, tag="step_result"):
    step_id: int
    sampled: list[SampledToken]
    num_tokens: int  # tokens computed in the step (prefill + decode)
    compute_seconds: float
    failed: list[SequenceFailure] = []  # sequences of the plan that got no token: their requests fail
    # Adapters whose load this step failed: they hold no slot now (the next use loads again).
    failed_adapters: list[str] = []


# ---------------------------------------------------------------- executor lifecycle
# The executor speaks first (ExecutorHello once its model is loaded); then it answers each
# BatchPlan with a StepResult, or an ExecutorFailure when running the plan raised. It sends
# ExecutorStats unsolicited, at most about once a second, between steps.


class ExecutorHello(msgspec.Struct, frozen=True, kw_only=True, tag="executor_hello"):
    protocol_version: int
    generation: int  # which incarnation of the executor (the coordinator restarts it)
    pid: int
    device: str
    num_kv_blocks: int
    load_seconds: float
    cuda_graph_batch_sizes: list[int] = []


class ExecutorFailure(msgspec.Struct, frozen=True, kw_only=True, tag="executor_failure"):
    """Running plan `step_id` raised; the executor is still alive and takes new plans."""

    step_id: int
    error_type: str
    message: str


class ExecutorStartFailure(msgspec.Struct, frozen=True, kw_only=True, tag="executor_start_failure"):
    """The executor could not load its model (or start its device) and exits: the error, for
    the coordinator's own account of why it cannot serve ("died with exit code 1" said none).
    Its incarnation is its socket identity, as for every message."""

    error_type: str
    message: str


class ExecutorStats(msgspec.Struct, frozen=True, kw_only=True, tag="executor_stats"):
    rss_bytes: int
    device_memory_allocated: int = 0  # CUDA only
    device_memory_reserved: int = 0
    steps: int = 0


class ExecutorShutdown(msgspec.Struct, frozen=True, kw_only=True, tag="executor_shutdown"):
    """Finish nothing more and exit 0."""


class LayerSwapResult(msgspec.Struct, frozen=True, kw_only=True, tag="layer_swap_result"):
    """Sent for each swap of a plan, before its StepResult; when not ok the old layer stays."""

    layer: int
    version: int
    ok: bool
    error: str = ""
    seconds: float = 0.0


ExecutorInbound = BatchPlan | ExecutorShutdown
ExecutorOutbound = (ExecutorHello | StepResult | ExecutorFailure | ExecutorStartFailure | ExecutorStats
                    | LayerSwapResult)

__all__ = [
    "AdapterLoad",
    "BatchPlan",
    "ChunkPlan",
    "ExecutorFailure",
    "ExecutorHello",
    "ExecutorInbound",
    "ExecutorOutbound",
    "ExecutorShutdown",
    "ExecutorStartFailure",
    "ExecutorStats",
    "LayerHandle",
    "LayerSwap",
    "LayerSwapResult",
    "SampledToken",
    "SequenceFailure",
    "StepResult",
    "TensorSlot",
]
