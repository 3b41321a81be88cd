"""Every error the front answers, in OpenAI's error JSON with the matching HTTP status.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`: the official
clients read `message` and raise by status (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 409 ConflictError, 429 RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

import re

import msgspec

from inlaid.client import InlaidError, InvalidRequestError
from inlaid.http.schema import ErrorBody, ErrorResponse
from inlaid.protocol import SHOWN_NAMES, ContextOverflow, ErrorCode, shown_names

# Inlaid's error code -> (HTTP status, OpenAI error type, the `code` the body carries).
_BY_CODE: dict[str, tuple[int, str, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error", "invalid_request"),
    ErrorCode.MALFORMED: (400, "invalid_request_error", "malformed"),
    ErrorCode.UNKNOWN_MESSAGE: (400, "invalid_request_error", "malformed"),
    ErrorCode.CONTEXT_LENGTH: (400, "invalid_request_error", "context_length_exceeded"),  # OpenAI's code
    ErrorCode.UNKNOWN_TASK: (404, "invalid_request_error", "model_not_found"),  # OpenAI's code
    ErrorCode.FRAME_TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    ErrorCode.UNAUTHORIZED: (401, "authentication_error", "unauthorized"),
    ErrorCode.TASK_BUSY: (409, "conflict_error", "task_busy"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
    ErrorCode.EXECUTOR_FAILED: (500, "server_error", "executor_failed"),
    ErrorCode.INTERNAL: (500, "server_error", "internal"),
    ErrorCode.PROTOCOL_VERSION: (502, "server_error", "protocol_version"),
    ErrorCode.SHUTTING_DOWN: (503, "server_error", "shutting_down"),
    "timeout": (504, "server_error", "timeout"),  # the SDK's: the server did not answer in time
    "closed": (503, "server_error", "unavailable"),
    "connection_lost": (503, "server_error", "unavailable"),  # the SDK's: the server went away mid-request
}
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                   405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}
# Statuses a client should retry after a pause (the official clients honour Retry-After).
_RETRY_AFTER_S = {429: 1, 503: 1}
_SERVER_PREFIX = re.compile(r"^\[[a-z_]+\] ")  # the SDK prefixes the code; the body has it apart
_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`")
_MISSING_FIELD = re.compile(r"^Object missing required field `([^`]*)`")
# msgspec names no key of a dict in its paths ("$.metadata[...]"), and the type it got.
_ANY_KEY = "[...]"
_GOT_TYPE = re.compile(r", got `([a-z]+)`")
_MSGSPEC_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "array"), (dict, "object"),
    (type(None), "null"))  # bool before int: a bool is an int to isinstance
# The generate fields the server may name as at fault (ErrorReply.field) that the client sent
# under the same name; the prompt fields and max_tokens are the caller's (`prompt_param`,
# `max_tokens_param`); others (request_id, deadline_s) are the front's own, never the client's.
_SAMPLING_PARAMS = frozenset({"temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos"})
_PROMPT_FIELDS = frozenset({"prompt", "prompt_token_ids", "messages"})
# Only for a refusal that names no field (one the server's checks make past admission, or a
# server older than ErrorReply.field): its words then are all there is to go by.
_SAMPLING_FIELD = re.compile(r"^(max_tokens|temperature|top_p|top_k|stop_token_ids|stop|seed)\b")
_PROMPT_PROBLEM = re.compile(r"^(the prompt|prompt token ids)\b")
# The server's frame refusal (serve/frames.py), in its own terms.
_FRAME_SIZES = re.compile(r"^frame of (\d+) bytes; the limit is (\d+)")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorResponse(error=ErrorBody(message=self.message, type=self.type,
                                                                 param=self.param, code=self.code)))

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.status in _RETRY_AFTER_S:
            headers["Retry-After"] = str(_RETRY_AFTER_S[self.status])
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_request", param=param)


_SHOWN_COUNT = re.compile(r", \.\.\. \((\d+) in all\)$")  # protocol.shown_names' tail


def model_not_found(model: str, base_model: str | None, tasks: list[str], total: int | None = None) -> ApiError:
    """The 404 for an unknown `model`, one wording wherever a model is named (generation,
    `/v1/models/{id}`): the server's model ids, the base model first, the first SHOWN_NAMES
    and the count past them. `total`: how many tasks there are when `tasks` lists only the
    first ones (the server's reply gives its first SHOWN_NAMES)."""
    known = ([f"`{base_model}` (the base model)"] if base_model else []) + [f"`{task}`" for task in sorted(tasks)]
    count = len(known) - len(tasks) + max(total or 0, len(tasks))
    if count <= SHOWN_NAMES and count == len(known):
        listed = shown_names(known)
    else:
        listed = f"{', '.join(known[:SHOWN_NAMES])}, ... ({count} in all); GET /v1/models lists every one"
    return ApiError(404, f"The model `{model}` does not exist; this server has: {listed}.",
                    code="model_not_found", param="model")


def from_inlaid(error: InlaidError, model: str | None = None, *, not_found_param: str | None = None,
                prompt_param: str | None = None, base_model: str | None = None,
                max_tokens_param: str = "max_tokens") -> ApiError:
    """The HTTP form of an SDK error (the server's typed reply, or the SDK's own). A 404 names
    `model` for a generation request (`model` given; `base_model`, also a valid model, is
    named in its message), else `not_found_param` (`lora_name`); a refused prompt names
    `prompt_param` (`prompt`, `prompt[i]` for one of several, or `messages` for chat)."""
    status, kind, code = _BY_CODE.get(error.code, (500, "server_error", error.code))
    message = _SERVER_PREFIX.sub("", error.message)
    if error.code == "timeout":  # the SDK's message names the server's internal address: not the client's business
        message = "the server did not answer within http.request_timeout_s; the request was cancelled"
    elif error.code == "closed":  # the SDK's words ("the client was closed") read as the caller's own client
        message = "the HTTP front is shutting down (its connection to the server closed before the answer came); retry"
    if error.code == ErrorCode.UNKNOWN_TASK and model is not None:
        # Said again in the API's terms, with the server's tasks: from the reply's list, or
        # (a server older than ErrorReply.known_tasks) its words "...; this server has: a, b".
        total = None
        if error.reply is not None and error.reply.known_tasks is not None:
            tasks, total = list(error.reply.known_tasks), error.reply.known_tasks_total
        else:
            _, _, known = message.partition("; this server has: ")
            if cut := _SHOWN_COUNT.search(known):  # "a, b, ... (25 in all)": the first names and the count
                known, total = known[:cut.start()], int(cut.group(1))
            tasks = [] if known in ("", "none") else known.split(", ")
        message = model_not_found(model, base_model or None, tasks, total).message
    param = ("model" if model is not None else not_found_param) if status == 404 else None
    if error.code == ErrorCode.FRAME_TOO_LARGE:
        message = _frame_message(message)
        param = prompt_param
    elif error.code in (ErrorCode.CONTEXT_LENGTH, ErrorCode.INVALID_REQUEST):
        field = error.param if isinstance(error, InvalidRequestError) else None
        if error.code == ErrorCode.CONTEXT_LENGTH:  # OpenAI's param for it, whichever number is too large
            param = prompt_param
        elif field is None:
            param = _param_from_words(message, prompt_param, max_tokens_param)
        else:
            param = _request_param(field, prompt_param, max_tokens_param)
        overflow = error.reply.context_overflow if error.reply is not None else None
        if field == "max_tokens" and overflow is not None and overflow.max_tokens is not None:
            # Said in the client's terms: the server knows one name for the limit, the client
            # may have sent another (chat's max_completion_tokens).
            message = _max_tokens_overflow(overflow, overflow.max_tokens, max_tokens_param)
    return ApiError(status, message, code=code, type=kind, param=param)


def _request_param(field: str, prompt_param: str | None, max_tokens_param: str) -> str | None:
    """The HTTP request's parameter for the generate field a refusal names."""
    if field in _PROMPT_FIELDS:
        return prompt_param
    if field == "max_tokens":
        return max_tokens_param
    return field if field in _SAMPLING_PARAMS else None


def _param_from_words(message: str, prompt_param: str | None, max_tokens_param: str) -> str | None:
    """A field-less refusal's parameter, as far as its words tell."""
    if field := _SAMPLING_FIELD.match(message):
        return _request_param(field.group(1), prompt_param, max_tokens_param)
    if _PROMPT_PROBLEM.match(message):
        return prompt_param
    if message.startswith("task name"):  # check_task_name's refusals (an adapter's name) name no field
        return "lora_name"
    return None


def _max_tokens_overflow(overflow: ContextOverflow, max_tokens: int, max_tokens_param: str) -> str:
    room = overflow.context_length - overflow.prompt_tokens
    return (f"the context length is {overflow.context_length} tokens, but {overflow.prompt_tokens + max_tokens} were "
            f"requested ({overflow.prompt_tokens} in the prompt, {max_tokens_param} {max_tokens}): lower "
            f"{max_tokens_param} to at most {room}, or give none (null) to generate until the context is full")


def _frame_message(server_message: str) -> str:
    """The server's "frame of N bytes; the limit is M" as the client can act on it: its body
    passed the front's limit, but the message it became exceeds the server's."""
    sizes = _FRAME_SIZES.match(server_message)
    size = f"{sizes.group(1)} bytes, over" if sizes else "over"
    limit = f" of {sizes.group(2)} bytes" if sizes else ""
    return (f"the request is too large for the server: its message to the server is {size} the server's limit"
            f"{limit} (server.max_frame_bytes); send a shorter prompt, or ask the server's operator to raise "
            "server.max_frame_bytes")


def from_decode_error(error: msgspec.MsgspecError, body: bytes | None = None) -> ApiError:
    """A body msgspec could not decode into the request's Struct; `body`, where given, names
    the key of a dict value at fault (msgspec's path says only `[...]`)."""
    text = str(error)
    if isinstance(error, msgspec.DecodeError) and not isinstance(error, msgspec.ValidationError):
        return bad_request(f"The request body is not valid JSON: {text}")
    found = _MSGSPEC_PATH.search(text)
    path = found.group(1) if found and found.group(1) else None
    if path is not None and _ANY_KEY in path:
        path, keyed = _with_dict_key(path, text, body)
        where = f" - at `$.{path}`" if keyed else f" - at a value of `$.{path}`"
        text = _MSGSPEC_PATH.sub(lambda _: where, text)  # a function: a key's backslashes stay as they are
    missing = _MISSING_FIELD.match(text)
    if missing:
        name = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return bad_request(text, param=name)
    unknown = _UNKNOWN_FIELD.match(text)
    if unknown:
        name = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return bad_request(f"Unrecognized request argument supplied: {name}", param=name)
    return bad_request(text, param=path)


def _with_dict_key(path: str, text: str, body: bytes | None) -> tuple[str, bool]:
    """`path` (as "metadata[...]") with msgspec's placeholder replaced by the key at fault: the
    first in the body whose value has the type msgspec got; and whether it was. Where that is
    not to be found (a placeholder below a top-level field's dict, no body), the dict's path."""
    head, _, rest = path.partition(_ANY_KEY)
    got = _GOT_TYPE.search(text)
    if rest or got is None or body is None or not head.isidentifier():
        return head, False
    try:
        value = msgspec.json.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return head, False
    mapping = value.get(head) if isinstance(value, dict) else None
    for key, item in (mapping.items() if isinstance(mapping, dict) else ()):
        if _msgspec_type_name(item) == got.group(1):
            return (f"{head}.{key}" if key.isidentifier() else f"{head}[{msgspec.json.encode(key).decode()}]"), True
    return head, False


def _msgspec_type_name(value: object) -> str | None:
    return next((name for kind, name in _MSGSPEC_TYPE_NAMES if isinstance(value, kind)), None)
