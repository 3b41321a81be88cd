"""Soak: a long mixed workload against a real `inlaid serve`, with faults injected at random.

    .venv/bin/python bench/soak.py                      # 10,000 requests (about 30-60 min on 2 CPU cores)
    .venv/bin/python bench/soak.py --requests 1000      # a shorter run

The server serves six of the committed task adapters (ranks 8-64, more tasks than adapter
slots) on the default model. Workers send requests with random tasks, prompts, lengths and
sampling (greedy, temperatures from 1e-300 to 1e300, top-k, top-p, seeds), streaming or
not, some with short deadlines, some cancelled mid-stream, some refused up front (bad
values). Every `--fault-every` requests on average, one fault is injected:

    executor_sigkill    SIGKILL the executor (a crash or an OOM kill)
    executor_hang       SIGSTOP the executor inside a step (the step timeout kills it)
    garbage             a burst of random and malformed frames from a raw socket
    bad_adapter         AddTask of an adapter corrupted one random way (must be refused)
    adapter_breaks      AddTask of a good copy, then its weights file is corrupted, then
                        requests for it (each must get adapter_failed, alone)
    client_vanishes     a raw client starts a long stream and closes its socket
    tiny_temperature    three requests at temperature 1e-300 (must be served)

and every 3rd executor closes its socket after its 10th plan, then lingers 2 s before it
exits (the executor's own exit path after repeated failures; `INLAID_EXECUTOR_FAULT`).

Reported: requests lost (no final answer: must be 0), outcomes by kind, p50/p99 latency of
completed requests, executor restarts, coordinator and executor RSS over time (plot with
the faults marked), and the machine's load average. Writes bench/results/soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from inlaid.client import AsyncClient, InlaidError, RequestTimeoutError
from inlaid.models.prepare import prepare_default_model
from inlaid.protocol import ErrorReply, ServerReply
from inlaid.serve.executor import FAULT_ENV
from inlaid.serve.launcher import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_report import build_report, markdown, plot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASKS = ["sentiment", "math", "qa", "summarize", "table-to-text", "trans-fr"]  # ranks 8, 16, 8, 32, 16, 64
PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "List three colours:",
    "Q: What is 12 times 7?\nA:", "Once upon a time, in a small village,", "Summarize: the storm delayed us.",
    "Translate to French: good morning", "Is this review positive? 'A delight from start to end.'",
    "name: Blue Spice | food: Chinese | area: riverside ->",
]
FAULTS = ["executor_sigkill", "executor_hang", "garbage", "bad_adapter", "adapter_breaks", "client_vanishes",
          "tiny_temperature"]
ANSWER_TIMEOUT_S = 300.0  # no final answer within this (per message) = lost
# Every 3rd executor (generations 2, 5, 8, ...) closes its socket after its 10th plan and
# lingers 2 s before it exits (INLAID_EXECUTOR_FAULT).
CLOSE_SOCKET_AFTER_PLAN = 10
CLOSING_GENERATIONS = list(range(2, 4000, 3))


@dataclass
class Outcome:
    kind: str  # "workload" or the fault that sent it
    result: str  # done:<finish_reason> | error:<code> | lost
    latency_s: float
    accepted: bool  # False: refused up front (invalid values, overloaded)
    stream_consistent: bool = True


@dataclass
class Soak:
    server: ServerProcess
    rng: random.Random
    adapters_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (time, kind, note)
    samples: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    completed: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started


# ------------------------------------------------------------------ workload
def _request(rng: random.Random) -> tuple[dict, bool]:
    """Keyword arguments of one generate, and whether the server must accept it."""
    kwargs: dict = {"task": rng.choice([None, *TASKS]), "max_tokens": rng.randint(1, 16)}
    if rng.random() < 0.8:
        kwargs["prompt"] = rng.choice(PROMPTS)
    else:
        kwargs["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    roll = rng.random()
    if roll < 0.5:
        pass  # greedy
    elif roll < 0.9:
        kwargs["temperature"] = rng.choice([1e-300, 1e-8, 0.3, 0.7, 1.0, 1.5, 1e300])
        kwargs["top_k"] = rng.choice([0, 0, 1, 5, 50, 2**62])
        kwargs["top_p"] = rng.choice([1.0, 1.0, 0.9, 0.5, 1e-300])
        kwargs["seed"] = rng.choice([None, rng.randint(-(2**63), 2**64 - 1)])
    else:
        kwargs["ignore_eos"] = True
    if rng.random() < 0.05:
        kwargs["deadline_s"] = rng.uniform(0.05, 2.0)
    if rng.random() < 0.03:  # refused up front
        field, values = rng.choice([("temperature", [float("nan"), -1.0, float("inf")]),
                                    ("top_p", [float("nan"), 0.0, 1.5, float("inf")]),
                                    ("top_k", [-1]), ("max_tokens", [0, -5]), ("task", ["no-such-task"])])
        kwargs[field] = rng.choice(values)
        return kwargs, False
    return kwargs, True


async def _one(soak: Soak, client: AsyncClient, kwargs: dict, must_accept: bool, kind: str,
               cancel_after_chunks: int | None = None) -> Outcome:
    started = time.monotonic()
    stream = kwargs.pop("stream", False) or cancel_after_chunks is not None
    try:
        if stream:
            handle = await client.stream(**kwargs, timeout_s=ANSWER_TIMEOUT_S)
            chunks = []
            async for chunk in handle:
                chunks.append(chunk)
                if cancel_after_chunks is not None and len(chunks) == cancel_after_chunks:
                    await handle.cancel()
            result = handle.result
            consistent = "".join(c.text for c in chunks) == result.text and \
                [t for c in chunks for t in c.token_ids] == result.token_ids
            outcome = Outcome(kind, f"done:{result.finish_reason}", time.monotonic() - started, True, consistent)
        else:
            result = await client.generate(**kwargs, timeout_s=ANSWER_TIMEOUT_S)
            outcome = Outcome(kind, f"done:{result.finish_reason}", time.monotonic() - started, True)
    except RequestTimeoutError:
        outcome = Outcome(kind, "lost", time.monotonic() - started, True)
    except InlaidError as error:
        refused = error.code in ("invalid_request", "malformed", "overloaded", "unknown_task", "context_length")
        outcome = Outcome(kind, f"error:{error.code}", time.monotonic() - started, not refused)
    except Exception as error:  # noqa: BLE001 - a driver bug must show in the report, not end the soak
        outcome = Outcome(kind, f"driver error: {type(error).__name__}: {error}", time.monotonic() - started, False)
    if not must_accept and outcome.accepted:
        outcome.result += " (should have been refused)"
    soak.outcomes.append(outcome)
    return outcome


async def _worker(soak: Soak, client: AsyncClient, queue: asyncio.Queue, faults: asyncio.Queue,
                  fault_every: int, progress) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(soak.rng.random())
    while True:
        try:
            index = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        kwargs, must_accept = _request(rng)
        kwargs["stream"] = rng.random() < 0.5
        cancel = rng.randint(1, 3) if kwargs["stream"] and rng.random() < 0.05 else None
        await _one(soak, client, kwargs, must_accept, "workload", cancel)
        soak.completed += 1
        progress.update(1)
        if rng.random() < 1.0 / fault_every:
            faults.put_nowait(index)


# ------------------------------------------------------------------ faults
async def _inject(soak: Soak, client: AsyncClient, admin: AsyncClient, kind: str) -> str:
    rng = soak.rng
    if kind in ("executor_sigkill", "executor_hang"):
        stats = await client.stats(timeout_s=60)
        if not stats.executor_pid:
            return "no executor ready (restarting): skipped"
        os.kill(stats.executor_pid, signal.SIGKILL if kind == "executor_sigkill" else signal.SIGSTOP)
        return f"pid {stats.executor_pid}"
    if kind == "garbage":
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(soak.server.address)
        typed = 0
        try:
            for _ in range(50):
                frame = rng.randbytes(rng.randint(0, 200)) if rng.random() < 0.5 else msgspec.msgpack.encode(
                    {"type": rng.choice(["generate", "add_task", "nope"]), "request_id": "g",
                     rng.choice(["prompt", "sampling", "task", "x"]): rng.choice([1, "x", [1], {"a": None}, None])})
                await sock.send(frame)
                if await sock.poll(60_000):
                    reply = msgspec.msgpack.decode(await sock.recv(), type=ServerReply)
                    typed += isinstance(reply, ErrorReply)
        finally:
            sock.close()
        return f"{typed}/50 typed errors"
    if kind == "bad_adapter":
        what, path = _corrupt_copy(soak.adapters_dir, rng)
        try:
            await admin.add_task(f"bad-{rng.randrange(10**9)}", str(path), timeout_s=120)
            return f"{what}: ACCEPTED (wrong)"
        except InlaidError as error:
            return f"{what}: refused [{error.code}]"
    if kind == "adapter_breaks":
        name = f"fragile-{rng.randrange(10**9)}"
        path = soak.adapters_dir / name
        shutil.copytree(ROOT / "adapters" / "qa", path)
        await admin.add_task(name, str(path), timeout_s=120)
        (path / "adapter_model.safetensors").write_bytes(os.urandom(1024))
        outcomes = await asyncio.gather(*(_one(soak, client, {"prompt": p, "task": name, "max_tokens": 4}, True,
                                                kind) for p in PROMPTS[:3]))
        await admin.remove_task(name, timeout_s=120)
        return ", ".join(o.result for o in outcomes)
    if kind == "client_vanishes":
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(soak.server.address)
        try:
            await sock.send(msgspec.msgpack.encode({"type": "generate", "request_id": "v", "prompt": PROMPTS[0],
                                                    "stream": True,
                                                    "sampling": {"max_tokens": 400, "ignore_eos": True}}))
            got = await sock.poll(int(ANSWER_TIMEOUT_S * 1000))
            first = msgspec.msgpack.decode(await sock.recv(), type=ServerReply) if got else None
        finally:
            sock.close()
        return f"closed after {type(first).__name__}"
    if kind == "tiny_temperature":
        outcomes = [await _one(soak, client, {"prompt": rng.choice(PROMPTS), "max_tokens": 4, "temperature": 1e-300},
                               True, kind) for _ in range(3)]
        return ", ".join(o.result for o in outcomes)
    raise ValueError(kind)


def _corrupt_copy(root: Path, rng: random.Random) -> tuple[str, Path]:
    """A copy of a committed adapter, broken one random way at the byte level."""
    path = root / f"bad-{rng.randrange(10**9)}"
    shutil.copytree(ROOT / "adapters" / rng.choice(TASKS), path)
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    what = rng.choice(["truncated", "empty", "random bytes", "stray bytes", "NaN value", "rank as text",
                       "config is a list", "no weights file"])
    if what == "truncated":
        weights.write_bytes(data[: rng.randrange(len(data))])
    elif what == "empty":
        weights.write_bytes(b"")
    elif what == "random bytes":
        weights.write_bytes(os.urandom(rng.randint(1, 4096)))
    elif what == "stray bytes":
        weights.write_bytes(data + os.urandom(rng.randint(1, 64)))
    elif what == "NaN value":  # the first value of some tensor becomes a NaN
        header = json.loads(data[8:header_end])
        entry = rng.choice([v for k, v in header.items() if k != "__metadata__"])
        nan = {"F16": b"\x00\x7e", "BF16": b"\xc0\x7f", "F32": b"\x00\x00\xc0\x7f"}[entry["dtype"]]
        at = header_end + entry["data_offsets"][0]
        weights.write_bytes(data[:at] + nan + data[at + len(nan) :])
    elif what == "rank as text":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": "eight"}))
    elif what == "config is a list":
        config.write_text(json.dumps([json.loads(config.read_text())]))
    else:
        weights.unlink()
    return what, path


async def _fault_loop(soak: Soak, client: AsyncClient, admin: AsyncClient, faults: asyncio.Queue) -> None:
    bag: list[str] = []  # every kind once per round, in a random order: even coverage in short runs
    while True:
        await faults.get()
        if not bag:
            bag = soak.rng.sample(FAULTS, len(FAULTS))
        kind = bag.pop()
        at = soak.now()
        try:
            note = await _inject(soak, client, admin, kind)
        except InlaidError as error:
            note = f"driver error: {error}"
        soak.faults.append((at, kind, note))


async def _sample_loop(soak: Soak, client: AsyncClient) -> None:
    while True:
        sample = {"t": soak.now(), "completed": soak.completed, "coordinator_rss": _rss(soak.server.pid)}
        try:
            stats = await client.stats(timeout_s=30)
            sample |= {"executor_rss": stats.executor_rss_bytes, "restarts": stats.executor_restarts,
                       "running": stats.requests_running, "waiting": stats.requests_waiting}
        except InlaidError:
            sample |= {"stats": "no answer"}
        soak.samples.append(sample)
        await asyncio.sleep(1.0)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


# ------------------------------------------------------------------ run
async def _run(soak: Soak, requests: int, concurrency: int, fault_every: int) -> None:
    from tqdm import tqdm

    queue: asyncio.Queue = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    faults: asyncio.Queue = asyncio.Queue()
    async with AsyncClient(soak.server.address, timeout_s=ANSWER_TIMEOUT_S) as client, \
            AsyncClient(soak.server.address, timeout_s=ANSWER_TIMEOUT_S, admin_token=soak.server.admin_token) as admin:
        await client.wait_ready(timeout_s=600)
        soak.started = time.monotonic()
        sampler = asyncio.create_task(_sample_loop(soak, admin))
        injector = asyncio.create_task(_fault_loop(soak, client, admin, faults))
        with tqdm(total=requests, desc="soak", unit="req") as progress:
            await asyncio.gather(*(_worker(soak, client, queue, faults, fault_every, progress)
                                   for _ in range(concurrency)))
        while not faults.empty():  # let the last injected fault finish
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        injector.cancel()
        sampler.cancel()
        await asyncio.gather(injector, sampler, return_exceptions=True)
        final = await client.stats(timeout_s=60)
        soak.samples.append({"t": soak.now(), "completed": soak.completed, "coordinator_rss": _rss(soak.server.pid),
                             "executor_rss": final.executor_rss_bytes, "restarts": final.executor_restarts,
                             "running": final.requests_running, "waiting": final.requests_waiting,
                             "kv_free": final.kv_blocks_free, "kv_total": final.kv_blocks_total})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-every", type=int, default=100, help="one fault per this many requests, on average")
    parser.add_argument("--step-timeout", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "soak"), help="path prefix of the .json/.md/.png")
    args = parser.parse_args(argv)
    model_dir = prepare_default_model(quiet=True)
    workdir = Path(tempfile.mkdtemp(prefix="inlaid-soak-"))
    config = {
        "model": {"dir": str(model_dir)},
        "executor": {"threads": 1, "max_num_seqs": 32, "num_kv_blocks": 1024, "max_lora_slots": 4,
                     "max_lora_rank": 64, "max_model_len": 1024},
        "server": {"admin_token": "soak-admin-token-0123456789", "max_pending_requests": 512,
                   "step_timeout_s": args.step_timeout, "shutdown_grace_s": 10.0, "log_level": "WARNING"},
        "tasks": {name: str(ROOT / "adapters" / name) for name in TASKS},
    }
    load_before = os.getloadavg()
    started = time.monotonic()
    os.environ[FAULT_ENV] = json.dumps({"close_socket_after_plan": CLOSE_SOCKET_AFTER_PLAN, "exit_delay_s": 2.0,
                                        "generations": CLOSING_GENERATIONS})
    (workdir / "server").mkdir()
    server = ServerProcess(config, workdir=workdir / "server")
    del os.environ[FAULT_ENV]
    soak = Soak(server=server, rng=random.Random(args.seed), adapters_dir=workdir / "adapters")
    soak.adapters_dir.mkdir()
    try:
        asyncio.run(_run(soak, args.requests, args.concurrency, args.fault_every))
    finally:
        exit_code = server.terminate(timeout_s=120)
    report = build_report(soak, args, exit_code, load_before, time.monotonic() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    plot(soak, out.with_suffix(".png"), FAULTS, CLOSE_SOCKET_AFTER_PLAN)
    print(markdown(report))
    if report["lost"] == 0 and exit_code == 0 and not report["driver_errors"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"server logs kept in {workdir}", file=sys.stderr)
    clean = not (report["lost"] or report["wrongly_accepted"] or report["driver_errors"] or exit_code)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
