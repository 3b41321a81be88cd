"""Model and engine configuration. Torch-free: the coordinator reads these too."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
}


class ModelLoadError(RuntimeError):
    """A model directory is missing, unsupported or corrupt."""


# kernels.quant_linear.Mode, which imports torch: this module must not (tests keep them equal).
QUANT_KERNELS = ("auto", "int4", "triton", "dequant", "dense")
_KERNEL_DEVICE = {"int4": "cpu", "triton": "cuda"}  # the kernels that run on one kind of device only
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")
# Upper bounds far past any useful setting: beyond them the executor's allocations (or, for
# the blocks, the coordinator's list of free blocks) fail or swamp the machine.
MAX_BLOCK_SIZE = 1024
MAX_KV_BLOCKS = 1 << 24
MAX_LORA_SLOTS = 1024
MAX_LORA_RANK = 4096
MAX_THREADS = 1024
# Sequences and tokens of one step: beyond these, a step's buffers (the decode graphs' shapes
# and inputs are sized by max_num_seqs) failed to allocate at every executor start.
MAX_NUM_SEQS = 1 << 16
MAX_BATCHED_TOKENS = 1 << 22
# 512 prompt tokens a step beside decodes: a stream beside a 6,000-token prompt paused at most
# 1.8 s instead of 5.6 s on a 2-core CPU, the prompt 4-9 % slower (bench/prefill_stalls.py).
CPU_PREFILL_BESIDE_DECODES = 512


def _shown(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def check_range(name: str, value: Any, low: float, high: float | None = None, *, integer: bool = False,
                low_open: bool = False, what: str | None = None) -> None:
    """Raise ValueError naming `name` unless `value` is a number (an int where `integer`;
    never a bool, NaN or an infinity) from `low` (excluded where `low_open`) up to `high`."""
    kinds = int if integer else (int, float)
    fits = (not isinstance(value, bool) and isinstance(value, kinds)
            and (isinstance(value, int) or math.isfinite(value))  # a huge int cannot become a float
            and (value > low if low_open else value >= low) and (high is None or value <= high))
    if fits:
        return
    bounds = f"{'>' if low_open else '>='} {_shown(low)}" + ("" if high is None else f" and <= {_shown(high)}")
    raise ValueError(f"{name} must be {bounds} ({what or ('an integer' if integer else 'a finite number')}), "
                     f"got {value!r}")


def check_device(name: str, device: Any, quant_kernel: str | None = None) -> None:
    """Raise ValueError unless `device` is one the engine runs on (and, given the kernel of a
    quantized base, one that kernel runs on). Whether this machine has it is asked of torch
    at start-up (`inlaid serve`) or by the runner."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    needed = _KERNEL_DEVICE.get(quant_kernel or "")
    if needed is not None and not device.startswith(needed):
        raise ValueError(f"{name} {device!r}: quant_kernel {quant_kernel!r} runs on {needed} devices only")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Sliding-window attention is not implemented: the usable context is capped at the
    # window, inside which full attention computes the same thing.
    sliding_window: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def parameter_counts(self) -> tuple[int, int, int]:
        """(projections, embedding, other) parameters of the base: the same for every precision.
        The embedding counts an untied head too; other: norms and q/k/v biases."""
        hidden, inter, layers = self.hidden_size, self.intermediate_size, self.num_layers
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = hidden * (q_out + 2 * kv_out) + q_out * hidden + 3 * hidden * inter
        embedding = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)
        other = layers * 2 * hidden + hidden + (layers * (q_out + 2 * kv_out) if self.qkv_bias else 0)
        return per_layer * layers, embedding, other

    @staticmethod
    def from_dir(model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if model_dir.exists() and not model_dir.is_dir():
            raise ModelLoadError(f"{model_dir} is a file, not a model directory (the folder holding config.json)")
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory not found: {model_dir}")
        if not config_path.is_file():
            raise ModelLoadError(f"{model_dir} has no config.json (not a Hugging Face model directory)")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{config_path} is not valid JSON: {error}") from error
        architectures = raw.get("architectures") or []
        architecture = architectures[0] if architectures else ""
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {architecture or '(none)'!r} in {config_path}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        eos = raw.get("eos_token_id")
        generation_path = model_dir / "generation_config.json"
        if generation_path.is_file():
            eos = json.loads(generation_path.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            architecture=architecture,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("attention_bias", architecture == "Qwen2ForCausalLM")),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=raw.get("bos_token_id"),
            sliding_window=int(raw["sliding_window"]) if raw.get("sliding_window") and raw.get("use_sliding_window", True) else None,
            raw=raw,
        )


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs write rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling_type = params.get("rope_type") or params.get("type") or "default"
    if scaling_type not in ("default", "linear", "llama3"):
        raise ModelLoadError(f"unsupported rope scaling type {scaling_type!r}")
    return RopeConfig(
        theta=theta,
        scaling_type=scaling_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


@dataclass
class EngineConfig:
    model_dir: str
    quantized_dir: str | None = None  # a GPTQ checkpoint written by `inlaid quantize`
    quant_kernel: str = "auto"  # auto | int4 | triton | dequant | dense (exact, for references)
    device: str = "cpu"
    dtype: str = "auto"  # activations, KV cache, LoRA: auto = float32 on CPU, bfloat16 on CUDA
    # Dense base projections and the lm_head: auto = dtype. "bfloat16" on a float32 CPU
    # engine halves the weight bytes each decode step streams (bench/engine_cpu.py).
    weight_dtype: str = "auto"
    # CPU: multiply float32/bf16 dense weights through copies packed once for oneDNN
    # (kernels/dense_cpu.py): 1.4-3x faster decode matmuls, at one more copy of the weights.
    pack_weights: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    # Prompt tokens a step computes beside decoding sequences; None: CPU_PREFILL_BESIDE_DECODES
    # on the CPU, the whole budget on CUDA. A step holds every streaming answer up until it
    # ends: an 8,150-token prompt's 2,048-token chunks took 9-12 s a step on a 2-core CPU,
    # pausing streams that long each (an outside probe).
    max_prefill_tokens_beside_decodes: int | None = None
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_lora_slots: int = 8
    max_lora_rank: int = 64
    threads: int | None = None
    # Replay decode steps from captured graphs (inlaid/engine/cuda_graphs.py). On the CPU the
    # same bookkeeping runs eagerly (for tests; slower than off).
    cuda_graphs: bool = False
    # CPU, quantized base: every row through the same low-bit kernel whatever its batch, so a
    # request's 4-bit answer does not depend on the prompts beside it or on chunking (the
    # default routes big prompt steps through a faster bf16 kernel that rounds the weight).
    batch_invariant: bool = False
    # Special-token strings ("<|im_end|>") in a text prompt or a chat message's content:
    # "control" reads them as the control tokens they name (vLLM's and transformers' way: a user
    # can end their turn and open a system one), "text" as the characters they are (OpenAI's).
    special_tokens_in_text: str = "control"

    def prefill_tokens_beside_decodes(self) -> int | None:
        """The prompt tokens a step computes beside decoding sequences (None: no cap)."""
        if self.max_prefill_tokens_beside_decodes is not None:
            return self.max_prefill_tokens_beside_decodes
        return CPU_PREFILL_BESIDE_DECODES if str(self.device).startswith("cpu") else None

    def context_length(self, model: ModelConfig) -> int:
        """The longest sequence served: max_model_len, capped by what the model supports and by
        the KV cache: a sequence that outgrew the whole cache preempted itself and could never
        be admitted again, and held the queue behind it (found by an outside probe with 8
        blocks of 16 and max_model_len 256: silent at token 129). Capped, it ends with
        finish_reason "context" there."""
        limit = min(model.max_position_embeddings, model.sliding_window or 1 << 62, self.num_kv_blocks * self.block_size)
        return min(self.max_model_len or limit, limit)

    def validate(self) -> None:
        for name in ("model_dir", "quant_kernel", "device", "dtype", "weight_dtype"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        check_range("max_num_seqs", self.max_num_seqs, 1, MAX_NUM_SEQS, integer=True)
        check_range("max_num_batched_tokens", self.max_num_batched_tokens, 1, MAX_BATCHED_TOKENS, integer=True)
        if self.max_prefill_tokens_beside_decodes is not None:  # 0 would never finish a prompt beside a stream
            check_range("max_prefill_tokens_beside_decodes", self.max_prefill_tokens_beside_decodes, 1,
                        MAX_BATCHED_TOKENS, integer=True, what="an integer; omit it for the device's default")
        check_range("block_size", self.block_size, 1, MAX_BLOCK_SIZE, integer=True)
        check_range("num_kv_blocks", self.num_kv_blocks, 1, MAX_KV_BLOCKS, integer=True)
        check_range("max_lora_slots", self.max_lora_slots, 1, MAX_LORA_SLOTS, integer=True)
        check_range("max_lora_rank", self.max_lora_rank, 1, MAX_LORA_RANK, integer=True)
        if self.max_model_len is not None:  # 0 is not "the default": it would refuse every request
            check_range("max_model_len", self.max_model_len, 1, integer=True,
                        what="an integer; omit it for the model's length")
        if self.threads is not None:
            check_range("threads", self.threads, 1, MAX_THREADS, integer=True)
        for name in ("pack_weights", "cuda_graphs", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("dtype", "weight_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be auto, float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if self.special_tokens_in_text not in ("control", "text"):
            raise ValueError(f"special_tokens_in_text must be control or text, got {self.special_tokens_in_text!r}")
        if self.quant_kernel not in QUANT_KERNELS:
            raise ValueError(f"quant_kernel must be one of {', '.join(QUANT_KERNELS)}, got {self.quant_kernel!r}")
        check_device("device", self.device, self.quant_kernel if self.quantized_dir else None)
        if self.batch_invariant and not str(self.device).startswith("cpu"):
            raise ValueError(f"batch_invariant is a CPU option (the CPU int4 kernels' routes); "
                             f"device is {self.device!r}")
