"""Whether the executors a config asks for fit in the memory they share, checked before any
starts: a KV cache or LoRA slot pool too large for the machine grew the coordinator to GBs
with no message, or failed each executor's allocation three times before the server exited
(an outside probe: num_kv_blocks = 10**12, executors.count = 100000). Torch-free."""

from __future__ import annotations

import os
import platform
import shutil
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from inlaid.engine.config import EngineConfig, ModelConfig, ModelLoadError
from inlaid.serve.config_parsing import ConfigError

_NATIVE_MAX_RANK = 256  # kernels/lora_native.py's MAX_RANK (that module imports torch)

if TYPE_CHECKING:
    from inlaid.serve.config import ServerConfig


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not a POSIX system that reports it
        return None


def memory_known_without_torch(pool: str) -> int | None:
    # A GPU's memory is torch's to tell, and reading the config imports no torch: `inlaid
    # serve` asks it in a child process (cli.unavailable_cuda_device) and checks again.
    return host_memory_bytes() if pool == "cpu" else None


def _memory_pool(device: str) -> str:
    """Which memory an executor on `device` allocates from ("cuda" is "cuda:0")."""
    return "cpu" if device == "cpu" else f"cuda:{device.partition(':')[2] or 0}"


def _weights_at_least(engine: EngineConfig, model: ModelConfig) -> tuple[int, str]:
    """A lower bound on the bytes of the weights each executor loads (every one holds its own
    copy): the projections at 2 bits (the smallest GPTQ base) or 2 bytes (a float one), the
    embedding (an untied head with it) at 2 bytes. A bound, not an estimate: a config it
    refuses cannot fit; 64 CPU executors of a 23 GiB machine, accepted without the weights,
    ran it out of memory (an outside probe)."""
    projections, embedding, _ = model.parameter_counts()
    projection_bytes = projections // 4 if engine.quantized_dir else 2 * projections
    return projection_bytes + 2 * embedding, (
        f"weights at least {_size(projection_bytes + 2 * embedding)}: {projections / 1e6:.0f}M projection parameters "
        f"x {'2 bits' if engine.quantized_dir else '2 bytes'} + {embedding / 1e6:.0f}M embedding x 2 bytes")


def _half_pool_copies(engine: EngineConfig, dtype: str, pool: str) -> bool:
    """Whether a CPU executor keeps float16 copies of its float32 LoRA pools (half their bytes
    again: kernels/lora_native.py's HalfPools), as far as can be told without building the
    kernel: AVX-512 (/proc/cpuinfo), a rank the kernel takes, neither switch off. 1,024 slots
    at rank 16 were accepted at 20 GB on a 24 GiB machine whose executor measured 29 MB a
    slot, 30 GB in all (an outside probe)."""
    if pool != "cpu" or dtype != "float32" or engine.max_lora_rank > _NATIVE_MAX_RANK:
        return False
    if "0" in (os.environ.get("INLAID_NATIVE_LORA", "1"), os.environ.get("INLAID_NATIVE_LORA_HALF", "1")):
        return False
    if platform.system() != "Linux" or shutil.which(os.environ.get("CC") or "cc") is None:
        return False  # the kernel is built where kernels/native.py builds it: Linux, with a C compiler
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx512f" in line for line in cpuinfo)
    except OSError:
        return False


def _executor_allocations(engine: EngineConfig, model: ModelConfig, pool: str) -> tuple[int, int, str]:
    """The bytes an executor allocates at start for its KV cache and its LoRA slot pools (as
    ModelRunner does), and how they were counted."""
    dtype = engine.dtype if engine.dtype != "auto" else ("float32" if pool == "cpu" else "bfloat16")
    width = 4 if dtype == "float32" else 2
    blocks = engine.num_kv_blocks + (1 if engine.cuda_graphs else 0)  # a padding block for the graphs
    kv = blocks * engine.block_size * model.num_layers * 2 * model.num_kv_heads * model.head_dim * width
    # A and B of every slot, per layer: qkv (A: 3 x hidden), o, gate_up (A: 2 x hidden), down.
    q, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    per_rank = 7 * model.hidden_size + 2 * q + 2 * kv_width + 3 * model.intermediate_size
    lora = engine.max_lora_slots * engine.max_lora_rank * model.num_layers * per_rank * width
    half = _half_pool_copies(engine, dtype, pool)
    how = (f"KV cache {_size(kv)}: num_kv_blocks {engine.num_kv_blocks} x block_size {engine.block_size} x "
           f"{model.num_layers} layers x 2 x {model.num_kv_heads} KV heads x {model.head_dim} x {width} bytes; "
           f"LoRA slot pools {_size(lora * 3 // 2 if half else lora)}: max_lora_slots {engine.max_lora_slots} x "
           f"max_lora_rank {engine.max_lora_rank} x {model.num_layers * per_rank} values x "
           f"{'(4 + 2) bytes (float32 and its float16 copy, AVX-512)' if half else f'{width} bytes'}")
    if half:
        lora = lora * 3 // 2
    return kv, lora, how


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


def check_executor_memory(config: ServerConfig, memory_of: Callable[[str], int | None]) -> None:
    """Refuse executors whose KV caches, LoRA slot pools and weights (`_weights_at_least`, a
    lower bound) exceed the memory they share (the host's on CPU, one GPU's on CUDA;
    `memory_of` a pool: its bytes, or None: unknown): each would fail allocating them at
    start, be restarted three times, and the server exit 1 with an allocator's message, or
    run the machine out of memory. Refused, a config is surely too large; accepted, it may
    still not fit (activations, the runtime and the allocator's slack are not counted)."""
    try:
        model = ModelConfig.from_dir(config.engine.model_dir)
    except (ModelLoadError, OSError, KeyError, TypeError, ValueError):
        return  # the coordinator's start refuses the model with its reason
    weights, weights_how = _weights_at_least(config.engine, model)
    for pool, executors in Counter(_memory_pool(device) for device in config.executor_devices()).items():
        available = memory_of(pool)
        if available is None:
            continue
        kv, lora, how = _executor_allocations(config.engine, model, pool)
        each, how = kv + lora + weights, f"{how}; {weights_how}"
        if executors * each <= available:
            continue
        if each <= available:
            culprit = "executors.devices" if config.executors.devices else "executors.count"
        elif weights > available:
            culprit = "model.quantized_dir's weights" if config.engine.quantized_dir else "model.dir's weights"
        else:
            culprit = ("executor.num_kv_blocks x block_size" if kv >= lora
                       else "executor.max_lora_slots x max_lora_rank")
        where = "this machine's" if pool == "cpu" else f"{pool}'s"
        several = executors > 1
        raise ConfigError(f"{culprit} too large: {executors} executor{'s' if several else ''} on {pool} would "
                          f"allocate {_size(executors * each)} ({how}{' each' if several else ''}), more than "
                          f"{where} {_size(available)} of memory")
