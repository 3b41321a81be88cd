"""`inlaid http`: run the OpenAI-compatible front alone, in front of a running server.

    inlaid http --address tcp://127.0.0.1:5555 --port 8000
    inlaid http --config server.toml          # the server's address and its [http] section

`inlaid serve` starts the same process itself when its config has an `[http]` section.
The front holds no model and imports no torch: one uvicorn server, one SDK client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from inlaid.http.settings import DEFAULT_MAX_BODY_BYTES, HttpConfig

if TYPE_CHECKING:
    import uvicorn

    from inlaid.http.front_metrics import HttpMetrics

log = logging.getLogger("inlaid.http")

_PARENT_POLL_S = 0.5
_GRACEFUL_SHUTDOWN_S = 5  # open streams get this long after SIGTERM
_REPEAT_INTERVAL_S = 10.0  # uvicorn's warnings: one of each message per this long (logs.RepeatLimit)
_ANSWER_S = 1.0  # of which the last second answers what is still open (503): `_answer_before_the_grace_ends`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="a server TOML: take server.address and [http] from it")
    parser.add_argument("--address", default=None, help="the server's ZeroMQ address (default: $INLAID_ADDRESS "
                        "or tcp://127.0.0.1:5555)")
    parser.add_argument("--host", default=None, help=f"listen host (default {HttpConfig.host})")
    parser.add_argument("--port", type=int, default=None, help=f"listen port (default {HttpConfig.port})")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help=f"seconds one generate may take (default {HttpConfig.request_timeout_s:g})")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help=f"larger request bodies are refused (413; default {DEFAULT_MAX_BODY_BYTES}, what the "
                        "server's default frame limit carries)")
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="prompts one /v1/completions request may list (default 16); more are refused (400)")
    parser.add_argument("--client-send-timeout", type=float, default=None,
                        help=f"seconds a client may take to send a request's head, and again its body (408; default "
                        f"{HttpConfig.client_send_timeout_s:g})")
    parser.add_argument("--allow-public-bind", action="store_true", help="allow a non-loopback listen host")
    parser.add_argument("--log-level", default="INFO", help="default INFO")
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    # Set by `inlaid serve`: a socket it bound and listens on; the pid to outlive no longer.
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> tuple[str, HttpConfig]:
    """(server address, front settings); ValueError for bad values."""
    from inlaid.addresses import local_address
    from inlaid.client.messages import DEFAULT_ADDRESS, checked_address

    address, config, allow_public = DEFAULT_ADDRESS, HttpConfig(), args.allow_public_bind
    max_frame_bytes: int | None = None  # the server's, when its config is at hand
    max_pending: int | None = None
    if args.config:
        server, explicit_prompts = _server_config(args.config)
        # the server's listening address as this machine reaches it (tcp://*:PORT: over loopback)
        address, config = local_address(server.address), server.http or HttpConfig()
        allow_public = allow_public or server.allow_public_bind
        max_frame_bytes = server.limits.max_frame_bytes
        max_pending = server.limits.max_pending_requests
        if not explicit_prompts:  # derived again below, against the front's share of the server's limit
            config.max_prompts_per_request = None
    overrides = {"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout,
                 "max_body_bytes": args.max_body_bytes, "max_prompts_per_request": args.max_prompts,
                 "client_send_timeout_s": args.client_send_timeout}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    # the config's key where a config is read, else the command line's switch
    config.validate(allow_public, how_to_allow="set server.allow_public_bind = true" if args.config
                    else "pass --allow-public-bind")
    if max_frame_bytes is not None:  # again: --max-body-bytes may have raised the config's value
        config.fit_to_frames(max_frame_bytes)
    if max_pending is not None:  # again: --max-prompts may have raised it
        config.fit_to_pending_requests(max_pending)
    if args.address:  # named: "the server address must be ..." did not say which option
        checked_address(args.address, "--address")
    return args.address or address, config


def _server_config(path: str) -> tuple[Any, bool]:
    """The server config at `path` read without its admin token (the front holds none: it
    passes each caller's Bearer token on); and whether it sets http.max_prompts_per_request
    itself."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.config_parsing import read_toml, without_admin_token

    raw, base_dir = read_toml(path)
    http = raw.get("http")
    return (config_from_dict(without_admin_token(raw), base_dir=base_dir),
            isinstance(http, dict) and "max_prompts_per_request" in http)


def run(args: argparse.Namespace) -> int:
    from inlaid.serve.logs import setup_logging

    try:
        from inlaid.serve.config_parsing import check_log_level

        check_log_level("--log-level", args.log_level.upper())  # logging's own refusal names no option
        address, config = settings_from_args(args)
    except ValueError as error:
        print(f"inlaid http: {error}", file=sys.stderr)
        return 2
    listening: list[socket.socket] | None = None
    if args.listen_fd is None:  # alone: bound here, so that a port in use fails the start with one line
        from inlaid.http.process import listening_sockets

        try:
            listening = listening_sockets(config.host, config.port)
        except OSError as error:
            print(f"inlaid http: cannot listen on {config.host}:{config.port}: {error.strerror or error}",
                  file=sys.stderr)
            return 2
    setup_logging(args.log_level.upper(), args.log_format)
    logging.getLogger("uvicorn").handlers[:] = logging.getLogger("inlaid").handlers
    logging.getLogger("uvicorn").propagate = False
    try:
        import uvloop
    except ImportError:  # optional (the `serve` extra); plain asyncio works, slower
        return asyncio.run(serve(address, config, args.listen_fd, args.parent_pid, listening))
    return uvloop.run(serve(address, config, args.listen_fd, args.parent_pid, listening))


def uvicorn_config(app: HttpMetrics, config: HttpConfig) -> uvicorn.Config:
    """The front's uvicorn settings for `app` (create_app's): its protocol bounds each request
    head's time and size, and counts the heads it refuses in the app's metrics; uvicorn's
    warnings are limited to one of each message per _REPEAT_INTERVAL_S."""
    import uvicorn

    from inlaid.http.slow_clients import head_deadline_protocol
    from inlaid.serve.logs import RepeatLimit

    # One line per malformed connection, or per head over the limit, else (unauthenticated floods)
    for name in ("uvicorn.error", "inlaid.http.slow_clients"):
        logger = logging.getLogger(name)
        if not any(isinstance(each, RepeatLimit) for each in logger.filters):
            logger.addFilter(RepeatLimit(_REPEAT_INTERVAL_S))
    return uvicorn.Config(
        app, host=config.host, port=config.port,
        http=head_deadline_protocol(config.client_send_timeout_s, count_refusal=app.count_unserved), lifespan="on",
        log_config=None, access_log=False, timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )  # fmt: skip


async def serve(address: str, config: HttpConfig, listen_fd: int | None = None, parent_pid: int | None = None,
                listening: list[socket.socket] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or until `parent_pid` is gone); the exit code. Listens on
    `listen_fd` or `listening` when given (sockets already bound and listening), else on
    host:port."""
    import uvicorn

    from inlaid.http.app import create_app

    app = create_app(address, config)
    server = uvicorn.Server(uvicorn_config(app, config))
    watcher = asyncio.get_running_loop().create_task(_watch_parent(server, parent_pid)) if parent_pid else None
    closer = asyncio.get_running_loop().create_task(_answer_before_the_grace_ends(server, app.app.state.front))
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found; the front has nothing left to do by then and exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    sockets = [socket.socket(fileno=listen_fd)] if listen_fd is not None else listening
    log.info("http front starting", extra={"listen": f"{config.host}:{config.port}", "server": address,
                                           "pid": os.getpid()})
    try:
        await server.serve(sockets=sockets)
    finally:
        closer.cancel()
        if watcher is not None:
            watcher.cancel()
    log.info("http front stopped", extra={"pid": os.getpid()})
    return 0


async def _answer_before_the_grace_ends(server: uvicorn.Server, front: Any) -> None:
    """Once the front is stopping (SIGTERM, SIGINT, its server gone), uvicorn gives open
    responses _GRACEFUL_SHUTDOWN_S, then cancels them: a plain request got a bare `500
    Internal Server Error`, a stream was cut mid-body. A second before that, the SDK client
    closes: each call still waiting fails with ClientClosedError, which its endpoint answers
    (503 `unavailable`, a stream's error event) while the connection still stands; so does
    each request still receiving its body (`Front.stop_body_reads`)."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(_GRACEFUL_SHUTDOWN_S - _ANSWER_S)
    log.warning("closing the front's client: requests still open get 503")
    front.stop_body_reads()
    await front.close_clients()


async def _watch_parent(server: uvicorn.Server, parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(_PARENT_POLL_S)
    log.warning("the server that started this front is gone; exiting")
    server.should_exit = True
