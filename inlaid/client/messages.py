"""What both clients share: request construction, reply decoding, request ids."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

import msgspec

from inlaid.addresses import address_problem
from inlaid.client.arguments import (
    ChatMessageArg,
    checked_path,
    checked_seconds,
    checked_stop,
    checked_text,
    checked_token_ids,
    chat_messages,
    checked_deadline,
    checked_sampling_forms,
    type_name,
)
from inlaid.client.errors import (
    FrameTooLargeError, InlaidError, InvalidRequestError, ProtocolVersionError, error_from_reply,
)
from inlaid.protocol import (
    PROTOCOL_VERSION,
    AddTask,
    ErrorCode,
    ErrorReply,
    Generate,
    GenerateDone,
    Hello,
    HelloReply,
    RemoveTask,
    SamplingParams,
    ServerReply,
    TaskStatus,
    TextChunk,
)

DEFAULT_ADDRESS = os.environ.get("INLAID_ADDRESS", "tcp://127.0.0.1:5555")
TaskCall = TypeVar("TaskCall", TaskStatus, RemoveTask)


def checked_address(address: str, name: str = "the server address") -> str:
    """`address` if the server can listen there; ValueError otherwise, calling it `name` (a
    command line names its option). ZeroMQ's own word for an http:// address is "Protocol not
    supported", which names neither the field nor the fix; a port outside 1-65535 waited the
    whole timeout, then said "no answer"."""
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ValueError(f"{name} must be tcp://HOST:PORT or ipc://PATH (server.address in its "
                         f"config), got {address!r}")
    if problem := address_problem(name, address, connect=True):
        raise ValueError(problem)
    return address


# A finished generation and one streamed piece of it, as the server sends them.
GenerateResult = GenerateDone

_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(ServerReply)


def encode(message: msgspec.Struct) -> bytes:
    """The message's frame. A value msgpack cannot carry (an integer outside the signed and
    unsigned 64-bit ranges, a lone surrogate, an object) is the caller's mistake:
    InvalidRequestError, nothing sent."""
    request_id = getattr(message, "request_id", "")
    try:
        return _encoder.encode(message)
    except OverflowError as error:
        param = _out_of_range_field(message)
        what = f"a number in {param}" if param else "a number in the request"
        raise InvalidRequestError(f"{what} is out of range: {error}", request_id, param) from None
    except UnicodeEncodeError as error:  # generate's texts are checked by name before; this is any other string
        raise InvalidRequestError(f"a string in the request is not valid text: {error}", request_id) from None
    except TypeError as error:  # a value of a type msgpack has no form for: "Encoding objects of type X ..."
        raise InvalidRequestError(f"a value in the request cannot be sent: {error}", request_id) from None


def checked_frame_size(frame: bytes, server: HelloReply | None, request_id: str) -> bytes:
    """`frame` (of request `request_id`), unless the server's hello says it is over the server's
    frame limit: then FrameTooLargeError, as the server would answer, before anything is sent. Sent, a frame
    far over the limit (ZeroMQ's MAXMSGSIZE on the server) makes ZeroMQ drop the connection,
    and every other request on it failed with ConnectionLostError. No hello held, or a server
    too old to tell its limit: the server judges."""
    limit = server.max_frame_bytes if server is not None else None
    if limit is None or len(frame) <= limit:
        return frame
    # The server's own words, so that a reader of its message (the HTTP front's 413) reads this one alike.
    raise FrameTooLargeError(f"[{ErrorCode.FRAME_TOO_LARGE}] frame of {len(frame)} bytes; the limit is {limit} "
                             "(server.max_frame_bytes; refused by the client before sending)", request_id)


MSGPACK_INTEGERS = range(-(2**63), 2**64)


def _out_of_range_field(message: msgspec.Struct) -> str | None:
    """The field (a top-level one, or one of `sampling`'s, named as the SDK's argument) whose
    integer, or one of whose list's integers, msgpack cannot carry; None: not found."""
    for struct in (message, getattr(message, "sampling", None)):
        if not isinstance(struct, msgspec.Struct):
            continue
        for name in struct.__struct_fields__:
            value = getattr(struct, name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, int) and not isinstance(v, bool) and v not in MSGPACK_INTEGERS for v in values):
                return name
    return None


def decode_reply(frame: bytes) -> ServerReply | None:
    """A server reply, or None for a frame this client cannot read (dropped, not fatal)."""
    try:
        return _reply_decoder.decode(frame)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None


class RequestIds:
    """Ids unique per client connection: a random prefix keeps clients of one process apart."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:8]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


def build_generate(
    request_id: str,
    *,
    prompt: str | None,
    task: str | None,
    messages: Iterable[ChatMessageArg] | None,
    prompt_token_ids: Iterable[int] | None,
    sampling: SamplingParams | None,
    max_tokens: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: str | Iterable[str] | None,
    stop_token_ids: Iterable[int] | None,
    ignore_eos: bool,
    stream: bool,
    deadline_s: float | None,
) -> Generate:
    """The Generate both clients send. Its arguments' forms are checked here, before anything
    is sent (InvalidRequestError naming the argument); the sampling values themselves are the
    server's to judge, as for a request through the HTTP front."""
    try:
        keywords = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        stop=checked_stop(stop), stop_token_ids=checked_token_ids(stop_token_ids, "stop_token_ids"),
                        ignore_eos=ignore_eos)
        if sampling is None:
            sampling = SamplingParams(**keywords)
        elif not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be an inlaid.protocol.SamplingParams or None, "
                                      f"got {type_name(sampling)}", param="sampling")
        else:
            _refuse_both_forms(keywords)
        sampling = checked_sampling_forms(msgspec.structs.replace(
            sampling, stop=checked_stop(sampling.stop),
            stop_token_ids=checked_token_ids(sampling.stop_token_ids, "stop_token_ids")))
        return Generate(
            request_id=request_id,
            task=None if task is None else checked_text(task, "task"),
            prompt=None if prompt is None else checked_text(prompt, "prompt"),
            messages=None if messages is None else chat_messages(messages),
            prompt_token_ids=None if prompt_token_ids is None else checked_token_ids(prompt_token_ids,
                                                                                     "prompt_token_ids"),
            sampling=sampling,
            stream=stream,
            deadline_s=checked_deadline(deadline_s),
        )
    except InvalidRequestError as error:
        error.request_id = request_id
        raise


