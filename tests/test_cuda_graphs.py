"""Decode-graph bookkeeping, on the CPU (inlaid/engine/cuda_graphs.py).

Without a GPU the `EagerReplay` backend re-runs each "captured" step on the static
buffers, so these tests check everything but the capture itself: which shapes exist,
padding a decode batch to a captured size (scratch KV block, masks, LoRA segments),
the fallback to eager steps, and when graphs are kept or dropped. The reference for
every graphed step is the runner's own eager step (whose parity with transformers + PEFT
tests/test_engine_parity.py holds). The CUDA capture is checked by bench/gpu.sh.
"""

from __future__ import annotations

import msgspec
import pytest
import torch

from inlaid.engine import Engine, EngineConfig
from inlaid.engine.cuda_graphs import GraphShape, capture_batch_sizes, graph_shapes, key_block_buckets
from inlaid.kernels import attention_native
from inlaid.protocol import BatchPlan, ChunkPlan, SamplingParams

@pytest.fixture(autouse=True)
def _sdpa_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphed steps attend through SDPA over their static buffers; the eager reference does
    too here, so the bounds below check the bookkeeping alone (the CPU's native decode
    attention, another summation order, is checked in tests/test_kernels_attention_native.py)."""
    monkeypatch.setattr(attention_native, "USE_NATIVE", False)


SETTINGS = dict(dtype="float32", max_num_seqs=8, num_kv_blocks=64, block_size=16, max_model_len=512,
                max_lora_slots=2, max_lora_rank=32)
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


def test_shapes_captured() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_batch_sizes(200) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 192, 200]
    assert key_block_buckets(512, 16) == [16, 32]
    assert key_block_buckets(100, 16) == [7]  # a context shorter than the smallest bucket
    assert key_block_buckets(4096, 16) == [16, 32, 64, 128, 256]
    assert key_block_buckets(1000, 16) == [16, 32, 63]
    # Keys of a shape must fit the cache (B x KB <= blocks), except in the smallest bucket.
    assert graph_shapes(8, 512, 16, 64) == [GraphShape(1, 16), GraphShape(1, 32), GraphShape(2, 16),
                                            GraphShape(2, 32), GraphShape(4, 16), GraphShape(8, 16)]


@pytest.fixture(scope="module")
def graph_runner(model_dir):
    from inlaid.engine.runner import ModelRunner

    runner = ModelRunner(EngineConfig(model_dir=str(model_dir), cuda_graphs=True, **SETTINGS))
    generator = torch.Generator().manual_seed(0)
    for keys, values in runner.kv_caches:  # a filled cache, so attention reads real numbers
        keys.copy_(torch.randn(keys.shape, generator=generator))
        values.copy_(torch.randn(values.shape, generator=generator))
    return runner


def _chunks(starts: list[int], slots: list[int], block_offset: int = 0) -> list[ChunkPlan]:
    """One decode chunk per sequence; sequence i owns 16 consecutive blocks."""
    return [ChunkPlan(seq_id=i, token_ids=[100 + 7 * i], start_pos=start,
                      block_table=list(range(block_offset + 16 * i, block_offset + 16 * (i + 1))),
                      adapter_slot=slot, sample=True, sampling=SamplingParams(), num_generated=1)
            for i, (start, slot) in enumerate(zip(starts, slots))]


def _eager_and_graphed(runner, chunks: list[ChunkPlan]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the same decode step, eagerly and through the graph path (both write
    the same keys/values to the same cache rows)."""
    with torch.inference_mode():
        batch, rows = runner._build_batch(chunks)
        eager = runner.model(batch, runner.kv_caches)[rows]
        graphed = runner.decode_graphs.run(chunks)
    assert graphed is not None
    return eager, graphed.clone()


