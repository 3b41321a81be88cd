"""Decode steps replayed from captured graphs (CUDA graphs), and their bookkeeping.

A decode step (every chunk is one token) repeats the same kernels with the same shapes
step after step; on a GPU, launching them one by one can cost more than their arithmetic
at small batches. The runner therefore captures the model's forward once per *graph shape* and
replays it:

    GraphShape(batch_size B, key_blocks KB)   B decode rows, each attending KB KV blocks

Every input lives in a static buffer that the captured kernels read by address. A step
of n <= B rows whose contexts fit KB blocks is padded to the smallest captured B:
padding rows read token 0 at position 0, write their key/value into a scratch KV block
no sequence owns (the runner allocates it past `num_kv_blocks`), attend key 0 only (so
their softmax stays finite) and use no adapter; their outputs are dropped. Keys past a
row's context are masked. LoRA segments use a fixed capacity of B (see
`inlaid.kernels.lora_meta`), so any mix of adapters replays the same graph.

Which shapes exist: `capture_batch_sizes(max_num_seqs)` x power-of-two key-block
buckets from 256 tokens up to the context length, keeping only shapes whose keys fit
the KV cache (B x KB <= num_kv_blocks; the smallest bucket always). A step that is not
pure decode, has more rows than the largest batch size, or a context longer than the
largest bucket of its batch size runs eagerly; `GraphStats.fallbacks` counts why.

Invalidation: a graph holds the addresses of every weight, adapter pool and cache it
read. Adapter loads copy into the slot pools in place (addresses unchanged: graphs stay
valid and replay the new adapter). Anything that rebinds a tensor of the model (a layer
handed over by the requantizer, a re-allocated pool) must be followed by
`weights_changed()`, which compares a fingerprint of (address, shape, stride, dtype) of
every tensor the model holds and drops all graphs when it differs; they are captured
again on first use.

Backends: on CUDA a graph is a `torch.cuda.CUDAGraph` (captured after one warm-up run
that compiles the Triton kernels and builds their pointer tables, all graphs sharing one
memory pool). On the CPU there is nothing to capture: `EagerReplay` re-runs the same
step on the same static buffers -- the bookkeeping of the CUDA path, executed eagerly,
so tests can check it on any machine. It is slower than no graphs at all on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

from inlaid.engine.lora import LoraBatch
from inlaid.engine.model import AttentionGroup, ForwardBatch, LlamaModel
from inlaid.kernels.lora_meta import build_lora_segments

if TYPE_CHECKING:
    from inlaid.protocol import ChunkPlan

log = logging.getLogger("inlaid.engine")

SMALLEST_KEY_BUCKET_TOKENS = 256


@dataclass(frozen=True, order=True)
class GraphShape:
    batch_size: int
    key_blocks: int


def capture_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, every 8 up to 64, every 32 beyond, and `max_batch` itself (the step sizes
    a decode batch is padded to: at most 1/8 of padding past 8 rows)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {1, 2, 4, 8, *range(16, 65, 8), *range(96, max_batch + 1, 32), max_batch}
    return sorted(size for size in sizes if size <= max_batch)


def key_block_buckets(max_context: int, block_size: int) -> list[int]:
    """KV blocks per row of each key bucket: powers of two times the smallest (256 tokens,
    or the whole context when shorter), the last one covering `max_context`."""
    needed = -(-max_context // block_size)
    bucket = min(-(-SMALLEST_KEY_BUCKET_TOKENS // block_size), needed)
    buckets = [bucket]
    while buckets[-1] < needed:
        buckets.append(min(buckets[-1] * 2, needed))
    return buckets


def graph_shapes(max_batch: int, max_context: int, block_size: int, num_kv_blocks: int) -> list[GraphShape]:
    """Every shape worth capturing: the batch sizes x key buckets whose keys fit the cache."""
    buckets = key_block_buckets(max_context, block_size)
    return [
        GraphShape(size, blocks)
        for size in capture_batch_sizes(max_batch)
        for blocks in buckets
        if blocks == buckets[0] or size * blocks <= num_kv_blocks
    ]


# ------------------------------------------------------------------------------ backends


class GraphBackend(Protocol):
    def capture(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record `step` (which reads and writes only static buffers); return a replay that
        re-executes it and returns its output tensor."""
        ...


