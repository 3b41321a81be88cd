"""Inlaid client SDK: talks to `inlaid serve` over ZeroMQ. Imports no torch/transformers.

    from inlaid.client import Client
    with Client("tcp://127.0.0.1:5555") as client:
        print(client.generate("Hello", task="summarize", max_tokens=32).text)
        for chunk in client.stream("Tell me a story", max_tokens=64):
            print(chunk.text, end="", flush=True)
"""

from inlaid.client.async_client import AsyncClient, AsyncTokenStream
from inlaid.client.errors import (
    AdapterFailedError,
    ClientClosedError,
    ClientInUseError,
    ConnectionLostError,
    ContextLengthError,
    DeadlineExceededError,
    ExecutorFailedError,
    FrameTooLargeError,
    InlaidError,
    InvalidRequestError,
    MalformedRequestError,
    OverloadedError,
    ProtocolVersionError,
    RequestTimeoutError,
    ServerInternalError,
    ShuttingDownError,
    TaskBusyError,
    UnauthorizedError,
    UnknownMessageTypeError,
    UnknownTaskError,
)
from inlaid.client.messages import DEFAULT_ADDRESS, GenerateResult
from inlaid.client.sync_client import Client, TokenStream
from inlaid.protocol import SamplingParams, TextChunk

__all__ = [
    "DEFAULT_ADDRESS",
    "AdapterFailedError",
    "AsyncClient",
    "AsyncTokenStream",
    "Client",
    "ClientClosedError",
    "ClientInUseError",
    "ConnectionLostError",
    "ContextLengthError",
    "DeadlineExceededError",
    "ExecutorFailedError",
    "FrameTooLargeError",
    "GenerateResult",
    "InlaidError",
    "InvalidRequestError",
    "MalformedRequestError",
    "OverloadedError",
    "ProtocolVersionError",
    "RequestTimeoutError",
    "SamplingParams",
    "ServerInternalError",
    "ShuttingDownError",
    "TaskBusyError",
    "TextChunk",
    "TokenStream",
    "UnauthorizedError",
    "UnknownMessageTypeError",
    "UnknownTaskError",
]
