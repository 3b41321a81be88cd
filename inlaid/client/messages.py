"""What both clients share: request construction, reply decoding, request ids."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from inlaid.client.errors import InlaidError, InvalidRequestError, ProtocolVersionError, error_from_reply
from inlaid.protocol import (
    PROTOCOL_VERSION,
    ChatMessage,
    ErrorReply,
    Generate,
    GenerateDone,
    Hello,
    HelloReply,
    SamplingParams,
    ServerReply,
)

DEFAULT_ADDRESS = os.environ.get("INLAID_ADDRESS", "tcp://127.0.0.1:5555")


def checked_address(address: str) -> str:
    """`address` if the server can listen there; ValueError otherwise (ZeroMQ's own word for
    an http:// address is "Protocol not supported", which names neither the field nor the fix)."""
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ValueError(f"the server address must be tcp://HOST:PORT or ipc://PATH (server.address in its "
                         f"config), got {address!r}")
    return address

# A finished generation and one streamed piece of it, as the server sends them.
GenerateResult = GenerateDone

_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(ServerReply)


def encode(message: msgspec.Struct) -> bytes:
    """The message's frame. A number msgpack cannot carry (an integer outside the signed and
    unsigned 64-bit ranges) is the caller's mistake: InvalidRequestError, nothing sent."""
    try:
        return _encoder.encode(message)
    except OverflowError as error:
        raise InvalidRequestError(f"a number in the request is out of range: {error}",
                                  getattr(message, "request_id", "")) from None


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
    messages: Sequence[dict[str, str] | ChatMessage] | None,
    prompt_token_ids: Sequence[int] | None,
    sampling: SamplingParams | None,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: Iterable[str],
    stop_token_ids: Iterable[int],
    ignore_eos: bool,
    stream: bool,
    deadline_s: float | None,
) -> Generate:
    if sampling is None:
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
        )
    chat = None
    if messages is not None:
        chat = [m if isinstance(m, ChatMessage) else ChatMessage(str(m["role"]), str(m["content"])) for m in messages]
    return Generate(
        request_id=request_id,
        task=task,
        prompt=prompt,
        messages=chat,
        prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None,
        sampling=sampling,
        stream=stream,
        deadline_s=deadline_s,
    )


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


def expect(reply: ServerReply, kind: type[Any]) -> Any:
    if isinstance(reply, ErrorReply):
        raise error_from_reply(reply)
    if not isinstance(reply, kind):
        raise InlaidError(f"expected {kind.__name__}, got {type(reply).__name__}", getattr(reply, "request_id", ""))
    return reply