# The keyword arguments' defaults in Client/AsyncClient.generate and .stream, the two lists as
# checked_stop / checked_token_ids return "none".
_KEYWORD_DEFAULTS: dict[str, Any] = dict(max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                                         stop=[], stop_token_ids=[], ignore_eos=False)


def _refuse_both_forms(keywords: dict[str, Any]) -> None:
    """A `sampling=` struct and sampling keywords together: one would silently win."""
    given = [name for name, value in keywords.items() if value != _KEYWORD_DEFAULTS[name]]
    if given:
        raise InvalidRequestError(
            f"sampling values come either as sampling=SamplingParams(...) or as keyword arguments, not both "
            f"(sampling= was passed with {', '.join(f'{name}={keywords[name]!r}' for name in given)})",
            param="sampling")


def build_add_task(request_id: str, name: str, adapter_dir: str | os.PathLike[str],
                   calibration_jsonl: str | os.PathLike[str] | None, token: str | None) -> AddTask:
    """The AddTask both clients send; paths may be `pathlib.Path`s."""
    try:
        return AddTask(request_id=request_id, name=checked_text(name, "name"),
                       adapter_dir=checked_path(adapter_dir, "adapter_dir"),
                       calibration_jsonl=checked_path(calibration_jsonl, "calibration_jsonl") if calibration_jsonl else "",
                       token=token or "")
    except InvalidRequestError as error:
        error.request_id = request_id
        raise


def build_task_call(kind: type[TaskCall], request_id: str, name: str, token: str | None) -> TaskCall:
    """The TaskStatus or RemoveTask both clients send, `name` checked as build_add_task's (sent
    unchecked, a number came back as the server's "malformed frame", param unset)."""
    try:
        return kind(request_id=request_id, name=checked_text(name, "name"), token=token or "")
    except InvalidRequestError as error:
        error.request_id = request_id
        raise


def call_timeout(timeout_s: float | None, default_s: float) -> float:
    """How long a call waits: its own `timeout_s`, else the client's. Checked before anything
    is sent; 0 no longer stands for the default (it was `timeout_s or default`)."""
    return default_s if timeout_s is None else checked_seconds(timeout_s, "timeout_s")


def hello(request_id: str, client_name: str) -> Hello:
    return Hello(request_id=request_id, protocol_version=PROTOCOL_VERSION, client=client_name)


def check_hello(reply: ServerReply) -> HelloReply:
    if isinstance(reply, ErrorReply):
        raise error_from_reply(reply)
    if not isinstance(reply, HelloReply):
        raise InlaidError(f"expected a hello reply, got {type(reply).__name__}")
    if reply.protocol_version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"server speaks protocol {reply.protocol_version}, this client {PROTOCOL_VERSION}", reply.request_id
        )
    return reply


def stream_reply(reply: ServerReply, request_id: str) -> TextChunk | GenerateDone:
    """A stream's next reply, for both clients' streams: a chunk, or its end; raises what
    else ended it (the server's error, or a reply no stream carries)."""
    if isinstance(reply, (TextChunk, GenerateDone)):
        return reply
    if isinstance(reply, ErrorReply):
        raise error_from_reply(reply)
    raise InlaidError(f"unexpected {type(reply).__name__} in a stream", request_id)


def second_iterator_error(request_id: str, *, left_early: bool, asynchronous: bool) -> InlaidError:
    """Why a stream refuses a second iterator. Leaving a loop cancels the request, and a
    dropped `iter(stream)` is a loop left: `next(iter(stream))` and then `list(stream)` read
    nothing and said nothing (sync), or waited the whole timeout and said "no answer" (async),
    an outside probe. One iterator per stream keeps both the cancel and the peek."""
    keep = ("chunks = aiter(stream); first = await anext(chunks); rest = [c async for c in chunks]" if asynchronous
            else "chunks = iter(stream); first = next(chunks); rest = list(chunks)")
    why = ("its request was cancelled when an earlier loop over it was left before the end, or by close()"
           if left_early else "another loop over it is still open")
    return InlaidError(f"this stream cannot be read again: {why}; a stream has one iterator: to read a first "
                       f"chunk and then the rest, keep it ({keep})", request_id)


def expect(reply: ServerReply, kind: type[Any]) -> Any:
    if isinstance(reply, ErrorReply):
        raise error_from_reply(reply)
    if not isinstance(reply, kind):
        raise InlaidError(f"expected {kind.__name__}, got {type(reply).__name__}", getattr(reply, "request_id", ""))
    return reply
