"""Open-loop replay of a trace against a running server, through the client SDK.

Every request is sent at its trace arrival time whether or not earlier ones were
answered (open loop: a slow server builds a queue, as real traffic would). Requests stream,
so each token's arrival time is recorded; the server's `queue_seconds` gives when the
request was first scheduled. Results are `RequestRecord`s (times in seconds from the
replay's start), the same records the simulator produces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import zmq

from inlaid.client import AsyncClient, ConnectionLostError, InlaidError, RequestTimeoutError, ShuttingDownError
from inlaid.scheduling.metrics import RequestRecord
from inlaid.scheduling.traces import Trace, TraceRequest

DEFAULT_READY_TIMEOUT_S = 30.0


class ReplaySetupError(Exception):
    """The replay cannot start: a trace source without prompt tokens, a server that does not
    answer (or is not ready) in time, or trace tasks the server does not serve. Raised before
    any request is sent."""


class Replay:
    """One replay of `trace`: `run()` gives one record per trace request, in trace order.
    `prompts` maps each request's `source` to its prompt token ids. `ignore_eos`: every request
    runs to its `max_tokens` (a model with random weights). The server must be ready within
    `ready_timeout_s` and serve every task the trace names (ReplaySetupError otherwise, before
    anything is sent); `timeout_s` bounds each request. A lost connection fails every request
    not yet answered at once. A server shutting down (ShuttingDownError) stops the sending,
    but the requests in flight run on: a graceful shutdown still finishes them. `stop(reason)`
    ends it early (a signal handler may call it): requests in flight are cancelled, the rest
    are not sent, and each such record's `error` says why. `stopped` holds the reason (""
    when the replay ran to its end) and `wall_s` the replay's wall time from its first arrival.
    Each record's `prompt_tokens` is the length of the prompt sent (the suite record's, which
    may differ from the trace line's own `prompt_tokens`; --synthetic-prompts sends that)."""

    def __init__(
        self,
        address: str,
        trace: Trace,
        prompts: Mapping[str, list[int]],
        timeout_s: float = 3600.0,
        progress: bool = False,
        ignore_eos: bool = False,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        missing = sorted({r.source for r in trace.requests if r.source not in prompts})
        if missing:
            raise ReplaySetupError(f"no prompt tokens for {len(missing)} trace sources, e.g. {missing[:3]}")
        self.address, self.trace, self.prompts = address, trace, prompts
        self.timeout_s, self.progress, self.ignore_eos, self.ready_timeout_s = (
            timeout_s, progress, ignore_eos, ready_timeout_s)
        self.stopped = ""
        self.wall_s: float | None = None  # None: nothing was sent
        self.sent = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._unsent: set[asyncio.Task[None]] = set()  # still waiting for their arrival time
        self._stop_event: asyncio.Event | None = None

    def stop(self, reason: str, drain: bool = False) -> None:
        """End the replay now; the first reason given is kept. `drain`: send nothing more but
        let the requests in flight finish or fail on their own (a later plain stop, e.g. the
        health watchdog or a signal, still cancels them)."""
        if not self.stopped:
            self.stopped = reason
            if self._stop_event is not None:
                self._stop_event.set()
        current = asyncio.current_task()
        for task in self._unsent if drain else self._tasks:
            if task is not current:  # a task cancelling itself would end cancelled, not with its record
                task.cancel()

    async def run(self) -> list[RequestRecord]:
        self._stop_event = asyncio.Event()
        # Records exist before anything is sent: an early stop still returns one per request
        # (arrival at its trace time), so a partial replay's counts add up to the trace's.
        # prompt_tokens: what is sent. The suite record a trace line names has its own length;
        # the line's prompt_tokens (9,000 say) recorded beside a 67-token prompt misled.
        records = [RequestRecord(request_id=str(i), task=r.task, prompt_tokens=len(self.prompts[r.source]),
                                 arrival_s=r.arrival_s) for i, r in enumerate(self.trace.requests)]
        async with AsyncClient(self.address, timeout_s=self.timeout_s, client_name="inlaid-replay") as client:
            if not self.stopped:
                # Raced against stop(): a signal while the server is awaited ends the wait.
                setup = asyncio.ensure_future(_check_server(client, self.address, self.trace, self.ready_timeout_s))
                stopping = asyncio.ensure_future(self._stop_event.wait())
                try:
                    await asyncio.wait({setup, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # also when cancelled from outside: nothing left pending
                    stopping.cancel()
                    if not setup.done():
                        setup.cancel()
                if not self.stopped:
                    setup.result()  # ReplaySetupError
                else:  # let it end (its outcome retrieved): the stop is what is reported
                    await asyncio.gather(setup, return_exceptions=True)
            if self.stopped:
                for record in records:
                    record.error = f"not sent: {self.stopped}"
                return records
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(records), desc="replay", unit="req")
            start = time.monotonic() + 0.2
            self._tasks = [asyncio.ensure_future(self._one(client, start, request, record, bar))
                           for request, record in zip(self.trace.requests, records)]
            self._unsent = set(self._tasks)
            watchdog = asyncio.ensure_future(self._watch(client))
            try:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                watchdog.cancel()
            # A task cancelled before its first step never reached its handler: its record
            # is filled in here, not raised.
            for record in records:
                if record.finish_s is None and not record.error:
                    record.error = f"not sent: {self.stopped}"
            self.wall_s = time.monotonic() - start - self.trace.requests[0].arrival_s if self.sent else None
        if bar:
            bar.close()
        return records

    async def _one(self, client: AsyncClient, start: float, request: TraceRequest, record: RequestRecord,
                   bar: Any) -> None:
        sent = False
        try:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.monotonic()))
            current = asyncio.current_task()
            self._unsent.discard(current)  # type: ignore[arg-type]
            if self.stopped:  # stopped (drained) in the same instant its sleep ended
                record.error = f"not sent: {self.stopped}"
                return
            record.arrival_s = time.monotonic() - start
            sent = True
            self.sent += 1
            stream = await client.stream(prompt_token_ids=self.prompts[request.source], task=request.task,
                                         max_tokens=request.max_tokens, ignore_eos=self.ignore_eos)
            async for chunk in stream:
                now = time.monotonic() - start
                record.token_times.extend([now] * len(chunk.token_ids))
                record.token_ids.extend(chunk.token_ids)
            record.finish_s = time.monotonic() - start
            if stream.result is not None:
                record.admitted_s = record.arrival_s + stream.result.queue_seconds
        except ShuttingDownError as error:
            record.error = f"{type(error).__name__}: {error}"
            # Nothing more is sent, but a graceful shutdown still finishes what it has: the
            # requests in flight keep their timings (cancelling them lost finished ones). If
            # the server then goes, their streams fail or the health watchdog stops the rest.
            self.stop(f"the server at {self.address} went away ({type(error).__name__})", drain=True)
        except ConnectionLostError as error:
            record.error = f"{type(error).__name__}: {error}"
            # The client reconnects, and each later request would sit on a socket to nothing
            # for the whole --timeout-s (an hour): the replay ends here instead.
            self.stop(f"the server at {self.address} went away ({type(error).__name__})")
        except InlaidError as error:
            record.error = f"{type(error).__name__}: {error}"
        except asyncio.CancelledError:
            if not self.stopped:
                raise  # cancelled from outside: not ours to swallow
            record.error = f"{'cancelled' if sent else 'not sent'}: {self.stopped}"
        finally:
            if bar:
                bar.update(1)


    async def _watch(self, client: AsyncClient) -> None:
        """Ends the replay when the server stops answering health checks: a server gone while
        no request was in flight fails nobody's stream, and the requests sent after it each
        waited the whole request timeout."""
        every_s = min(5.0, self.ready_timeout_s)
        while True:
            await asyncio.sleep(every_s)
            try:
                await client.health(timeout_s=self.ready_timeout_s)
            except (ConnectionLostError, RequestTimeoutError) as error:
                self.stop(f"the server at {self.address} went away (health check: {type(error).__name__})")
                return


