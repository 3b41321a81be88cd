"""Whether anything accepts connections at the server's ZeroMQ address: a plain connect
(TCP, or the ipc socket's Unix path), closed at once.

Needed because a ZeroMQ DEALER never says that nothing listens: connecting to a dead server
it retries in the background, and a hello sent meanwhile waits for its whole timeout. After
the coordinator was SIGKILLed, the front's next request waited min(request_timeout_s, 30 s)
for such a hello and got a 504; under `inlaid serve`, whose front exits once its coordinator
is gone, uvicorn cancelled that request after its 5-s graceful shutdown: a plain-text 500.
A refused connect answers within milliseconds on a reachable host (ECONNREFUSED, or no
socket file), so the front can answer 503 `unavailable` at once. A connect that neither
succeeds nor fails in time (a host that drops packets) proves nothing: the request then
waits for the hello as before.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any

PROBE_TIMEOUT_S = 1.0
_REFUSED = {errno.ECONNREFUSED, errno.ENOENT}  # a port nobody listens on; an ipc path with no socket


async def refuses_connections(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when every connect to `address` (tcp://HOST:PORT or ipc://PATH) is refused or
    finds no socket: no server is there. False when one connects, when the check runs out
    of time, or for an address it does not understand (then nothing is proven)."""
    try:
        async with asyncio.timeout(timeout_s):
            if address.startswith("ipc://"):
                path = address[len("ipc://"):]
                return _unix_refused("\0" + path[1:] if path.startswith("@") else path)
            if address.startswith("tcp://"):
                host, _, port = address[len("tcp://"):].rpartition(";")[2].rpartition(":")
                infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port),
                                                                     type=socket.SOCK_STREAM)
                # Every address the name has must refuse (localhost: ::1 and 127.0.0.1).
                for *_, sockaddr in infos:
                    if not await _refused(lambda: asyncio.open_connection(sockaddr[0], sockaddr[1])):
                        return False
                return bool(infos)
    except (TimeoutError, OSError, ValueError):  # no answer in time, a name that does not resolve, a bad port
        return False
    return False


def _unix_refused(path: str) -> bool:
    """A Unix socket's connect, non-blocking: it answers at once (refused, no such file,
    accepted, or a full backlog: someone listens). A plain socket, not the event loop's:
    uvloop refuses abstract names (`@name`) with EINVAL, which proves nothing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (BlockingIOError, InterruptedError):
            return False  # EAGAIN: a listener with a full backlog
        except OSError as error:
            if error.errno in _REFUSED:
                return True
            raise
    return False


async def _refused(connect: Callable[[], Awaitable[tuple[Any, asyncio.StreamWriter]]]) -> bool:
    """Whether `connect` (an open_*_connection) is refused; other failures raise."""
    try:
        _, writer = await connect()
    except OSError as error:
        if error.errno in _REFUSED:
            return True
        raise
    writer.close()
    return False