class EagerReplay:
    """CPU stand-in: no capture, the replay re-runs the step on the static buffers."""

    def capture(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        step()  # what the CUDA backend's warm-up does: fail here, not on first use
        return step


class CudaGraphCapture:
    """torch.cuda.CUDAGraph per shape, all in one memory pool (captured largest first, the
    smaller graphs reuse the larger ones' memory)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        from inlaid.kernels import lora_triton

        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()  # compiles the Triton kernels and builds their pointer tables (no capture allowed)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()
        # The graph reads the SGMV pointer tables by address; the kernel module's cache may
        # drop them (it is bounded), so the graph keeps its own references.
        tables = list(lora_triton._TABLES.values()) + list(lora_triton._SLICE_TABLES.values())

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        replay.keep_alive = (graph, tables)  # type: ignore[attr-defined]
        return replay


# ------------------------------------------------------------------------------ bookkeeping


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    padded_rows: int = 0  # rows added to reach a captured batch size, over all replays
    invalidations: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)  # eager steps by reason


@dataclass
class _StaticInputs:
    """Device buffers the captured graphs read, sized for the largest shape."""

    ints: torch.Tensor  # int64: [ids | positions | slot_mapping | context lengths | kv blocks]
    segment_starts: torch.Tensor  # int32 [max_batch + 1]
    segment_slots: torch.Tensor  # int32 [max_batch]
    mask: torch.Tensor  # activation dtype, max over shapes of B * KB * block_size
    max_batch: int

    def views(self, shape: GraphShape, block_size: int) -> tuple[torch.Tensor, ...]:
        b, m = shape.batch_size, self.max_batch
        ids, positions, slots, contexts = (self.ints[i * m : i * m + b] for i in range(4))
        kv_blocks = self.ints[4 * m : 4 * m + b * shape.key_blocks]
        mask = self.mask[: b * shape.key_blocks * block_size].view(b, 1, 1, shape.key_blocks * block_size)
        return ids, positions, slots, contexts, kv_blocks, mask


class DecodeGraphs:
    """Captures, picks and replays decode-step graphs for one model and KV cache."""

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        scratch_block: int,
        shapes: list[GraphShape],
        backend: GraphBackend,
    ) -> None:
        if not shapes:
            raise ValueError("no graph shapes to capture")
        num_blocks = kv_caches[0][0].shape[0]
        if not 0 <= scratch_block < num_blocks:
            raise ValueError(f"scratch block {scratch_block} is not in the cache's {num_blocks} blocks")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.shapes = sorted(shapes)
        self.backend = backend
        self.graphs: dict[GraphShape, Callable[[], torch.Tensor]] = {}
        self.stats = GraphStats()
        device, dtype = kv_caches[0][0].device, kv_caches[0][0].dtype
        max_batch = max(s.batch_size for s in shapes)
        max_keys = max(s.batch_size * s.key_blocks for s in shapes)
        self._static = _StaticInputs(
            ints=torch.zeros(4 * max_batch + max_keys, dtype=torch.int64, device=device),
            segment_starts=torch.zeros(max_batch + 1, dtype=torch.int32, device=device),
            segment_slots=torch.full((max_batch,), -1, dtype=torch.int32, device=device),
            mask=torch.zeros(max_keys * block_size, dtype=dtype, device=device),
            max_batch=max_batch,
        )
        self._fingerprint = model_fingerprint(model, kv_caches)

    @classmethod
    def for_runner(cls, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], *,
                   max_num_seqs: int, max_context: int, block_size: int, num_kv_blocks: int) -> "DecodeGraphs":
        """The runner's graphs: the KV cache holds `num_kv_blocks` blocks plus the scratch one."""
        device = kv_caches[0][0].device
        backend: GraphBackend = CudaGraphCapture(device) if device.type == "cuda" else EagerReplay()
        shapes = graph_shapes(max_num_seqs, max_context, block_size, num_kv_blocks)
        return cls(model, kv_caches, block_size=block_size, scratch_block=num_kv_blocks, shapes=shapes,
                   backend=backend)

    # ------------------------------------------------------------------ capture
    def capture(self, shapes: list[GraphShape] | None = None) -> list[int]:
        """Capture `shapes` (default: all), largest first; returns the captured batch sizes."""
        for shape in sorted(shapes or self.shapes, reverse=True):
            if shape not in self.graphs:
                self._capture(shape)
        return sorted({shape.batch_size for shape in self.graphs})

    def _capture(self, shape: GraphShape) -> Callable[[], torch.Tensor]:
        if shape not in self.shapes:
            raise ValueError(f"{shape} is not one of this runner's graph shapes")
        self._fill(shape, [])  # all padding rows: the warm-up run writes only the scratch block
        ids, positions, slots, _, kv_blocks, mask = self._static.views(shape, self.block_size)
        b = shape.batch_size
        batch = ForwardBatch(
            input_ids=ids,
            positions=positions,
            slot_mapping=slots,
            groups=[AttentionGroup(
                batch_size=b, max_queries=1, max_keys=shape.key_blocks * self.block_size, query_rows=None,
                kv_blocks=kv_blocks, valid_slots=None, output_rows=None, mask=mask, query_span=(0, b),
            )],
            lora=LoraBatch(segment_starts=self._static.segment_starts[: b + 1],
                           segment_slots=self._static.segment_slots[:b]),
        )
        model, kv_caches = self.model, self.kv_caches
        replay = self.backend.capture(lambda: model(batch, kv_caches))
        self.graphs[shape] = replay
        self.stats.captures += 1
        return replay

    # ------------------------------------------------------------------ steps
    def shape_for(self, chunks: list["ChunkPlan"]) -> GraphShape | None:
        """The graph a step replays, or None (and the reason counted) when it runs eagerly."""
        if not chunks or any(len(chunk.token_ids) != 1 for chunk in chunks):
            self.stats.fallbacks["not_decode"] += 1
            return None
        rows = len(chunks)
        sizes = [s.batch_size for s in self.shapes if s.batch_size >= rows]
        if not sizes:
            self.stats.fallbacks["batch_too_large"] += 1
            return None
        needed = -(-max(chunk.start_pos + 1 for chunk in chunks) // self.block_size)
        fitting = [s for s in self.shapes if s.batch_size == min(sizes) and s.key_blocks >= needed]
        if not fitting:
            self.stats.fallbacks["context_too_long"] += 1
            return None
        return fitting[0]

    def run(self, chunks: list["ChunkPlan"]) -> torch.Tensor | None:
        """Hidden states [len(chunks), hidden] of a decode step, chunk i on row i; None when
        the step does not fit a graph (run it eagerly)."""
        shape = self.shape_for(chunks)
        if shape is None:
            return None
        replay = self.graphs.get(shape)
        if replay is None:
            try:
                replay = self._capture(shape)
            except Exception as error:  # noqa: BLE001  (graphs only save launch time: this step runs eagerly)
                self.shapes.remove(shape)  # and the shape is not tried again
                self.stats.fallbacks["capture_failed"] += 1
                log.error("CUDA graph capture failed; its steps run eagerly",
                          extra={"shape": dataclasses.astuple(shape), "error": f"{type(error).__name__}: {error}"})
                return None
        self._fill(shape, chunks)
        hidden = replay()
        self.stats.replays += 1
        self.stats.padded_rows += shape.batch_size - len(chunks)
        return hidden[: len(chunks)]

    def _fill(self, shape: GraphShape, chunks: list["ChunkPlan"]) -> None:
        """Write a step's inputs, padded to `shape`, into the static buffers."""
        b, blocks, bs, m = shape.batch_size, shape.key_blocks, self.block_size, self._static.max_batch
        pad = b - len(chunks)
        unused = [0] * (m - b)  # rows of the buffers past this shape: never read
        staged = [chunk.token_ids[0] for chunk in chunks] + [0] * pad + unused
        staged += [chunk.start_pos for chunk in chunks] + [0] * pad + unused
        staged += [c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks]
        staged += [self.scratch_block * bs] * pad + unused
        staged += [chunk.start_pos + 1 for chunk in chunks] + [1] * pad + unused  # padding: key 0 only
        for chunk in chunks:
            used = chunk.block_table[: -(-(chunk.start_pos + 1) // bs)]
            staged += used + [self.scratch_block] * (blocks - len(used))
        staged += [self.scratch_block] * (blocks * pad)
        self._static.ints[: len(staged)].copy_(torch.tensor(staged, dtype=torch.int64))
        padding = [(-1, pad)] if pad else []  # one adapter-less segment of the padding rows
        starts, segment_slots = build_lora_segments(
            [chunk.adapter_slot for chunk in chunks] + [slot for slot, _ in padding],
            [1] * len(chunks) + [count for _, count in padding], capacity=b,
        )
        self._static.segment_starts[: b + 1].copy_(starts)
        self._static.segment_slots[:b].copy_(segment_slots)
        _, _, _, contexts, _, mask = self._static.views(shape, bs)
        keys = torch.arange(blocks * bs, device=mask.device)
        mask.view(b, -1).fill_(float("-inf")).masked_fill_(keys[None, :] < contexts[:, None], 0.0)

    # ------------------------------------------------------------------ invalidation
    def weights_changed(self) -> bool:
        """Call after anything may have rebound a model tensor; drops every graph (they are
        captured again on use) when an address, shape or dtype changed. True when dropped."""
        fingerprint = model_fingerprint(self.model, self.kv_caches)
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        self.invalidate()
        return True

    def invalidate(self) -> None:
        if self.graphs:
            self.stats.invalidations += 1
        self.graphs.clear()


def model_fingerprint(model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """(address, shape, stride, dtype) of every tensor the model's modules hold -- parameters,
    buffers and public attributes (adapter pools, prepared low-bit layouts, fused weights) --
    and of the KV cache. Private attributes are lazily rebuilt caches (a oneDNN-packed copy on
    the CPU) and are left out: they change without anything being rebound."""
    found: list[tuple] = []
    for module in model.modules():
        _collect_tensors(list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)), found, 0)
        for name, value in vars(module).items():
            if not name.startswith("_"):
                _collect_tensors(value, found, 0)
    _collect_tensors(kv_caches, found, 0)
    return tuple(found)


def _collect_tensors(value: Any, found: list[tuple], depth: int) -> None:
    if isinstance(value, torch.Tensor):
        found.append((value.data_ptr(), tuple(value.shape), value.stride(), value.dtype))
    elif depth > 4 or isinstance(value, nn.Module):
        return  # submodules are visited by model.modules()
    elif isinstance(value, dict):
        for item in value.values():
            _collect_tensors(item, found, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_tensors(item, found, depth + 1)
    elif dataclasses.is_dataclass(value) or type(value).__module__.startswith("inlaid."):
        for name, item in vars(value).items():
            if not name.startswith("_"):
                _collect_tensors(item, found, depth + 1)
