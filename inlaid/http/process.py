"""The HTTP front as a child of `inlaid serve`: bound here, served there, restarted when lost.

`inlaid serve` binds the listening socket itself, so a port in use fails the start at
once with a clear message, and hands the socket to each front process it starts
(`--listen-fd`). A front that dies is started again on the same socket: connections that
arrive meanwhile wait in the socket's backlog instead of being refused. The front runs in
its own session (a terminal's Ctrl-C reaches the coordinator only, which drains first and
then stops the front) and exits by itself when the coordinator is gone. A front that is
alive but answers nothing (SIGSTOP, an event loop stuck in a call) is found by asking it
`GET /livez`, which the front answers without asking the server; when three asks in a row,
over `http.front_liveness_s`, go unanswered, it is killed, then started again as a lost one
is.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from inlaid.http.settings import HttpConfig

log = logging.getLogger("inlaid.http")

_BACKLOG = 2048
_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
_STABLE_AFTER_S = 30.0  # a front that ran this long restarts without backoff
_CLEAN_EXIT_AFTER_S = 1.0  # ... and so does one that ran this long and exited 0
_CLEAN_RESTART_DELAY_S = 0.2


def _restart_delay(failures: int) -> float:
    """The wait before the next start after `failures` failed ones in a row (none: at once)."""
    return _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S)) - 1] if failures else 0.0
_LIVENESS_MISSES = 3  # unanswered asks in a row before the kill


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (OSError when that is impossible: a
    port in use fails here, with its reason, before anything is served)."""
    host = host.strip("[]")
    return _listening(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """A listening TCP socket on each address `host` resolves to (`localhost`: 127.0.0.1 and
    ::1, as uvicorn binds it), for the front started alone. OSError when one cannot be bound
    (a port in use), or none can; an address family the machine lacks is skipped."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    skipped: OSError | None = None
    try:
        for family, _, protocol, _, address in dict.fromkeys(infos):
            try:
                sockets.append(_listening(family, address, protocol, v6_only=True))
            except OSError as error:
                if error.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                skipped = error
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise skipped or OSError(errno.EADDRNOTAVAIL, f"{host} resolves to no address")
    return sockets


def _listening(family: int, address: tuple, protocol: int = 0, v6_only: bool = False) -> socket.socket:
    """One TCP socket of `family` bound to `address` and listening; closed again on failure.
    `v6_only`: an IPv6 socket takes its own port only, not the IPv4 one's as well (binding
    both families of one name)."""
    sock = socket.socket(family, socket.SOCK_STREAM, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6_only and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class HttpFrontProcess:
    def __init__(self, server_address: str, config: HttpConfig, log_level: str, log_format: str,
                 server_stopping: Callable[[], bool] = lambda: False) -> None:
        """`server_stopping()`: the server has begun its stop (a front that ends then is not
        started again: a SIGTERM to the whole cgroup reaches the front as the server drains)."""
        self.server_address = server_address
        self._server_stopping = server_stopping
        self.config = config
        self.log_level = log_level
        self.log_format = log_format
        self.restarts = 0
        self._socket: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    def bind(self) -> None:
        """Listen on the configured host and port (OSError when that is impossible)."""
        sock = listening_socket(self.config.host, self.config.port)
        sock.set_inheritable(True)
        self._socket = sock

    def start(self) -> None:
        assert self._socket is not None, "bind() first"
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        try:
            await self._keep_a_front()
        finally:
            if self._server_stopping() and self._socket is not None:
                # no front will answer again: refused at once, new connections do not wait in the
                # backlog for the drain's end and a reset (a reviewer)
                self._socket.close()
                self._socket = None

    async def _keep_a_front(self) -> None:
        failures = 0
        while not (self._stopping or self._server_stopping()):
            started = time.monotonic()
            try:
                await self._spawn()
            except OSError as error:  # out of file descriptors or processes: it ended the front for good
                failures += 1
                self.restarts += 1
                delay = _restart_delay(failures)
                log.error("http front could not be started; trying again", extra={"error": str(error),
                                                                                  "delay_s": delay})
                await asyncio.sleep(delay)
                continue
            assert self._process is not None
            watch = asyncio.get_running_loop().create_task(self._watch(self._process))
            try:
                code = await self._process.wait()
            finally:
                watch.cancel()
            if self._stopping or self._server_stopping():
                return
            ran_s = time.monotonic() - started
            # exit code 0: it drained and ended on a SIGTERM from outside, no fault of its own (it was
            # an ERROR and waited out a backoff: an outside probe); one ending at once still backs off
            clean = code == 0 and ran_s > _CLEAN_EXIT_AFTER_S
            failures = 0 if clean or ran_s > _STABLE_AFTER_S else failures + 1
            # a clean exit waits a moment: a SIGTERM to the server's whole cgroup reaches the front as
            # the server's own begins its stop, which must not get a fresh front (a reviewer)
            delay = _CLEAN_RESTART_DELAY_S if clean else _restart_delay(failures)
            self.restarts += 1
            (log.warning if clean else log.error)(
                "http front ended (exit code 0, stopped from outside?); restarting it" if clean else
                "http front exited; restarting it",
                extra={"pid": self._process.pid, "returncode": code, "delay_s": delay, "restarts": self.restarts})
            await asyncio.sleep(delay)
            if self._server_stopping():
                return

    def command(self, fd: int) -> list[str]:
        """The front's command line, listening on the bound socket `fd`: it carries every
        setting of `config` the front uses (a setting left out ran at its default)."""
        return [
            sys.executable, "-m", "inlaid.http",
            "--address", self.server_address,
            "--listen-fd", str(fd),
            "--host", self.config.host,  # for its log lines; the socket is bound here
            "--port", str(self.config.port),
            "--allow-public-bind",  # the server config has checked the host already
            "--request-timeout", str(self.config.request_timeout_s),
            "--max-body-bytes", str(self.config.body_bytes_limit),
            "--max-prompts", str(self.config.prompts_per_request_limit),
            "--client-send-timeout", str(self.config.client_send_timeout_s),
            "--parent-pid", str(os.getpid()),
            "--log-level", self.log_level,
            "--log-format", self.log_format,
        ]  # fmt: skip

    async def _spawn(self) -> None:
        assert self._socket is not None
        fd = self._socket.fileno()
        command = self.command(fd)
        self._process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, pass_fds=(fd,), start_new_session=True)
        log.info("http front started", extra={"pid": self._process.pid,
                                              "listen": f"{self.config.host}:{self.config.port}"})

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill `process` once _LIVENESS_MISSES asks in a row go unanswered (each waits as
        long as the pause before it, so that the misses span http.front_liveness_s)."""
        interval_s = self.config.front_liveness_s / (2 * _LIVENESS_MISSES)
        misses = 0
        while process.returncode is None:
            await asyncio.sleep(interval_s)
            misses = 0 if await self._answers(interval_s) else misses + 1
            if misses >= _LIVENESS_MISSES and process.returncode is None:
                log.error("http front stopped answering; killing it", extra={
                    "pid": process.pid, "unanswered_s": self.config.front_liveness_s})
                process.kill()
                return

    async def _answers(self, timeout_s: float) -> bool:
        """Whether the front answers `GET /livez` within `timeout_s`."""
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard bind: ask over loopback
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /livez HTTP/1.1\r\nHost: inlaid-supervisor\r\nConnection: close\r\n\r\n")
                return (await reader.readline()).startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the front (it finishes open responses briefly), SIGKILL past `timeout_s`."""
        self._stopping = True
        if self._supervisor is not None:  # first, so that no new front starts meanwhile
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.error("http front did not stop in time; killing it", extra={"pid": process.pid})
                process.kill()
                await process.wait()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