async def _check_server(client: AsyncClient, address: str, trace: Trace, ready_timeout_s: float) -> None:
    """A bounded wait for the server, then its task list against the trace's: a dead address
    sat silent for the whole request timeout (an hour), and a trace of other task names ran
    to the end with every request refused (UnknownTaskError)."""
    try:
        await client.wait_ready(ready_timeout_s)
        served = {task.name for task in await client.list_tasks(timeout_s=ready_timeout_s)}
    except InlaidError as error:  # not ready in time, refused handshake (version, token), ...
        raise ReplaySetupError(f"server at {address}: {type(error).__name__}: {error}") from None
    except zmq.ZMQError as error:  # an address ZeroMQ cannot connect to (no port, bad host syntax)
        raise ReplaySetupError(f"cannot connect to {address}: {error}") from None
    wanted = {r.task for r in trace.requests if r.task is not None}
    unknown = sorted(wanted - served)
    if unknown:
        raise ReplaySetupError(
            f"the server at {address} does not serve {len(unknown)} of the trace's {len(wanted)} tasks: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} "
            f"(it serves: {', '.join(sorted(served)) or 'none'}; bench/traces.py --suite-task-names names tasks "
            "after the suite's)")


if __name__ == "__main__":  # the command line: inlaid/scheduling/replay_cli.py
    import sys

    from inlaid.scheduling.replay_cli import main

    sys.exit(main())
