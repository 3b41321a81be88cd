"""Memory table: a 4-bit base + 100 adapters vs an fp16 base + 100 adapters, same KV budget.

    .venv/bin/python bench/memory.py [--kv-tokens 16384] [--adapters 100] [--rank 16] [--no-measure]

Computed for the default model (SmolLM2-135M), Llama-2-7B and Llama-2-13B shapes on a
24 GB and an 80 GB card: the bytes of the base (fp16; 4-bit GPTQ as the engine holds it:
4-bit codes plus an fp16 scale and zero point per group and output column, group 128 --
64 for the default model, whose hidden size 576 is no multiple of 128 -- embedding, norms
and lm_head in fp16), of the adapter pool (100 slots of rank 16 on all seven projections,
fp16: exactly 100 such adapters), of the KV cache per token (fp16), and from those: what
fits on each card beside the base -- adapters beside a fixed KV budget, KV tokens beside
100 adapters. A card's usable share is 90% (the rest: CUDA context, activations,
allocator slack; vLLM's default `gpu_memory_utilization`).

Measured on the CPU for the default model: the engine is built both ways (float16, the
4-bit one from an RTN 4-bit checkpoint written for the purpose -- quality does not matter
here) with 100 adapter slots of rank 16 and the same KV cache, and every tensor it holds
is summed by kind (base, adapter pool, KV cache), storages counted once; the process's
RSS growth is reported beside. The computed and measured bytes must agree (a test checks
it). Writes bench/results/memory.json, .md and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30
CARDS_GB = (24, 80)
USABLE = 0.9
FP16 = 2
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    group: int  # 4-bit group size

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


LLAMA2_7B = Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, tied=False, group=128)
LLAMA2_13B = Shape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, tied=False, group=128)


def shape_of_model_dir(model_dir: Path) -> Shape:
    raw = json.loads((model_dir / "config.json").read_text())
    return Shape(model_dir.name, raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"],
                 raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"],
                 raw["vocab_size"], bool(raw.get("tie_word_embeddings")), group=64)


# ------------------------------------------------------------------------------ computed

def projection_weights(shape: Shape) -> int:
    return shape.layers * sum(k * n for k, n in shape.projections().values())


def other_weights(shape: Shape) -> int:
    """Embedding, lm_head (when untied) and the RMSNorm weights: never quantized."""
    return shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden * (2 * shape.layers + 1)


def base_bytes(shape: Shape, bits: int | None) -> int:
    """The base as the engine holds it: fp16 (bits None) or `bits`-bit GPTQ."""
    if bits is None:
        return (projection_weights(shape) + other_weights(shape)) * FP16
    quantized = 0
    for k, n in shape.projections().values():
        groups = -(-k // shape.group)
        quantized += k * n * bits // 8 + groups * n * 2 * FP16  # codes + fp16 scale and zero point
    return shape.layers * quantized + other_weights(shape) * FP16


def adapter_pool_bytes(shape: Shape, slots: int, rank: int) -> int:
    """`slots` slots of rank `rank` on all seven projections, fp16 (A [r, in] and B [out, r])."""
    return slots * rank * shape.layers * sum(k + n for k, n in shape.projections().values()) * FP16


def kv_bytes_per_token(shape: Shape) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * FP16


def card_rows(shape: Shape, adapters: int, rank: int, kv_tokens: int) -> list[dict]:
    rows = []
    pool = adapter_pool_bytes(shape, adapters, rank)
    per_adapter = adapter_pool_bytes(shape, 1, rank)
    kv = kv_bytes_per_token(shape) * kv_tokens
    for precision, bits in (("fp16", None), ("4-bit", 4)):
        base = base_bytes(shape, bits)
        for card in CARDS_GB:
            usable = USABLE * card * GiB
            total = base + pool + kv
            rows.append({
                "model": shape.name, "base": precision, "card_GB": card, "base_GiB": base / GiB,
                "adapters_GiB": pool / GiB, "kv_GiB": kv / GiB, "total_GiB": total / GiB,
                "fits": total <= usable,
                "adapters_that_fit": max(0, int((usable - base - kv) // per_adapter)),
                "kv_tokens_that_fit": max(0, int((usable - base - pool) // kv_bytes_per_token(shape))),
            })
    return rows


# ------------------------------------------------------------------------------ measured

def _storage_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def runner_bytes(runner) -> dict[str, int]:  # noqa: ANN001  (a ModelRunner)
    """Bytes of the weights, adapter pool and KV cache a runner holds; each storage counted once."""
    import torch

    from inlaid.engine.lora import LoraLinear

    seen: set[int] = set()
    kv = _storage_bytes([t for pair in runner.kv_caches for t in pair], seen)
    pool = []
    for module in runner.model.modules():
        if isinstance(module, LoraLinear):
            pool += [module.stacked_a, *module.lora_b, module.slot_ranks, module.slot_scales]
            if module.fused is not None:
                pool += [module.fused.combined, module.fused.shrink]
    adapters = _storage_bytes([t for t in pool if t is not None], seen)
    base_tensors = []
    for module in runner.model.modules():
        base_tensors += list(module.parameters(recurse=False))  # buffers: the rotary table, 64 bytes
        for prepared in getattr(module, "quantized", None) or []:
            base_tensors += [v for v in vars(prepared).values() if isinstance(v, torch.Tensor)]
            base_tensors += [v for v in vars(prepared.layout).values() if isinstance(v, torch.Tensor)]
    return {"base": _storage_bytes(base_tensors, seen), "adapters": adapters, "kv": kv}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_rtn_checkpoint(model_dir: Path, out: Path, bits: int, group: int) -> Path:
    """Every projection of the model RTN-quantized into a GPTQ checkpoint (fast; for sizes)."""
    from inlaid.engine.weights import read_state_dict
    from inlaid.quant.checkpoint import CheckpointMetadata, pack_linear, write_checkpoint
    from inlaid.quant.gptq import rtn_quantize
    from inlaid.quant.spec import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group)
    state = read_state_dict(model_dir)
    packed = {}
    for name in [n for n in state if n.rsplit(".", 2)[-2] in PROJECTIONS and n.endswith(".weight")]:
        packed.update(pack_linear(name.removesuffix(".weight"), rtn_quantize(state.pop(name), spec)))
    write_checkpoint(out, model_dir, json.loads((model_dir / "config.json").read_text()), packed, state, spec,
                     CheckpointMetadata(method="rtn", tasks=[], spec={"bits": bits, "group_size": group}))
    return out


def measure(model_dir: Path, shape: Shape, adapters: int, rank: int, kv_tokens: int) -> list[dict]:
    """Build the engine both ways on the CPU; the bytes it holds, and one decode step's proof
    that it runs."""
    import torch

    from inlaid.engine.config import EngineConfig
    from inlaid.engine.runner import ModelRunner
    from inlaid.protocol import BatchPlan, ChunkPlan, SamplingParams

    block_size = 16
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_rtn_checkpoint(model_dir, Path(tmp) / "rtn4", 4, shape.group)
        for precision, quantized in (("fp16", None), ("4-bit", str(checkpoint))):
            gc.collect()
            before = _rss()
            runner = ModelRunner(EngineConfig(
                model_dir=str(model_dir), quantized_dir=quantized, dtype="float16", pack_weights=False,
                max_lora_slots=adapters, max_lora_rank=rank, block_size=block_size,
                num_kv_blocks=-(-kv_tokens // block_size)))
            held = runner_bytes(runner)
            started = time.perf_counter()
            plan = BatchPlan(step_id=0, chunks=[ChunkPlan(seq_id=0, token_ids=[1], start_pos=0, block_table=[0],
                                                          adapter_slot=0, sample=True, sampling=SamplingParams(),
                                                          num_generated=0)])
            token = runner.execute(plan).sampled[0].token_id
            rows.append({"model": shape.name, "base": precision, **{f"{k}_bytes": v for k, v in held.items()},
                         "total_bytes": sum(held.values()), "rss_growth_bytes": _rss() - before,
                         "step_seconds": time.perf_counter() - started, "sampled_token": token,
                         "torch_threads": torch.get_num_threads()})
            del runner
    return rows


# ------------------------------------------------------------------------------ report

def _markdown(result: dict) -> str:
    lines = ["# Memory: 4-bit base vs fp16 base, 100 adapters, same KV budget", "",
             f"{result['adapters']} adapters of rank {result['rank']} on all seven projections (fp16 pool), "
             f"KV budget {result['kv_tokens']} tokens (fp16); a card's usable share {int(USABLE * 100)}%. "
             "GiB = 2^30 bytes.", "",
             "| model | base | card | base GiB | adapters GiB | KV GiB | total GiB | fits | adapters that fit beside base + KV | KV tokens that fit beside base + adapters |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["computed"]:
        lines.append(f"| {r['model']} | {r['base']} | {r['card_GB']} GB | {r['base_GiB']:.2f} | {r['adapters_GiB']:.2f} | "
                     f"{r['kv_GiB']:.2f} | {r['total_GiB']:.2f} | {'yes' if r['fits'] else '**no**'} | "
                     f"{r['adapters_that_fit']} | {r['kv_tokens_that_fit']} |")
    if result.get("measured"):
        lines += ["", f"Measured on the CPU ({result['machine']}), the engine holding the same "
                      "configuration (tensor bytes by kind, each storage once; RSS growth while building it):", "",
                  "| model | base | base MiB (computed) | adapters MiB (computed) | KV MiB (computed) | RSS growth MiB |",
                  "|---|---|---|---|---|---|"]
        for m in result["measured"]:
            c = m["computed_bytes"]
            lines.append(f"| {m['model']} | {m['base']} | {m['base_bytes'] / 2**20:.1f} ({c['base'] / 2**20:.1f}) | "
                         f"{m['adapters_bytes'] / 2**20:.1f} ({c['adapters'] / 2**20:.1f}) | "
                         f"{m['kv_bytes'] / 2**20:.1f} ({c['kv'] / 2**20:.1f}) | {m['rss_growth_bytes'] / 2**20:.0f} |")
    lines += ["", f"Load average while measuring: {result['load_average']}."]
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["computed"] if r["card_GB"] == CARDS_GB[0]]
    labels = [f"{r['model'].removesuffix('-Instruct')}\n{r['base']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(rows)
    for key, label, colour in (("base_GiB", "base", "#4c72b0"), ("adapters_GiB", f"{result['adapters']} adapters", "#dd8452"),
                               ("kv_GiB", f"KV, {result['kv_tokens']} tokens", "#55a868")):
        values = [r[key] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=label, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    for card in CARDS_GB:
        ax.axhline(USABLE * card, color="grey", linestyle="--", linewidth=1)
        ax.text(-0.4, USABLE * card, f"{card} GB card (90%)", va="bottom", ha="left", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title("fp16 vs 4-bit base, same adapters and KV budget")
    ax.legend(loc="upper center")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kv-tokens", type=int, default=16384)
    parser.add_argument("--no-measure", action="store_true", help="computed table only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for memory.json/.md/.png")
    # main() from bench/run_all.py gets no argv: never read the caller's sys.argv
    args = parser.parse_args(argv if argv is not None else [])
    from inlaid.models.prepare import prepare_default_model

    model_dir = Path(prepare_default_model(quiet=True))
    default = shape_of_model_dir(model_dir)
    result: dict = {"adapters": args.adapters, "rank": args.rank, "kv_tokens": args.kv_tokens,
                    "shapes": [asdict(s) for s in (default, LLAMA2_7B, LLAMA2_13B)],
                    "machine": f"{platform.machine()} CPU", "load_average": [round(x, 2) for x in os.getloadavg()]}
    result["computed"] = [row for shape in (default, LLAMA2_7B, LLAMA2_13B)
                          for row in card_rows(shape, args.adapters, args.rank, args.kv_tokens)]
    if not args.no_measure:
        result["measured"] = measure(model_dir, default, args.adapters, args.rank, args.kv_tokens)
        for row in result["measured"]:
            bits = None if row["base"] == "fp16" else 4
            row["computed_bytes"] = {"base": base_bytes(default, bits),
                                     "adapters": adapter_pool_bytes(default, args.adapters, args.rank),
                                     "kv": kv_bytes_per_token(default) * args.kv_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2))
    (args.out / "memory.md").write_text(_markdown(result))
    _plot(result, args.out / "memory.png")
    print(_markdown(result))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
