"""Client <-> coordinator: requests, replies and the error codes (the public wire API)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from inlaid.protocol.sampling import SamplingParams
from inlaid.protocol.server_state import ExecutorInfo, HealthReply, MetricsReply, RequantizerInfo, ServerStats

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

# A request_id is echoed in every reply to its request (each TextChunk of a stream): a longer
# one is refused, lest one client's 1 MB id fill the server's send queues with copies.
MAX_REQUEST_ID_CHARS = 256
# An admin token's length (server.admin_token*; the HTTP front refuses a longer Bearer token
# with 401 before sending it: inside a request's frame, a 20 KB token got "send a shorter prompt").
MAX_ADMIN_TOKEN_CHARS = 1024


def reply_id(request_id: object) -> str:
    """The request_id a reply may carry: none ("") for one that is not a string or too long to
    have been admitted (a reply never echoes it, nor a cut of it another request could own)."""
    return request_id if isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID_CHARS else ""

# OpenAI's chat roles -> the chat template's (OpenAI's newer "developer" is the system
# prompt); "tool" is absent because tool calls are not supported. The one rule for the SDK,
# the HTTP front and the coordinator's wire: any other role would be pasted into the
# template as is (a role "user<|im_end|>..." forges turns).
CHAT_ROLES: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_template_role(role: str, where: str) -> str:
    """The template's role for a message's `role` (`where`: "messages[3]"); ValueError,
    naming the role as an excerpt, when it is not supported."""
    template_role = CHAT_ROLES.get(role) if isinstance(role, str) else None
    if template_role is None:
        raise ValueError(f"{where}.role {excerpt(role) if isinstance(role, str) else repr(role)} is not supported "
                         "(use system, developer, user or assistant; tool messages are not supported)")
    return template_role


def excerpt(text: str, limit: int = 64) -> str:
    """`text` as shown in an error or a log: its repr, its first `limit` characters only when
    longer (a client's 1 MB name must not come back, or be logged, whole)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


# Names an error or a log line lists before it says how many more there are: one naming
# each of 1,000 tasks was 7-10 KB (an outside probe).
SHOWN_NAMES = 20


def shown_names(names: Sequence[str], limit: int = SHOWN_NAMES) -> str:
    """`names` joined for a message: every one up to `limit`, else the first `limit` and the count."""
    if not names:
        return "none"
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])}, ... ({len(names)} in all)"


def unknown_task_message(name: str, known: list[str]) -> str:
    """An unknown task's refusal, in the words of every server (a coordinator, a Ray replica,
    the Ray ingress): the HTTP front reads the tasks after "; this server has: " from a
    server that sends no `ErrorReply.known_tasks`. The base model is no task (an SDK user
    tried the name /v1/models lists for it)."""
    tasks = shown_names(known)
    return f"unknown task {excerpt(name)} (for the base model, send no task); this server has: {tasks}"


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
    # server.max_frame_bytes: the SDK refuses a larger request before sending it. A frame far
    # over it makes ZeroMQ drop the whole connection, failing every other request on it.
    # None: a server older than this field (msgspec fills the default; unknown fields are
    # ignored, so older clients read a newer server's hello too).
    max_frame_bytes: int | None = None


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


class InFlightCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Why an `overloaded` refusal came: the server's admission counts when it refused."""

    requests: int  # requests in flight on the server
    this_connection: int  # of them, the refused request's connection's
    limit: int  # server.max_pending_requests; below it, the last tenth is kept for other connections


class ContextOverflow(msgspec.Struct, frozen=True, kw_only=True):
    """Why a `context_length` refusal came: what the request needs against the context."""

    context_length: int  # the model's context, in tokens
    prompt_tokens: int  # the prompt's (a lower bound for a text too long to tokenize whole)
    max_tokens: int | None = None  # the request's limit, when that is what does not fit; None: the prompt alone


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    """`message` is for people and its wording may change; a program (the HTTP front) reads
    the optional facts below instead. Each is None when the error has none (and from a
    server older than the field)."""

    request_id: str  # "" when the frame was too broken to name its request
    code: str
    message: str
    field: str | None = None  # the request's field at fault, by its name here: max_tokens, temperature, prompt, ...
    in_flight: InFlightCounts | None = None  # with `overloaded`
    context_overflow: ContextOverflow | None = None  # with `context_length`
    # With `unknown_task`: the tasks this server serves, the first SHOWN_NAMES of them by name,
    # and how many it serves (None: every one is listed; a server older than the count).
    known_tasks: list[str] | None = None
    known_tasks_total: int | None = None
    # With `overloaded` when the refusal is the connection's own backlog, not admission: the
    # messages of this connection that waited to be handled (its bound; the server's inbox).
    queued_messages: int | None = None


class TaskInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    adapter_dir: str
    active_requests: int


