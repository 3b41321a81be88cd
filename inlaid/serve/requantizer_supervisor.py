"""The coordinator's handle on its requantizer process: spawn, talk, watch, restart. Torch-free.

The process is started when there is work (a re-quantization job) and asked to exit once
none has come for a minute (`retire`: it held GBs idle until the server stopped). Its
threads, niceness and OpenMP wait policy are set at spawn (the environment must hold them
before torch is imported): on a small CPU a second torch process with default threads and
spinning OpenMP workers slowed serving many-fold (docs/dynamic-tasks.md). A dead
requantizer is restarted like the executor; each incarnation has its own ZeroMQ identity.

A hung one (stopped, or asleep without end) is killed and restarted the same way: see
`_liveness` for what counts as hung, and why a starved one never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from inlaid.protocol import (
    PROTOCOL_VERSION,
    RequantizerHello,
    RequantizerOutbound,
    RequantizerShutdown,
)
from inlaid.serve.child_process import CLOCK_TICKS, NOT_RUNNING, sample_process, wait_or_kill
from inlaid.serve.config_sections import RequantizerSettings
from inlaid.serve.ipc_dirs import listen_again_if_gone, remove_segments_of

log = logging.getLogger("inlaid.requantizer_supervisor")

_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
_RETIRE_TIMEOUT_S = 10.0  # an idle requantizer asked to exit: killed past this


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
        owes_progress: Callable[[], bool] = lambda: False,
        log_level: str = "INFO",
        log_format: str = "json",
    ) -> None:
        """`wanted()`: whether there is work for a requantizer (a lost one is started again
        only then; the next job starts one with `ensure_running`). `owes_progress()`: whether
        the requantizer runs a job and is not waiting on the coordinator (for a commit): only
        then can it be hung (`_liveness`)."""
        self.settings = settings
        self.wanted = wanted
        self.owes_progress = owes_progress
        self.address = address
        self.on_message = on_message
        self.on_ready = on_ready
        self.on_lost = on_lost
        self.log_level = log_level
        self.log_format = log_format
        self.generation = 0
        self.restarts = 0  # losses since the last process connected (the restart back-off's index)
        self.losses = 0  # processes lost since the server started (stats, /metrics)
        self.hello: RequantizerHello | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(RequantizerOutbound)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._spawning = False
        self._messages = 0  # from the current incarnation: each one is progress
        self._kill_reason: tuple[int, str] | None = None  # (generation, why it was killed)
        self._retired = 0  # the generation asked to exit while idle (`retire`)
        self._retry_pending = False  # a spawn that failed waits for its back-off (`_restart_later`)

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None and self._process.returncode is None else 0

    @property
    def ready(self) -> bool:
        return self.hello is not None and self.pid != 0

    @property
    def stopped(self) -> bool:
        """The current process is stopped (SIGSTOP, a debugger): it reads no message."""
        sample = sample_process(self.pid) if self.pid else None
        return sample is not None and sample.stopped

    def kill(self, reason: str) -> None:
        """SIGKILL the current process (it works on a stopped one too). Its loss is then
        reported to `on_lost` with `reason` and handled like any death: restarted, counted
        toward the job's max_attempts."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._kill_reason = (self.generation, reason)
        log.warning("killing the requantizer", extra={"pid": process.pid, "generation": self.generation,
                                                      "reason": reason})
        process.kill()

    def retire(self) -> None:
        """Ask an idle requantizer to exit (its model and Hessian state: GBs, on a GPU device
        memory). The next job starts a fresh one, in `_watch` if it came meanwhile."""
        process = self._process
        if self._stopping or self.hello is None or process is None or process.returncode is not None:
            return  # stopping, not up (or already retiring), or gone
        self._retired, self.hello = self.generation, None  # no job is sent to it from now on
        log.info("the requantizer is idle: it exits", extra={"pid": process.pid, "generation": self.generation})
        self._spawn_task(self._retire(process))

    async def _retire(self, process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.send(RequantizerShutdown())
        await wait_or_kill(process, _RETIRE_TIMEOUT_S, "requantizer")

    # ------------------------------------------------------------------ lifecycle
    async def ensure_running(self) -> None:
        """Bind and spawn on first use; a no-op while a requantizer runs or is starting."""
        if self._stopping or self._spawning or self.pid:
            return
        if self._socket is None:
            sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Its directory holds only the owner lock until this first job: the likeliest one for
            # a /tmp cleaner to take (the bind then failed in a task nothing checks, the job queued).
            if not listen_again_if_gone(sock, self.address, log, first=True):
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
            # At SCHED_IDLE on a busy machine it may not run at all within the timeout: every
            # stop during a job logged a WARNING for a kill that loses nothing.
            await wait_or_kill(process, timeout_s, "requantizer",
                               harmless="a job resumes from its last committed layer at the next start")
        for task in list(self._tasks):
            task.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _spawn_task(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # (never silently: serving goes on)
            log.error("a requantizer supervision task failed", extra={"task": task.get_coro().__qualname__,
                                                                     "error": repr(task.exception())})

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
            try:
                if self._socket is not None:
                    listen_again_if_gone(self._socket, self.address, log)
                process = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                    env=requantizer_environment(self.settings))
            except OSError as error:  # out of file descriptors or processes: tried again after the back-off
                # (no loss: the job is not charged for a process that never ran; one retry chain at a time)
                log.error("requantizer could not be started", extra={"error": f"{type(error).__name__}: {error}"})
                if not self._retry_pending:
                    self._retry_pending = True
                    self._spawn_task(self._restart_later())
                return
            self._process = process
        finally:
            self._spawning = False
        log.info("requantizer started", extra={"pid": process.pid, "generation": self.generation,
                                               "threads": self.settings.threads, "niceness": self.settings.niceness})
        self._messages = 0
        self._spawn_task(self._watch(process, self.generation))
        self._spawn_task(self._start_deadline(process, self.generation))
        self._spawn_task(self._liveness(process, self.generation))

    async def _start_deadline(self, process: asyncio.subprocess.Process, generation: int) -> None:
        await asyncio.sleep(self.settings.start_timeout_s)
        if generation == self.generation and self.hello is None and process.returncode is None:
            self.kill(f"requantizer (pid {process.pid}) was killed: it did not start within "
                      f"{self.settings.start_timeout_s:g} s")

    async def _liveness(self, process: asyncio.subprocess.Process, generation: int) -> None:
        """Kill the process once it has owed progress too long without running.

        "Progress" cannot be a message alone: between two messages lies a whole layer, which at
        SCHED_IDLE and nice 19 may wait minutes for a CPU the executor keeps busy, and killing
        a starved process gains nothing (its successor starves the same way and redoes the
        layer). So each sample (/proc) asks whether the process *could* be making progress:
        it sent a message, its CPU time advanced, or some thread of it is runnable (R: running
        or queued for a CPU, which is what starvation looks like). Only time with none of these
        counts, and only while it owes us a layer (`owes_progress`: time it waits for our
        commit never counts):
        - stopped (T: SIGSTOP, a debugger): nothing in the requantizer stops itself, so
          `progress_timeout_s` of it is a hang;
        - asleep without using CPU (S, D): a deadlock or an endless wait, but also the duty
          cycle's pacing, which sleeps (1 - share) / share times the CPU time used since its
          last sleep (~1 s per input group at the defaults on the default model, but 9x the
          job's whole start-up, model load included, at share 0.1). So a sleep may last
          `progress_timeout_s` plus that pay-back for the CPU time seen since the previous
          sleep; a hang is still caught within one layer's pay-back.
        A loop that burns CPU without ever finishing a layer is not caught (it looks like a
        slow layer: nothing reports progress inside a layer). Without /proc (not Linux) no
        sample tells starved from hung: the check is off."""
        timeout = self.settings.progress_timeout_s
        share = min(self.settings.duty_cycle, self.settings.idle_duty_cycle)
        payback = 1.25 * (1.0 - share) / share / CLOCK_TICKS  # seconds of sleep per CPU tick, with a margin
        interval = min(1.0, timeout / 10)
        previous = sample_process(process.pid)
        if previous is None:
            if process.returncode is None and not Path("/proc/self/stat").exists():
                log.warning("no /proc: a hung requantizer cannot be told from a starved one and is not detected")
            return
        messages, stalled, tick = self._messages, 0.0, time.monotonic()
        worked = 0  # CPU ticks since its last sleep: what a pacing sleep now may pay back
        while True:
            await asyncio.sleep(interval)
            if self._stopping or generation != self.generation or process.returncode is not None:
                return
            now = time.monotonic()
            # A late tick (the event loop was busy) says nothing of the requantizer: count at most two.
            elapsed, tick = min(now - tick, 2 * interval), now
            if not self.owes_progress():  # idle, or waiting for us: nothing to check
                stalled = 0.0
                continue
            sample = sample_process(process.pid)
            if sample is None or sample.state in ("Z", "X"):
                return  # exited: `_watch` reports it
            ran = sample.cpu_ticks - previous.cpu_ticks
            moving = self._messages != messages or ran > 0 or sample.runnable
            messages, previous = self._messages, sample
            if moving:
                worked = (0 if stalled else worked) + ran  # a sleep just ended: the next pays back what follows
                stalled = 0.0
                continue
            stalled += elapsed
            allowed = timeout if sample.stopped else timeout + worked * payback
            if stalled >= allowed:
                how = NOT_RUNNING.get(sample.state, "not running")
                self.kill(f"requantizer (pid {process.pid}) was killed: no progress for {round(stalled, 1):g} s, "
                          f"{how} (state {sample.state})")
                return

    async def _watch(self, process: asyncio.subprocess.Process, generation: int) -> None:
        code = await process.wait()
        try:
            if left := remove_segments_of(process.pid):  # (or its tracker's, a moment before the tracker)
                log.info("removed the shared memory the requantizer left", extra={"pid": process.pid, "segments": left})
        except OSError as error:  # best effort: never in the way of the restart
            log.warning("could not remove the requantizer's shared memory", extra={"error": repr(error)})
        if self._stopping or generation != self.generation:
            return
        if self._retired == generation:  # asked to exit while idle: no loss
            if self.wanted():  # a job came while it exited
                await self._spawn()
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        reason = f"requantizer (pid {process.pid}) died with {how}"
        if self._kill_reason is not None and self._kill_reason[0] == generation:
            reason = self._kill_reason[1]  # we killed it: why says more than SIGKILL
        log.error("requantizer lost", extra={"pid": process.pid, "generation": generation, "returncode": code,
                                             "reason": reason})
        self.hello = None
        self.losses += 1
        self.on_lost(reason)
        await self._restart_later()

    async def _restart_later(self) -> None:
        """A lost requantizer's successor (or a spawn that failed: it ended the task, and no job
        ran again until the next addition), after the back-off."""
        delay = _RESTART_BACKOFF_S[min(self.restarts, len(_RESTART_BACKOFF_S) - 1)]
        self.restarts += 1
        await asyncio.sleep(delay)
        self._retry_pending = False
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
            self._messages += 1
            try:
                message = self._decoder.decode(frames[0])
            except (msgspec.DecodeError, ValueError) as error:
                log.error("undecodable frame from the requantizer", extra={"error": str(error)})
                continue
            if isinstance(message, RequantizerHello):
                if message.protocol_version != PROTOCOL_VERSION:
                    self.kill(f"requantizer (pid {message.pid}) was killed: it speaks protocol "
                              f"{message.protocol_version}, not {PROTOCOL_VERSION}")
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

