"""GPU suite, serving stage: its inputs (bench/gpu_serving.py runs the servers on them).

The model of the default model's SHAPE with random weights and the default tokenizer (carried
to the GPU machine: `bench/gpu.sh --fetch-wheels`), its 4-bit RTN checkpoint, NUM_TASKS random
LoRA adapters, and the trace (Gamma arrivals, Zipf popularity, the 4-bit suite base's recorded
lengths, each request asking for exactly its output length).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRIED_TOKENIZER = ROOT / ".gpu_carry" / "tokenizer"  # bench/gpu.sh --fetch-wheels puts it there
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ServingSettings:
    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    num_tasks: int = 32
    rank: int = 16
    bits: int = 4
    group_size: int = 128
    trace_requests: int = 400
    burst_requests: int = 128
    isolated_requests: int = 3
    load: float = 0.8
    cv: float = 4.0
    max_output_tokens: int = 256  # longer recorded outputs are cut (the stage must fit its call)
    budget_s: float = 280.0  # the stage's end, preparation included (the suite must end within its call)
    min_system_s: float = 30.0  # a system is not started with less left than this
    max_num_seqs: int = 64
    device: str = "cuda"
    dtype: str = "float16"


DRY_RUN = ServingSettings(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, num_tasks=4, rank=4, group_size=32,
                          trace_requests=10, burst_requests=6, isolated_requests=1, max_output_tokens=6,
                          max_num_seqs=8, device="cpu", dtype="float32", budget_s=120.0)


def tokenizer_dir() -> Path | None:
    if (CARRIED_TOKENIZER / "tokenizer.json").is_file():
        return CARRIED_TOKENIZER
    from inlaid.models.prepare import default_model_dir

    default = default_model_dir()
    return default if (default / "tokenizer.json").is_file() else None


def build_model(settings: ServingSettings, tokenizer: Path, directory: Path) -> Path:
    """A Llama of the settings' shape, random weights (std 0.02), fp32 safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=settings.hidden, intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.02,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    copy_tokenizer(tokenizer, directory)
    return directory


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files of a model directory (bench/gpu.sh --fetch-wheels carries them)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def build_adapters(settings: ServingSettings, model_dir: Path, directory: Path) -> dict[str, Path]:
    """NUM_TASKS PEFT LoRA adapters: one written by PEFT, the others its copies with fresh
    random A and B (B small, as trained adapters' updates are)."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, target_modules=TARGETS,
                             init_lora_weights=False, lora_dropout=0.0)
    first = directory / "task-0000"
    peft.get_peft_model(model, config).save_pretrained(str(first))
    weights_file = first / "adapter_model.safetensors"
    template = load_file(str(weights_file))
    adapters = {}
    for index in range(settings.num_tasks):
        name = f"task-{index:04d}"
        target = directory / name
        if index:
            shutil.copytree(first, target)
        generator = torch.Generator().manual_seed(index)
        fresh = {key: torch.randn(tensor.shape, generator=generator) * (0.002 if "lora_B" in key else 0.05)
                 for key, tensor in template.items()}
        save_file(fresh, str(target / "adapter_model.safetensors"))
        adapters[name] = target
    return adapters


def quantize(settings: ServingSettings, model_dir: Path, out_dir: Path) -> Path:
    from inlaid.quant.driver import DriverConfig, quantize_model
    from inlaid.quant.methods import parse_method
    from inlaid.quant.spec import QuantSpec

    quantize_model(DriverConfig(model_dir=model_dir, tasks=[], method=parse_method("rtn", []),
                                spec=QuantSpec(bits=settings.bits, group_size=settings.group_size), out_dir=out_dir,
                                measure_errors=False, save_hessian_state=False, progress=False))
    return out_dir


def make_trace(settings: ServingSettings, adapters: dict[str, Path]):  # noqa: ANN201
    """The trace at rate 1 (scaled later), exact output lengths, and random prompt ids."""
    import numpy as np

    from inlaid.scheduling.suite import SUITE_LENGTHS_4BIT_FILE, load_suite_lengths
    from inlaid.scheduling.traces import TraceSpec, generate_trace

    records = [r for r in load_suite_lengths(SUITE_LENGTHS_4BIT_FILE) if r.split == "eval"]
    spec = TraceSpec(rate=1.0, num_requests=settings.trace_requests, cv=settings.cv, num_tasks=settings.num_tasks,
                     popularity="zipf", seed=5)
    trace = generate_trace(spec, records, {name: settings.rank for name in adapters})
    trace = with_requests(trace, [exact_length(r, settings.max_output_tokens) for r in trace.requests])
    rng = np.random.default_rng(7)
    prompts = {r.source: [int(t) for t in rng.integers(100, 49000, r.prompt_tokens)] for r in trace.requests}
    return trace, prompts


def with_requests(trace, requests: list):  # noqa: ANN001, ANN202
    """`trace`'s tasks and metadata with other requests."""
    return type(trace)(requests, trace.tasks, trace.meta)


def exact_length(request, tokens: int):  # noqa: ANN001, ANN202
    """The request asking for exactly its recorded output length, at most `tokens`."""
    length = max(1, min(request.output_tokens, tokens))
    return replace(request, output_tokens=length, max_tokens=length)
