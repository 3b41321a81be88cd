"""GPU suite, decode step: a Llama-2-7B-shaped model, random 4-bit weights, 100 adapters.

No download: the model is its config (the shapes of Llama-2-7B) with random GPTQ-style
4-bit weights (group 128) built on the device, and 100 random rank-16 adapters on all
seven projections filling the engine's slot pool. Every sequence has the same context
(256 tokens by default); the batch i-th row uses adapter i mod 100. The step is the
engine's own (`ModelRunner.execute`: batch building, the forward, greedy sampling), run
eagerly and replayed from its decode CUDA graphs (`EngineConfig.cuda_graphs`), at batch
1..256, against the floor: the bytes a step must read -- the 4-bit weights with their
scales and zero points, the lm_head, the adapters the batch touches, the keys and values
of every context -- at the device's copy bandwidth.

Checks: the graph replay's logits equal the eager step's (padded batch sizes included),
and still do after new adapter weights are written into the pool in place (the graphs
read the pool by address). In a dry run the model is tiny and runs on the CPU paths.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpu_kernels import Device

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
TINY = {**LLAMA2_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _random_prepared(k: int, n: int, bits: int, group: int, device: torch.device, dtype: torch.dtype):  # noqa: ANN202
    """A random `bits`-bit weight [K, N] prepared for `device`; scales keep unit-variance
    inputs at unit variance through the layer."""
    from inlaid.kernels.dispatch import PreparedQuantLinear, QuantLinearWeights, prepare_quant_linear
    from inlaid.kernels.gptq_format import pack_qweight, pack_qzeros

    levels = 2**bits
    codes = torch.randint(0, levels, (k, n), dtype=torch.int32, device=device)
    zeros = torch.randint(0, levels, (k // group, n), dtype=torch.int32, device=device)
    spread = ((levels**2 - 1) / 6) ** 0.5  # std of (code - zero) for independent uniform codes
    scales = (torch.rand((k // group, n), device=device) + 0.5) / (spread * k**0.5)
    if device.type == "cuda":  # re-laid out on the device: unpacking a 7B model on the host takes minutes
        from inlaid.kernels.quant_triton import DENSE_MIN_M, prepare_triton_layout

        layout = prepare_triton_layout(codes, zeros, scales, bits, group, device, dtype)
        return PreparedQuantLinear("triton", layout, bits=bits, group_size=group, in_features=k, out_features=n,
                                   act_dtype=dtype, input_perm=None, bias=None, dense_min_m=DENSE_MIN_M)
    weights = QuantLinearWeights(qweight=pack_qweight(codes, bits), qzeros=pack_qzeros(zeros, bits),
                                 scales=scales.half(), g_idx=None, bits=bits, group_size=group, in_features=k,
                                 out_features=n)
    return prepare_quant_linear(weights, device, dtype)


def random_quantized_model(raw_config: dict, folder: Path, bits: int, group: int, device: torch.device,
                           dtype: torch.dtype, seed: int = 0):  # noqa: ANN201  (a LlamaModel)
    """The model of `raw_config` (written to `folder/config.json`) with random low-bit
    projections and random embedding / lm_head, built on `device` without a dense copy."""
    from inlaid.engine.config import ModelConfig
    from inlaid.engine.lora import LoraLinear
    from inlaid.engine.model import LlamaModel, rope_inverse_frequencies

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw_config))
    config = ModelConfig.from_dir(folder)
    torch.manual_seed(seed)
    with torch.device("meta"):  # no memory for the dense projections that are replaced below
        model = LlamaModel(config)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.use_quantized([_random_prepared(module.in_features, sum(module.out_slices), bits, group,
                                                   device, dtype)])
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0)
        model.head_weight().normal_(0.0, config.hidden_size**-0.5)
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                parameter.fill_(1.0)
    model.rotary.inv_freq = rope_inverse_frequencies(config.rope, config.head_dim).to(device)
    return model


def fill_adapters(runner, seed: int) -> None:  # noqa: ANN001  (a ModelRunner)
    """Random rank-`max_lora_rank` adapters in every slot of every projection, written in place."""
    from inlaid.engine.lora import LoraLinear

    generator = torch.Generator(device=runner.device).manual_seed(seed)
    with torch.no_grad():
        for module in runner.model.modules():
            if isinstance(module, LoraLinear):
                a = torch.randn(module.stacked_a.shape, generator=generator, device=runner.device)
                module.stacked_a.copy_(a * module.in_features**-0.5)
                for b in module.lora_b:
                    b.copy_(torch.randn(b.shape, generator=generator, device=runner.device) * 0.05)
                module.slot_ranks.fill_(runner.config.max_lora_rank)
                module.slot_scales.fill_(2.0)


def decode_plan(batch: int, context: int, block_size: int, adapters: int, vocab: int, step_id: int):  # noqa: ANN201
    from inlaid.protocol import BatchPlan, ChunkPlan, SamplingParams

    blocks = -(-context // block_size)
    return BatchPlan(step_id=step_id, chunks=[
        ChunkPlan(seq_id=i, token_ids=[(7 * i + 3) % vocab], start_pos=context - 1,
                  block_table=list(range(i * blocks, (i + 1) * blocks)), adapter_slot=i % adapters, sample=True,
                  sampling=SamplingParams(), num_generated=1)
        for i in range(batch)])


def _median_step_ms(runner, plan, steps: int) -> float:  # noqa: ANN001
    runner.execute(plan)  # warm-up (captures a graph shape not captured yet)
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        runner.execute(plan)  # synchronizes on CUDA
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def _graph_vs_eager(runner, plan) -> float:  # noqa: ANN001
    """Relative difference of the graph replay's logits from the eager step's."""
    graphs = runner.decode_graphs
    runner.decode_graphs = None
    eager = runner.forward_logits(plan)[1].double().cpu()
    runner.decode_graphs = graphs
    graphed = runner.forward_logits(plan)[1].double().cpu()
    if not torch.isfinite(graphed).all() or not torch.isfinite(eager).all():
        return float("inf")
    return float((graphed - eager).norm() / eager.norm())


def decode_step(device: Device, context: int = 256, adapters: int = 100, rank: int = 16) -> dict:
    from inlaid.engine.config import EngineConfig
    from inlaid.engine.lora import LoraLinear
    from inlaid.engine.runner import ModelRunner

    dry = device.dry_run
    dtype = device.act_dtype if dry else torch.bfloat16  # the engine's CUDA default
    raw = TINY if dry else LLAMA2_7B
    batches = [1, 2, 4] if dry else BATCHES
    context, adapters = (32, 4) if dry else (context, adapters)
    bits, group, block_size = 4, (32 if dry else 128), 16
    built = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model = random_quantized_model(raw, Path(folder), bits, group, device.torch_device, dtype)
        config = EngineConfig(
            model_dir=folder, device=str(device.torch_device), dtype=str(dtype).removeprefix("torch."),
            max_num_seqs=max(batches), max_num_batched_tokens=max(2048, max(batches)), block_size=block_size,
            num_kv_blocks=max(batches) * -(-context // block_size), max_model_len=context,
            max_lora_slots=adapters, max_lora_rank=rank, cuda_graphs=True)
        runner = ModelRunner(config, model=model)
    fill_adapters(runner, seed=1)
    build_seconds = time.perf_counter() - built
    started = time.perf_counter()
    captured = runner.capture_cuda_graphs()
    capture_seconds = time.perf_counter() - started

    mc, size = runner.model_config, torch.finfo(dtype).bits // 8
    weight_bytes = sum(t.numel() * t.element_size() for m in runner.model.modules() if isinstance(m, LoraLinear)
                       for prepared in m.quantized or [] for t in vars(prepared.layout).values()
                       if isinstance(t, torch.Tensor))
    head_bytes = mc.vocab_size * mc.hidden_size * size
    pool_bytes = sum(t.numel() * t.element_size() for m in runner.model.modules() if isinstance(m, LoraLinear)
                     for t in (m.stacked_a, *m.lora_b))
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * size
    rows = []
    for step_id, batch in enumerate(batches):
        plan = decode_plan(batch, context, block_size, adapters, mc.vocab_size, step_id)
        graphs = runner.decode_graphs
        runner.decode_graphs = None
        eager_ms = _median_step_ms(runner, plan, 2 if dry else 5)
        runner.decode_graphs = graphs
        graph_ms = _median_step_ms(runner, plan, 2 if dry else 10)
        touched = pool_bytes * min(batch, adapters) // adapters
        moved = weight_bytes + head_bytes + touched + batch * context * kv_per_token
        floor = device.floor_ms(moved)
        rows.append({"batch": batch, "eager_ms": eager_ms, "graph_ms": graph_ms,
                     "tokens_per_s": batch / (min(eager_ms, graph_ms) * 1e-3), "floor_ms": floor,
                     "fraction_of_floor": floor / min(eager_ms, graph_ms), "bytes": moved,
                     "adapter_bytes": touched, "kv_bytes": batch * context * kv_per_token})
        print(f"  batch {batch:3d}: eager {eager_ms:7.2f} ms, graph {graph_ms:7.2f} ms, floor {floor:6.2f} ms "
              f"({100 * floor / min(eager_ms, graph_ms):.0f}%), {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)

    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    checks = []
    for batch in [3, min(100, max(batches))]:  # 3 rows pad to the 4-row graph
        plan = decode_plan(batch, context, block_size, adapters, mc.vocab_size, 0)
        error = _graph_vs_eager(runner, plan)
        checks.append({"check": f"graph == eager, batch {batch}", "relative_error": error, "ok": error < tolerance})
    before = runner.forward_logits(plan)[1].double().cpu()
    fill_adapters(runner, seed=2)  # new adapters, written into the same pool: the graphs must see them
    kept = not runner.decode_graphs.weights_changed()
    error = _graph_vs_eager(runner, plan)
    changed = float((runner.forward_logits(plan)[1].double().cpu() - before).norm() / before.norm())
    checks.append({"check": "graph == eager after new adapters (graphs kept)", "relative_error": error,
                   "graphs_kept": kept, "logits_moved_by": changed, "ok": error < tolerance and kept and changed > 1e-3})
    return {"model": "tiny Llama (dry run)" if dry else "Llama-2-7B shape, random weights", "config": raw,
            "bits": bits, "group_size": group, "adapters": adapters, "rank": rank, "context": context,
            "dtype": str(dtype), "weight_bytes": weight_bytes, "lm_head_bytes": head_bytes,
            "adapter_pool_bytes": pool_bytes, "build_seconds": build_seconds,
            "graph_batch_sizes": captured, "capture_seconds": capture_seconds,
            "graph_stats": {"replays": runner.decode_graphs.stats.replays,
                            "fallbacks": dict(runner.decode_graphs.stats.fallbacks)},
            "steps": rows, "checks": checks}