class TaskList(msgspec.Struct, frozen=True, kw_only=True, tag="task_list"):
    request_id: str
    tasks: list[TaskInfo]


class ReplacedConfigEntry(msgspec.Struct, frozen=True, kw_only=True):
    """The server config's [tasks] entry that a live AddTask of the same name now overrides."""

    adapter_dir: str  # the config's adapter, no longer served under the name
    kept_across_restarts: bool  # True: until the task is removed (server.state_dir keeps it); False: until a restart


class AdminReply(msgspec.Struct, frozen=True, kw_only=True, tag="admin_reply"):
    """`message` is for people; `replaces_config_entry` says the same to a program (AddTask only)."""

    request_id: str
    message: str
    replaces_config_entry: ReplacedConfigEntry | None = None
    # AddTask of another adapter under a name, with no calibration: the Hessians stored for the
    # name (computed with the adapter it replaced) left the re-quantization's aggregate.
    hessians_dropped: bool = False
    # AddTask of the directory the name serves already, its files unchanged (no state directory
    # copies it): nothing was loaded again (changed files there are loaded, as a replacement).
    already_served: bool = False
    # RemoveTask of a name the config's [tasks] lists: that entry's adapter directory, which the
    # next start serves under the name again (the message says so to people).
    returns_at_restart: str | None = None


class KeptLinear(msgspec.Struct, frozen=True, kw_only=True):
    """A linear the re-quantization left as it was served, and why."""

    layer: int
    linear: str
    action: str  # kept-unchanged | kept-quality
    reason: str


class TaskErrorChange(msgspec.Struct, frozen=True, kw_only=True):
    """A served task's mean relative error over the linears a job decided, on the weights
    served before it and on those served after."""

    task: str
    error_before: float
    error_after: float


# What redoes layers a task's job changed that are not served at its version (the status's
# `layers_not_served`): adding the task again with the same files and samples changes nothing
# (its Hessians are in the aggregate the job would measure from); they must leave it first.
REDO_NOT_SERVED = "remove the task and add it again with its calibration to redo them"


class TaskStatusReply(msgspec.Struct, frozen=True, kw_only=True, tag="task_status_reply"):
    request_id: str
    name: str
    phase: str  # serving | queued | requantizing | ready | failed
    layers_done: int
    layers_total: int
    version: int  # the quantization version its re-quantization produces (0: none)
    served_version: int  # the newest version any served layer carries
    layers_swapped: int  # layers served at `version` now (a later task's job replaces them layer by layer)
    kept: list[KeptLinear] = []
    message: str = ""  # why there is no re-quantization, or the error of a failed one
    forward_seconds: float = 0.0  # the requantizer's calibration forward + Hessians so far
    quantize_seconds: float = 0.0  # ... aggregation, GPTQ and the quality gate
    wall_seconds: float = 0.0  # job start (first dispatch) -> finish (or now)
    peak_rss_bytes: int = 0  # the requantizer's
    # Of the layers its job changed and finished: served at a later version (a later task's
    # job), and not served at its version (a swap that failed, or its committed file found
    # corrupt or missing at a restart: an older version or the checkpoint's layer serves;
    # REDO_NOT_SERVED says what redoes them).
    layers_superseded: int = 0
    layers_not_served: int = 0
    # What the job did to the tasks already served: how far the linears' aggregates moved
    # (median, max; re-quantized only above change_threshold) and each task's errors.
    aggregate_change_median: float = 0.0
    aggregate_change_max: float = 0.0
    change_threshold: float = 0.0
    task_errors: list[TaskErrorChange] = []


ServerReply = (
    HelloReply | TextChunk | GenerateDone | ErrorReply | TaskList | HealthReply | ServerStats | MetricsReply
    | AdminReply | TaskStatusReply
)

__all__ = [
    "CHAT_ROLES",
    "MAX_ADMIN_TOKEN_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "REDO_NOT_SERVED",
    "SHOWN_NAMES",
    "AddTask",
    "AdminReply",
    "Cancel",
    "ChatMessage",
    "ClientRequest",
    "ContextOverflow",
    "DEFAULT_MAX_FRAME_BYTES",
    "ErrorCode",
    "ErrorReply",
    "ExecutorInfo",
    "Generate",
    "GenerateDone",
    "GetMetrics",
    "GetStats",
    "Health",
    "HealthReply",
    "Hello",
    "HelloReply",
    "InFlightCounts",
    "KeptLinear",
    "ListTasks",
    "MetricsReply",
    "RemoveTask",
    "ReplacedConfigEntry",
    "RequantizerInfo",
    "ServerReply",
    "ServerStats",
    "TaskErrorChange",
    "TaskInfo",
    "TaskList",
    "TaskStatus",
    "TaskStatusReply",
    "TextChunk",
    "chat_template_role",
    "excerpt",
    "shown_names",
    "reply_id",
    "unknown_task_message",
]
