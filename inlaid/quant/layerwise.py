"""One decoder layer of the multi-task quantization, true-sequential, in one pass.

Every calibration stream (a task's samples under one forward: its adapter, or adapters off)
advances through the layer one input group at a time (`model_io.STAGES`: attn_in -> q/k/v,
attn_out -> o, mlp_in -> gate/up, mlp_out -> down). At each group the streams' Hessians of
that input are collected and handed to `quantize_group`, which must write the group's
quantized weights back into the layer before the streams advance: each linear's Hessian is
then taken on the inputs it will see at serving time (the layers before AND the linears
before it in this layer already quantized), and the layer's forward runs once per stream,
not once to collect and once more to propagate.

This is the entry point for anything that quantizes layer by layer (the driver, incremental
task addition): give it the streams and a callback.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import nn

from inlaid.quant.aggregate import TaskHessian
from inlaid.quant.hessian import HessianAccumulator, check_finite
from inlaid.quant.model_io import STAGES, LayerInputs, LayerPass, layer_adapter, run_layer

StreamKey = tuple[str, str]  # (task, forward): forward "adapter" (its own adapter) or "base"
GroupHessians = dict[StreamKey, TaskHessian]


@dataclass
class Stream:
    """One task's calibration samples moving through the layers under one forward."""

    task: str
    forward: str  # "adapter": the task's own forward (its adapter, if it has one); "base"
    adapter: str | None  # the adapter name active for this stream (None = adapters off)
    batches: list[LayerInputs]

    @property
    def key(self) -> StreamKey:
        return (self.task, self.forward)


@dataclass
class PhaseTimer:
    """Wall seconds and this process's CPU seconds per named phase (forward, hessian,
    quantize, ...), summed over calls. On a shared machine the CPU seconds of a one-thread
    run are what its wall time would be alone; wall time also counts the other processes."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - started_cpu


def quantize_layer_sequential(
    layer: nn.Module, streams: list[Stream], peft_model, layer_index: int,
    quantize_group: Callable[[str, GroupHessians], None], timer: PhaseTimer | None = None,
) -> dict[str, GroupHessians]:
    """Run every stream through `layer` group by group, calling `quantize_group(group,
    hessians)` after each group's Hessians are complete; afterwards each batch's `hidden`
    holds the layer's output (with the quantized weights). Returns group -> Hessians."""
    timer = timer or PhaseTimer()
    passes = [[LayerPass(layer, batch) for batch in stream.batches] for stream in streams]
    collected: dict[str, GroupHessians] = {}
    for group in STAGES:
        hessians: GroupHessians = {}
        for stream, stream_passes in zip(streams, passes):
            accumulator: HessianAccumulator | None = None
            with layer_adapter(layer, peft_model, stream.adapter):
                for layer_pass in stream_passes:
                    with timer.phase("forward"):
                        inputs = layer_pass.advance(group)
                    with timer.phase("hessian"):
                        accumulator = accumulator or HessianAccumulator(inputs.shape[-1])
                        accumulator.add(inputs[layer_pass.inputs.token_mask])
            if accumulator is not None:
                with timer.phase("hessian"):
                    check_finite(accumulator.hessian, f"layer {layer_index} {group}, task '{stream.task}'")
                hessians[stream.key] = TaskHessian(accumulator.hessian, accumulator.tokens)
        quantize_group(group, hessians)
        collected[group] = hessians
    with timer.phase("forward"):
        for stream, stream_passes in zip(streams, passes):
            with layer_adapter(layer, peft_model, stream.adapter):
                for batch, layer_pass in zip(stream.batches, stream_passes):
                    batch.hidden = layer_pass.finish()
    return collected


def propagate(layer: nn.Module, streams: list[Stream], peft_model) -> None:
    """Run every stream through a layer whose weights are final (a resumed layer)."""
    for stream in streams:
        with layer_adapter(layer, peft_model, stream.adapter):
            for batch in stream.batches:
                batch.hidden = run_layer(layer, batch)
