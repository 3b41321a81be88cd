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

from inlaid.client import AsyncClient, InlaidError
from inlaid.scheduling.metrics import RequestRecord
from inlaid.scheduling.traces import Trace, TraceRequest


async def replay_trace(
    address: str,
    trace: Trace,
    prompts: Mapping[str, list[int]],
    timeout_s: float = 3600.0,
    progress: bool = False,
    ignore_eos: bool = False,
) -> list[RequestRecord]:
    """Replay `trace`; `prompts` maps each request's `source` to its prompt token ids.
    `ignore_eos`: every request runs to its `max_tokens` (a model with random weights)."""
    missing = sorted({r.source for r in trace.requests if r.source not in prompts})
    if missing:
        raise KeyError(f"no prompt tokens for {len(missing)} trace sources, e.g. {missing[:3]}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trace.requests), desc="replay", unit="req")
    async with AsyncClient(address, timeout_s=timeout_s, client_name="inlaid-replay") as client:
        await client.handshake()
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
