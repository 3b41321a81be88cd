"""Every message Inlaid sends, as msgspec Structs (msgpack frames over ZeroMQ).

This module imports nothing of Inlaid: clients, the coordinator and the executor all
speak through it. Engine-internal messages (BatchPlan, StepResult) live here too, so the
in-process engine and the multi-process server run exactly the same plans.
"""

from __future__ import annotations

import math

import msgspec

PROTOCOL_VERSION = 1


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to pick tokens. temperature 0 means greedy; any other finite temperature > 0
    is honoured exactly (the sampler scales in float64 relative to the row's maximum)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError with a clear message for values no sampler can honour."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature < math.inf):  # also refuses NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


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
    transport: str  # "shm" | "cuda_ipc" | "file"
    name: str  # shared-memory segment name, or file path
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
ExecutorOutbound = ExecutorHello | StepResult | ExecutorFailure | ExecutorStats | LayerSwapResult


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


# ---------------------------------------------------------------- client <-> coordinator
# Every request carries a client-chosen `request_id` (unique per client connection); every
# reply names the request it answers. A generate is answered by zero or more TextChunks
# (when `stream` is set) and exactly one GenerateDone or ErrorReply.
#
# Unknown fields: requests refuse them (`malformed`, naming the field), so a misspelt
# option can never fall back to its default unnoticed; both sides check PROTOCOL_VERSION
# in the hello, so a field is only ever added with a new version. Replies are read
# leniently by the SDK: a server may add a reply field without breaking older clients.

DEFAULT_MAX_FRAME_BYTES = 1 << 20


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str


class Hello(msgspec.Struct, frozen=True, kw_only=True, tag="hello", forbid_unknown_fields=True):
    request_id: str
    protocol_version: int
    client: str = ""


class Generate(msgspec.Struct, frozen=True, kw_only=True, tag="generate", forbid_unknown_fields=True):
    """Exactly one of `prompt`, `messages` (chat, rendered with the model's template) or
    `prompt_token_ids`. `task` names a registered adapter; None runs the base model.
    `deadline_s` counts from the server's receipt; past it the request fails."""

    request_id: str
    task: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    deadline_s: float | None = None


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel", forbid_unknown_fields=True):
    """Cancel this client's generate `request_id`; it ends with finish_reason 'cancelled'."""

    request_id: str


class ListTasks(msgspec.Struct, frozen=True, kw_only=True, tag="list_tasks", forbid_unknown_fields=True):
    request_id: str


class Health(msgspec.Struct, frozen=True, kw_only=True, tag="health", forbid_unknown_fields=True):
    request_id: str


class GetStats(msgspec.Struct, frozen=True, kw_only=True, tag="stats", forbid_unknown_fields=True):
    request_id: str


class GetMetrics(msgspec.Struct, frozen=True, kw_only=True, tag="metrics", forbid_unknown_fields=True):
    """The server's Prometheus metrics (text exposition format 0.0.4)."""

    request_id: str


class AddTask(msgspec.Struct, frozen=True, kw_only=True, tag="add_task", forbid_unknown_fields=True):
    """Admin: register (or replace) task `name` served by the PEFT adapter in `adapter_dir`.
    With `calibration_jsonl` (samples of the task) on a quantized base, the base is then
    re-quantized for the task in the background (follow it with TaskStatus)."""

    request_id: str
    name: str
    adapter_dir: str
    token: str = ""
    calibration_jsonl: str = ""


class RemoveTask(msgspec.Struct, frozen=True, kw_only=True, tag="remove_task", forbid_unknown_fields=True):
    """Admin: stop accepting requests for `name`; running ones finish first."""

    request_id: str
    name: str
    token: str = ""


class TaskStatus(msgspec.Struct, frozen=True, kw_only=True, tag="task_status", forbid_unknown_fields=True):
    """Admin: where task `name` stands (its re-quantization above all)."""

    request_id: str
    name: str
    token: str = ""


ClientRequest = (
    Hello | Generate | Cancel | ListTasks | Health | GetStats | GetMetrics | AddTask | RemoveTask | TaskStatus
)


class ErrorCode:
    """The `code` of an ErrorReply. The SDK maps each to an exception class."""

    MALFORMED = "malformed"  # undecodable frame, wrong field types, several frames
    UNKNOWN_MESSAGE = "unknown_message_type"
    FRAME_TOO_LARGE = "frame_too_large"
    PROTOCOL_VERSION = "protocol_version"
    INVALID_REQUEST = "invalid_request"  # bad sampling values, no prompt, duplicate id, ...
    UNKNOWN_TASK = "unknown_task"
    CONTEXT_LENGTH = "context_length"
    OVERLOADED = "overloaded"
    UNAUTHORIZED = "unauthorized"
    TASK_BUSY = "task_busy"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    EXECUTOR_FAILED = "executor_failed"  # the executor died, hung, or could not compute this request
    ADAPTER_FAILED = "adapter_failed"  # the task's adapter could not be loaded on the executor
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class HelloReply(msgspec.Struct, frozen=True, kw_only=True, tag="hello_reply"):
    request_id: str
    protocol_version: int
    server_version: str
    model: str
    max_model_len: int


class TextChunk(msgspec.Struct, frozen=True, kw_only=True, tag="chunk"):
    request_id: str
    text: str  # newly visible text (may be empty while a multi-byte character completes)
    token_ids: list[int]


class GenerateDone(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | context | cancelled
    num_prompt_tokens: int
    queue_seconds: float  # receipt -> first scheduled
    first_token_seconds: float  # receipt -> first generated token (0 when none)
    total_seconds: float


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    request_id: str  # "" when the frame was too broken to name its request
    code: str
    message: str


class TaskInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    adapter_dir: str
    active_requests: int


class TaskList(msgspec.Struct, frozen=True, kw_only=True, tag="task_list"):
    request_id: str
    tasks: list[TaskInfo]


class HealthReply(msgspec.Struct, frozen=True, kw_only=True, tag="health_reply"):
    request_id: str
    status: str  # ok | starting (executor loading) | shutting_down
    executor_ready: bool
    uptime_seconds: float


class ExecutorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One executor of a server with several (`[executors] count`)."""

    index: int
    ready: bool
    pid: int  # 0 while it is not ready
    restarts: int
    device: str
    requests_running: int
    requests_waiting: int
    kv_blocks_free: int
    tasks_served: dict[str, int]  # requests that ended on this executor, by task ("__base__": none)
    moved_in: int  # waiting requests moved here from another executor
    adapter_admissions: int  # adapter rows admitted (new or recomputed)
    adapter_hits: int  # of those, with their adapter already in a slot


class ServerStats(msgspec.Struct, frozen=True, kw_only=True, tag="stats_reply"):
    request_id: str
    requests_waiting: int
    requests_running: int
    requests_received: int
    requests_finished: int
    requests_failed: int
    requests_rejected_overloaded: int
    steps: int
    tokens_generated: int
    kv_blocks_total: int
    kv_blocks_free: int
    executor_pid: int
    executor_restarts: int
    executor_rss_bytes: int
    executor_device_memory_allocated: int
    mean_step_seconds: float  # plan sent -> result received, over the last steps
    mean_compute_seconds: float  # the executor's own time for those steps
    mean_step_gap_seconds: float  # coordinator time between a result and the next plan
    requests_abandoned: int = 0  # cancelled because their client disconnected
    executors: list[ExecutorInfo] = []  # per executor; the figures above are their sums


class MetricsReply(msgspec.Struct, frozen=True, kw_only=True, tag="metrics_reply"):
    request_id: str
    text: str  # Prometheus text exposition format 0.0.4


class AdminReply(msgspec.Struct, frozen=True, kw_only=True, tag="admin_reply"):
    request_id: str
    message: str


class KeptLinear(msgspec.Struct, frozen=True, kw_only=True):
    """A linear the re-quantization left as it was served, and why."""

    layer: int
    linear: str
    action: str  # kept-unchanged | kept-quality
    reason: str


class TaskStatusReply(msgspec.Struct, frozen=True, kw_only=True, tag="task_status_reply"):
    request_id: str
    name: str
    phase: str  # serving | queued | requantizing | ready | failed
    layers_done: int
    layers_total: int
    version: int  # the quantization version its re-quantization produces (0: none)
    served_version: int  # the newest version any served layer carries
    layers_swapped: int
    kept: list[KeptLinear] = []
    message: str = ""  # why there is no re-quantization, or the error of a failed one
    forward_seconds: float = 0.0  # the requantizer's calibration forward + Hessians so far
    quantize_seconds: float = 0.0  # ... aggregation, GPTQ and the quality gate
    wall_seconds: float = 0.0  # job start (first dispatch) -> finish (or now)
    peak_rss_bytes: int = 0  # the requantizer's


ServerReply = (
    HelloReply | TextChunk | GenerateDone | ErrorReply | TaskList | HealthReply | ServerStats | MetricsReply
    | AdminReply | TaskStatusReply
)
