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

import zmq

from inlaid.client import AsyncClient, InlaidError
from inlaid.scheduling.metrics import RequestRecord
from inlaid.scheduling.traces import Trace, TraceRequest

DEFAULT_READY_TIMEOUT_S = 30.0


class ReplaySetupError(Exception):
    """The replay cannot start: a trace source without prompt tokens, a server that does not
    answer (or is not ready) in time, or trace tasks the server does not serve. Raised before
    any request is sent."""


async def replay_trace(
    address: str,
    trace: Trace,
    prompts: Mapping[str, list[int]],
    timeout_s: float = 3600.0,
    progress: bool = False,
    ignore_eos: bool = False,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> list[RequestRecord]:
    """Replay `trace`; `prompts` maps each request's `source` to its prompt token ids.
    `ignore_eos`: every request runs to its `max_tokens` (a model with random weights).
    The server must be ready within `ready_timeout_s` and serve every task the trace names
    (ReplaySetupError otherwise, before anything is sent); `timeout_s` bounds each request."""
    missing = sorted({r.source for r in trace.requests if r.source not in prompts})
    if missing:
        raise ReplaySetupError(f"no prompt tokens for {len(missing)} trace sources, e.g. {missing[:3]}")
    async with AsyncClient(address, timeout_s=timeout_s, client_name="inlaid-replay") as client:
        await _check_server(client, address, trace, ready_timeout_s)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(trace.requests), desc="replay", unit="req")
        start = time.monotonic() + 0.2

        async def one(index: int, request: TraceRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.monotonic()))
            record = RequestRecord(request_id=str(index), task=request.task, prompt_tokens=request.prompt_tokens,
                                   arrival_s=time.monotonic() - start)
            try:
                stream = await client.stream(prompt_token_ids=prompts[request.source], task=request.task,
                                             max_tokens=request.max_tokens, ignore_eos=ignore_eos)
                async for chunk in stream:
                    now = time.monotonic() - start
                    record.token_times.extend([now] * len(chunk.token_ids))
                    record.token_ids.extend(chunk.token_ids)
                record.finish_s = time.monotonic() - start
                if stream.result is not None:
                    record.admitted_s = record.arrival_s + stream.result.queue_seconds
            except InlaidError as error:
                record.error = f"{type(error).__name__}: {error}"
            if bar:
                bar.update(1)
            return record

        records = await asyncio.gather(*(one(i, r) for i, r in enumerate(trace.requests)))
    if bar:
        bar.close()
    return list(records)


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
