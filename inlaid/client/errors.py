"""Typed errors of the client SDK: one class per server error code, plus client-side ones."""

from __future__ import annotations

from inlaid.protocol import ErrorCode, ErrorReply


class InlaidError(Exception):
    """Base of every error the SDK raises. `code` is the server's error code when it sent one;
    `reply` the server's ErrorReply itself (None for the SDK's own errors): its optional facts
    (`field`, `in_flight`, `context_overflow`) are for programs, `message` for people."""

    code: str = "client"

    def __init__(self, message: str, request_id: str = "", *, reply: ErrorReply | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.reply = reply


class MalformedRequestError(InlaidError):
    code = ErrorCode.MALFORMED


class UnknownMessageTypeError(MalformedRequestError):
    code = ErrorCode.UNKNOWN_MESSAGE


class FrameTooLargeError(MalformedRequestError):
    code = ErrorCode.FRAME_TOO_LARGE


class ProtocolVersionError(InlaidError):
    code = ErrorCode.PROTOCOL_VERSION


class InvalidRequestError(InlaidError):
    code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, request_id: str = "", param: str | None = None, *,
                 reply: ErrorReply | None = None) -> None:
        super().__init__(message, request_id, reply=reply)
        # The argument at fault (the HTTP front names it in its error body): the one the SDK
        # refused before sending, or the field the server's refusal names.
        self.param = param if param is not None or reply is None else reply.field


class UnknownTaskError(InvalidRequestError):
    code = ErrorCode.UNKNOWN_TASK


class ContextLengthError(InvalidRequestError):
    code = ErrorCode.CONTEXT_LENGTH


class OverloadedError(InlaidError):
    """The server's queue is full; retry later (with backoff)."""

    code = ErrorCode.OVERLOADED


class UnauthorizedError(InlaidError):
    code = ErrorCode.UNAUTHORIZED


class TaskBusyError(InlaidError):
    code = ErrorCode.TASK_BUSY


class DeadlineExceededError(InlaidError):
    code = ErrorCode.DEADLINE_EXCEEDED


class ExecutorFailedError(InlaidError):
    """The executor running this request crashed or failed; the server restarts it."""

    code = ErrorCode.EXECUTOR_FAILED


class AdapterFailedError(InlaidError):
    """The task's adapter could not be loaded on the executor (its files changed or broke
    after it was added); other requests are unaffected. Ask the admin to re-add the task."""

    code = ErrorCode.ADAPTER_FAILED


class ShuttingDownError(InlaidError):
    code = ErrorCode.SHUTTING_DOWN


class ServerInternalError(InlaidError):
    code = ErrorCode.INTERNAL


class RequestTimeoutError(InlaidError, TimeoutError):
    """No (complete) answer within the client's timeout. The server may be down."""

    code = "timeout"


class ClientClosedError(InlaidError):
    code = "closed"


class ClientInUseError(InlaidError):
    """A sync Client's call while another thread's call runs on it (one socket, one thread at a time)."""

    code = "in_use"


class ConnectionLostError(InlaidError, ConnectionError):
    """The connection to the server broke while this request waited (the server was killed,
    crashed, restarted, or its host stopped answering heartbeats). Raised at once, not after
    the timeout. The request may or may not have run; a later call reconnects by itself."""

    code = "connection_lost"


_BY_CODE: dict[str, type[InlaidError]] = {
    cls.code: cls
    for cls in (
        MalformedRequestError,
        UnknownMessageTypeError,
        FrameTooLargeError,
        ProtocolVersionError,
        InvalidRequestError,
        UnknownTaskError,
        ContextLengthError,
        OverloadedError,
        UnauthorizedError,
        TaskBusyError,
        DeadlineExceededError,
        ExecutorFailedError,
        AdapterFailedError,
        ShuttingDownError,
        ServerInternalError,
    )
}


def error_from_reply(reply: ErrorReply) -> InlaidError:
    cls = _BY_CODE.get(reply.code, InlaidError)
    error = cls(f"[{reply.code}] {reply.message}", reply.request_id, reply=reply)
    if cls is InlaidError:
        error.code = reply.code
    return error