def test_graphed_engine_matches_eager_engine(model_dir, adapter_dirs, greedy_logits) -> None:
    """Whole generations: three sequences (padded to the 4-row graph), two adapters and the
    base, same logits and tokens as the eager engine."""
    rows = {}
    for graphs in (False, True):
        engine = Engine.local(EngineConfig(model_dir=str(model_dir), cuda_graphs=graphs, **SETTINGS))
        for name in ("attn-r8", "all-r32"):
            engine.register_adapter(name, str(adapter_dirs[name]))
        assert engine.runner.capture_cuda_graphs() == ([1, 2, 4, 8] if graphs else [])
        prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
        rows[graphs] = greedy_logits(engine, prompt_ids, ["attn-r8", None, "all-r32"], 6)
        if graphs:
            stats = engine.runner.decode_graphs.stats
            assert stats.replays == 5 and stats.padded_rows == 5  # 5 decode steps of 3 rows on the 4-row graph
            assert stats.fallbacks == {"not_decode": 1}  # the prefill step
            assert stats.captures == 6 and len(engine.runner.decode_graphs.graphs) == 6
    for eager, graphed in zip(rows[False], rows[True]):
        eager, graphed = torch.stack(eager), torch.stack(graphed)
        assert torch.equal(eager.argmax(-1), graphed.argmax(-1))
        assert (eager - graphed).abs().max().item() < 1e-4


def test_padding_and_fallbacks(graph_runner) -> None:
    graphs = graph_runner.decode_graphs
    before = dict(graphs.stats.fallbacks)
    assert graphs.shape_for(_chunks([5, 40, 130], [0, -1, 1])) == GraphShape(4, 16)  # 131 tokens: 9 blocks
    assert graphs.shape_for(_chunks([300], [0])) == GraphShape(1, 32)
    assert graphs.shape_for(_chunks([300, 3], [0, 0])) == GraphShape(2, 32)
    assert graphs.shape_for(_chunks([300, 3, 3], [0, 0, 0])) is None  # 4 rows have no 32-block graph
    assert graphs.shape_for(_chunks([1] * 9, [0] * 9)) is None  # more rows than max_num_seqs
    assert graphs.shape_for([msgspec.structs.replace(_chunks([0], [0])[0], token_ids=[1, 2, 3])]) is None
    counted = {k: graphs.stats.fallbacks[k] - before.get(k, 0) for k in graphs.stats.fallbacks}
    assert counted == {"context_too_long": 1, "batch_too_large": 1, "not_decode": 1}

    # A padded step (3 rows on the 4-row graph, contexts of 1, 2 and 9 blocks) equals the eager step.
    eager, graphed = _eager_and_graphed(graph_runner, _chunks([5, 40, 130], [0, -1, 1]))
    assert (eager - graphed).abs().max().item() < 1e-4
    # A full graph (no padding row) with one segment per row: the segment capacity is just enough.
    eager, graphed = _eager_and_graphed(graph_runner, _chunks([7, 9], [0, 1]))
    assert (eager - graphed).abs().max().item() < 1e-4
    # The padding rows wrote only the scratch block, past the scheduler's blocks.
    assert graphs.scratch_block == graph_runner.config.num_kv_blocks
    assert graph_runner.kv_caches[0][0].shape[0] == graph_runner.config.num_kv_blocks + 1


def test_adapter_load_keeps_graphs_layer_swap_drops_them(graph_runner, adapter_dirs) -> None:
    from inlaid.kernels.dispatch import prepare_quant_linear
    from inlaid.kernels.testing import random_gptq_layer

    graphs = graph_runner.decode_graphs
    graphs.capture()
    captured = set(graphs.graphs)
    chunks = _chunks([20, 33], [0, 0], block_offset=32)
    graph_runner.load_adapter(0, "attn-r8", str(adapter_dirs["attn-r8"]))
    _, first = _eager_and_graphed(graph_runner, chunks)
    # An adapter load copies into the slot pools in place: the same graphs replay the new adapter.
    graph_runner.load_adapter(0, "mlp-r16", str(adapter_dirs["mlp-r16"]))
    assert set(graphs.graphs) == captured and graphs.stats.invalidations == 0
    eager, graphed = _eager_and_graphed(graph_runner, chunks)
    assert (eager - graphed).abs().max().item() < 1e-4
    assert (graphed - first).abs().max().item() > 1e-2  # the new adapter really is in use

    # A layer handed over (a new low-bit weight object) rebinds tensors: every graph is dropped,
    # and the next step is captured again on the new weights.
    down = graph_runner.model.layers[3].mlp.down_proj
    layer = random_gptq_layer(down.in_features, sum(down.out_slices), 4, 64, seed=3)
    down.use_quantized([prepare_quant_linear(layer.weights, "cpu", torch.float32, mode="dense")])
    assert graphs.weights_changed() and not graphs.graphs and graphs.stats.invalidations == 1
    assert not graphs.weights_changed()  # nothing changed since
    eager, graphed = _eager_and_graphed(graph_runner, chunks)
    assert (eager - graphed).abs().max().item() < 1e-4
    assert set(graphs.graphs) == {GraphShape(2, 16)}


