"""What the server fuzz and fault tests share: prompts, engine settings, the in-process
reference answers, and /proc probes for the processes they start."""

from __future__ import annotations

import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "List three fruits:"]
TASKS = [None, "attn-r8", "mlp-r16", "all-r32"]
SHORT_TOKENS = 6
LONG_PROMPT, LONG_TOKENS = "Tell me a long story about the sea.", 40
MAX_MODEL_LEN = 512
HEALTH_BOUND_S = 10.0  # liveness, not speed: a healthy coordinator answers in milliseconds


def engine_settings(model_dir: Path) -> dict:
    return dict(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=32, num_kv_blocks=512,
                block_size=16, max_lora_slots=4, max_lora_rank=32, max_model_len=MAX_MODEL_LEN)


def server_config(model_dir: Path, adapter_dirs: dict[str, Path], **server: object) -> dict:
    executor = {k: v for k, v in engine_settings(model_dir).items() if k != "model_dir"}
    return {"model": {"dir": str(model_dir)}, "executor": executor, "server": dict(server),
            "tasks": {name: str(path) for name, path in adapter_dirs.items()}}


def compute_reference(model_dir: Path, adapter_dirs: dict[str, Path]) -> dict:
    """The in-process engine's greedy answers: (prompt, task, max_tokens) -> token ids."""
    from inlaid.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.local(EngineConfig(**engine_settings(model_dir)))
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, str(path))
    pairs = [(p, t) for p in PROMPTS for t in TASKS]
    short = engine.generate([p for p, _ in pairs], SamplingParams(max_tokens=SHORT_TOKENS), [t for _, t in pairs])
    answers = {(p, t, SHORT_TOKENS): o.token_ids for (p, t), o in zip(pairs, short)}
    (long,) = engine.generate([LONG_PROMPT], SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True))
    answers[(LONG_PROMPT, None, LONG_TOKENS)] = long.token_ids
    return answers


async def until(predicate, timeout_s: float = 120.0, poll_s: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    """Await `predicate()` (an async callable returning bool) becoming true, or fail."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {predicate}"
        await asyncio.sleep(poll_s)


def process_state(pid: int) -> str | None:
    """'R', 'S', 'T', 'Z', ... or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def wait_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_state(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def executor_pids(coordinator_pid: int) -> list[int]:
    """Live executor processes started by this coordinator (their command line names it)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().split(b"\0")
        except OSError:
            continue
        if b"inlaid.serve.executor" in args and str(coordinator_pid).encode() in args:
            if process_state(int(entry)) not in (None, "Z"):
                found.append(int(entry))
    return sorted(found)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def signal_process(pid: int, signum: int) -> None:
    """os.kill for one process only: pid 0 (ServerStats' "no executor ready") or a negative pid
    would signal a whole process group, pytest included."""
    import os

    assert pid > 0, f"no process to signal (pid {pid}): the executor was not ready"
    os.kill(pid, signum)
