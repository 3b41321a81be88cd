"""The form of a ZeroMQ address: one rule for where a server listens (server.address,
server.executor_address) and where a client looks for it (the SDK, `inlaid client
--address`). A port ZeroMQ wraps (99999 listened on 34463) or refuses (0) made a client
wait its whole timeout, then say "no answer". Imports nothing beyond the standard library."""

from __future__ import annotations

IPC_PATH_BYTES = 107  # sockaddr_un.sun_path on Linux, less its terminating NUL


def address_problem(name: str, address: str, connect: bool = False) -> str | None:
    """What is wrong with `address` (called `name` in the message), or None: ipc://PATH with
    a path a socket can have, or tcp://HOST:PORT with an ASCII port in 1-65535 and no IPv6
    host (ZeroMQ sockets take IPv6 only with an option these never set). `connect`: a client's
    address, which names one host (a wildcard is where a server listens)."""
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        if not path or len(path.encode()) > IPC_PATH_BYTES:
            return f"{name} {address!r}: an ipc path must have 1-{IPC_PATH_BYTES} bytes"
        return None
    if not address.startswith("tcp://"):
        return f"{name} must start with tcp:// or ipc://, got {address!r}"
    host, _, port = address[len("tcp://"):].rpartition(":")
    # ASCII digits: "²" and "٢٩" are digits to Python (int() takes the second), not to ZeroMQ
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return f"{name} {address!r} must be tcp://HOST:PORT with a port in 1-65535"
    if host.startswith("[") or (":" in host and ";" not in host):  # tcp://:::5555 failed at bind; SRC:P;DST: a
        # ZeroMQ source endpoint
        return f"{name} {address!r}: IPv6 addresses are not supported here; use tcp://127.0.0.1:{port}"
    if connect and "*" in host:  # ZeroMQ's "Invalid argument"
        return (f"{name} {address!r}: a client connects to one host; tcp://*:PORT is how a server listens on every "
                "interface: use tcp://127.0.0.1:PORT or the server's host name")
    return None


def local_address(address: str) -> str:
    """Where a client on this machine reaches a server listening at `address`: a wildcard host
    (tcp://*:PORT, tcp://0.0.0.0:PORT: every interface) as loopback, which a client can
    connect to (ZeroMQ refuses to connect to "*"); any other address as it is."""
    if not address.startswith("tcp://"):
        return address
    host, _, port = address[len("tcp://"):].rpartition(":")
    return f"tcp://127.0.0.1:{port}" if host in ("*", "0.0.0.0") else address