def test_a_failed_capture_leaves_the_executor_serving_eagerly(model_dir, monkeypatch, caplog) -> None:
    """On CUDA a capture that raises (the first H200 run had one) is logged and the executor
    serves without graphs instead of failing to start; its steps still compute."""
    import logging

    from inlaid.engine.cuda_graphs import DecodeGraphs
    from inlaid.engine.runner import ModelRunner
    from inlaid.serve.executor import capture_graphs

    runner = ModelRunner(EngineConfig(model_dir=str(model_dir), cuda_graphs=True, **SETTINGS))
    assert capture_graphs(runner) == []  # a CPU runner: nothing to capture, graphs kept
    assert runner.decode_graphs is not None

    def refuse(self, shapes=None):  # noqa: ANN001, ANN202
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    monkeypatch.setattr(DecodeGraphs, "capture", refuse)
    monkeypatch.setattr(runner, "device", torch.device("cuda"))  # what the executor checks
    with caplog.at_level(logging.ERROR, logger="inlaid.executor"):
        assert capture_graphs(runner) == []
    assert runner.decode_graphs is None
    assert any("CUDA graph capture failed" in record.getMessage() for record in caplog.records)
    monkeypatch.undo()
    prefill = ChunkPlan(seq_id=0, token_ids=[1, 2, 3], start_pos=0, block_table=[0], adapter_slot=-1, sample=True,
                        sampling=SamplingParams(), num_generated=0)
    decode = ChunkPlan(seq_id=0, token_ids=[4], start_pos=3, block_table=[0], adapter_slot=-1, sample=True,
                       sampling=SamplingParams(), num_generated=1)
    for step_id, chunk in enumerate((prefill, decode)):
        result = runner.execute(BatchPlan(step_id=step_id, chunks=[chunk]))
        assert [token.seq_id for token in result.sampled] == [0]


def test_a_shape_whose_capture_fails_runs_eagerly(model_dir, monkeypatch) -> None:
    """A graph captured on first use (after an invalidation, say) that fails to capture: the
    step runs eagerly with the same tokens as a runner without graphs, the shape is dropped
    (not tried again), the fallback is counted."""
    from inlaid.engine.runner import ModelRunner

    runners = {graphs: ModelRunner(EngineConfig(model_dir=str(model_dir), cuda_graphs=graphs, **SETTINGS))
               for graphs in (False, True)}
    graphs = runners[True].decode_graphs
    attempts = []

    def refuse(step):  # noqa: ANN001, ANN202
        attempts.append(step)
        raise RuntimeError("capture refused")

    monkeypatch.setattr(graphs.backend, "capture", refuse)
    shapes_before = list(graphs.shapes)
    sampled = {}
    for name, runner in runners.items():
        prefill = [ChunkPlan(seq_id=i, token_ids=[5 + i, 9, 11], start_pos=0, block_table=[i], adapter_slot=-1,
                             sample=True, sampling=SamplingParams(), num_generated=0) for i in range(2)]
        first = runner.execute(BatchPlan(step_id=0, chunks=prefill))
        tokens = [[t.token_id for t in first.sampled]]
        for step in (1, 2):
            decode = [ChunkPlan(seq_id=i, token_ids=[tokens[-1][i]], start_pos=2 + step, block_table=[i],
                                adapter_slot=-1, sample=True, sampling=SamplingParams(), num_generated=step)
                      for i in range(2)]
            tokens.append([t.token_id for t in runner.execute(BatchPlan(step_id=step, chunks=decode)).sampled])
        sampled[name] = tokens
    assert sampled[True] == sampled[False]
    # Each decode step picked the smallest 2-row shape left, whose capture failed once and
    # which was then dropped: two steps, two shapes, each tried once.
    assert graphs.stats.fallbacks["capture_failed"] == len(attempts) == 2
    assert len(graphs.shapes) == len(shapes_before) - 2 and not graphs.graphs
