"""The coordinator's handle on its requantizer process: spawn, talk, watch, restart. Torch-free.

The process is started when there is work (a re-quantization job) and kept afterwards. Its
threads, niceness and OpenMP wait policy are set at spawn (the environment must hold them
before torch is imported): on a small CPU a second torch process with default threads and
spinning OpenMP workers slowed serving many-fold (docs/dynamic-tasks.md). A dead
requantizer is restarted like the executor; each incarnation has its own ZeroMQ identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from inlaid.protocol import (
    PROTOCOL_VERSION,
    RequantizerHello,
    RequantizerOutbound,
    RequantizerShutdown,
)
from inlaid.serve.config import RequantizerSettings
from inlaid.serve.supervisor import wait_or_kill

log = logging.getLogger("inlaid.requantizer_supervisor")

_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


def requantizer_identity(generation: int) -> bytes:
    return f"requantizer-{generation}".encode()


def requantizer_environment(settings: RequantizerSettings) -> dict[str, str]:
    """Threads pinned and OpenMP told to sleep, not spin, when idle (PASSIVE): its workers
    then never burn the executor's core while waiting."""
    threads = str(settings.threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONUNBUFFERED": "1"}


class RequantizerSupervisor:
    def __init__(
        self,
        settings: RequantizerSettings,
        address: str,
        *,
        on_message: Callable[[msgspec.Struct], None],
        on_ready: Callable[[RequantizerHello], None],
        on_lost: Callable[[str], None],
        wanted: Callable[[], bool] = lambda: True,
        log_level: str = "INFO",
        log_format: str = "json",
    ) -> None:
        """`wanted()`: whether there is work for a requantizer (a lost one is started again
        only then; the next job starts one with `ensure_running`)."""
        self.settings = settings
        self.wanted = wanted
        self.address = address
        self.on_message = on_message
        self.on_ready = on_ready
        self.on_lost = on_lost
        self.log_level = log_level
        self.log_format = log_format
        self.generation = 0
        self.restarts = 0
        self.hello: RequantizerHello | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(RequantizerOutbound)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._spawning = False

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None and self._process.returncode is None else 0

    @property
    def ready(self) -> bool:
        return self.hello is not None and self.pid != 0

    # ------------------------------------------------------------------ lifecycle
    async def ensure_running(self) -> None:
        """Bind and spawn on first use; a no-op while a requantizer runs or is starting."""
        if self._stopping or self._spawning or self.pid:
            return
        if self._socket is None:
            sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.bind(self.address)
            self._socket = sock
            self._spawn_task(self._receive_loop())
        await self._spawn()

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Ask it to exit, kill it after `timeout_s`: it may be mid-way through loading a model
        or quantizing a layer, and every state it leaves is one a restart resumes from."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await self.send(RequantizerShutdown())
            except zmq.ZMQError:
                pass
            await wait_or_kill(process, timeout_s, "requantizer")
        for task in list(self._tasks):
            task.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _spawn_task(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self) -> None:
        self._spawning = True
        try:
            self.generation += 1
            self.hello = None
            command = [
                sys.executable, "-m", "inlaid.serve.requantizer",
                "--address", self.address,
                "--generation", str(self.generation),
                "--parent-pid", str(os.getpid()),
                "--threads", str(self.settings.threads),
                "--niceness", str(self.settings.niceness),
                "--log-level", self.log_level,
                "--log-format", self.log_format,
            ] + (["--idle-priority"] if self.settings.idle_priority else [])  # fmt: skip
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                env=requantizer_environment(self.settings))
            self._process = process
        finally:
            self._spawning = False
        log.info("requantizer started", extra={"pid": process.pid, "generation": self.generation,
                                               "threads": self.settings.threads, "niceness": self.settings.niceness})
        self._spawn_task(self._watch(process, self.generation))
        self._spawn_task(self._start_deadline(process, self.generation))

    async def _start_deadline(self, process: asyncio.subprocess.Process, generation: int) -> None:
        await asyncio.sleep(self.settings.start_timeout_s)
        if generation == self.generation and self.hello is None and process.returncode is None:
            log.error("requantizer did not start in time; killing it", extra={"pid": process.pid})
            process.kill()

    async def _watch(self, process: asyncio.subprocess.Process, generation: int) -> None:
        code = await process.wait()
        if self._stopping or generation != self.generation:
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        reason = f"requantizer (pid {process.pid}) died with {how}"
        log.error("requantizer lost", extra={"pid": process.pid, "generation": generation, "returncode": code})
        self.hello = None
        self.on_lost(reason)
        delay = _RESTART_BACKOFF_S[min(self.restarts, len(_RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        await asyncio.sleep(delay)
        # Not when the loss ended the last job (an idle process would hold its memory for
        # nothing), nor when the next job's dispatch has started one meanwhile.
        if not self._stopping and not self._spawning and not self.pid and self.wanted():
            await self._spawn()

    # ------------------------------------------------------------------ messages
    async def send(self, message: msgspec.Struct) -> None:
        """Send to the current incarnation; raises zmq.ZMQError when it is not connected."""
        if self._socket is None:
            raise zmq.ZMQError(zmq.EHOSTUNREACH, "the requantizer socket is closed")
        await self._socket.send_multipart([requantizer_identity(self.generation), self._encoder.encode(message)])

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            try:
                identity, *frames = await self._socket.recv_multipart()
            except zmq.ZMQError as error:
                log.error("requantizer socket receive failed", extra={"error": str(error)})
                await asyncio.sleep(0.01)
                continue
            if identity != requantizer_identity(self.generation) or len(frames) != 1:
                continue  # a previous incarnation's last words
            try:
                message = self._decoder.decode(frames[0])
            except (msgspec.DecodeError, ValueError) as error:
                log.error("undecodable frame from the requantizer", extra={"error": str(error)})
                continue
            if isinstance(message, RequantizerHello):
                if message.protocol_version != PROTOCOL_VERSION:
                    log.error("requantizer speaks another protocol; killing it",
                              extra={"theirs": message.protocol_version, "ours": PROTOCOL_VERSION})
                    if self._process is not None:
                        self._process.kill()
                    continue
                self.hello = message
                self.restarts = 0
                log.info("requantizer connected", extra={"pid": message.pid, "generation": message.generation,
                                                         "threads": message.threads, "niceness": message.niceness,
                                                         "idle_priority": message.idle_priority})
            try:
                if isinstance(message, RequantizerHello):
                    self.on_ready(message)
                else:
                    self.on_message(message)
            except Exception:  # a bug in a handler must cost that message, never the loop
                log.exception("internal error handling a requantizer message", extra={"kind": type(message).__name__})

