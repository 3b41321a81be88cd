"""A Llama-family decoder over one ragged batch with a paged KV cache.

The whole model in one file (embeddings, RMSNorm, RoPE, grouped-query attention, SwiGLU
MLP, tied or untied lm_head). Every step runs ONE flat batch of tokens that mixes prefill
chunks and decode tokens of many sequences; projections go through `LoraLinear`, which
adds each token's own adapter (segmented LoRA) on top of a dense or low-bit base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from inlaid.engine.config import ModelConfig, RopeConfig
from inlaid.engine.lora import LoraBatch, LoraLinear
from inlaid.kernels.attention_native import decode_attention
from inlaid.kernels.dispatch import PackedDenseWeight, packing_supported


@dataclass
class AttentionGroup:
    """Chunks attended together, padded to the group's longest query and context.

    Every index is flat and built once per step (all layers share it), so each layer
    gathers with `index_select`, several times faster on the CPU than advanced indexing.

    query_rows: int64 [B * N] flat-batch row of each query slot (padding repeats a real row);
        None with query_span
    kv_blocks: int64 [B * L / block_size] cache block of each key block (padding repeats the
        chunk's first block; the mask hides it): keys are gathered whole blocks at a time
    valid_slots: int64 positions of the real queries in the [B * N] grid; None = all real
    output_rows: int64 flat-batch row of each real query, in grid order; None with query_span
    mask: [B, 1, N, L] additive, in the activation dtype: 0 where the query may attend the
        key, -inf where not
    query_span: (start, stop) when the group's queries are exactly flat rows start..stop-1,
        one per chunk (a decode group): queries and outputs are then slices, not gathers
    context_lens: int64 [B] keys each chunk attends, set on a group of one query per chunk
        that takes the native decode attention (kernels/attention_native.py): it reads
        kv_blocks as the [B, L / block_size] block tables, in place, instead of gathering them
    """

    batch_size: int
    max_queries: int
    max_keys: int
    query_rows: torch.Tensor | None
    kv_blocks: torch.Tensor
    valid_slots: torch.Tensor | None
    output_rows: torch.Tensor | None
    mask: torch.Tensor
    query_span: tuple[int, int] | None = None
    context_lens: torch.Tensor | None = None


@dataclass
class ForwardBatch:
    """Everything one step's forward needs, built by the runner.

    input_ids: [T] token ids of the flat batch; positions: [T]
    slot_mapping: [T] flat KV-cache row (block * block_size + offset) each token writes
    groups: attention groups; with fresh_prompt_spans they cover every token exactly once
    fresh_prompt_spans: (start, stop) flat rows of each whole-prompt chunk (nothing of its
        sequence cached before this step): it attends only its own keys, causally, so SDPA
        runs on it alone without a mask or a cache read (padding prompts of different lengths
        to a common grid made ~7x the attention work of a burst of prompts)
    lora: segments of tokens per adapter slot (None: no token uses an adapter)
    prompt_rows_start: rows from this one on are tokens of prompt chunks, the rows before it
        decode tokens (the runner orders them so); None: no such split. Low-bit projections
        multiply the two parts by their own routes (quant_matmul's `prefill`)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    groups: list[AttentionGroup]
    lora: LoraBatch | None
    prompt_rows_start: int | None = None
    fresh_prompt_spans: list[tuple[int, int]] = field(default_factory=list)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype == torch.float32 == self.weight.dtype:
            # torch's fused op: the same arithmetic as below (bit-identical outputs measured),
            # one call instead of seven (~11 us less a norm, 61 norms a step).
            return F.rms_norm(hidden, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 whatever the activation dtype, as the reference models do.
        input_dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling_type == "llama3":
        low_freq_wavelen = rope.original_max_position / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(rope, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = LoraLinear(config.hidden_size, [q_size, kv_size, kv_size], ["q_proj", "k_proj", "v_proj"], bias=config.qkv_bias)
        self.o_proj = LoraLinear(q_size, [config.hidden_size], ["o_proj"], bias=False)
        self.scale = config.head_dim**-0.5

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden, batch.lora, batch.prompt_rows_start)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q and k heads sit side by side in qkv: rotate them in one pass.
        qk = apply_rotary(qkv[:, : q_size + kv_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q = qk[:, : self.num_heads]
        k = qk[:, self.num_heads :]
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)

        key_cache, value_cache = kv_cache  # [num_blocks, block_size, kv_heads, head_dim]
        key_rows = key_cache.view(-1, kv_size)
        value_rows = value_cache.view(-1, kv_size)
        key_blocks = key_cache.view(key_cache.shape[0], -1)
        value_blocks = value_cache.view(value_cache.shape[0], -1)
        key_rows.index_copy_(0, batch.slot_mapping, k.reshape(num_tokens, kv_size))
        value_rows.index_copy_(0, batch.slot_mapping, v.reshape(num_tokens, kv_size))

        q_rows = q.reshape(num_tokens, q_size)
        out = q.new_empty(num_tokens, q_size)
        for group in batch.groups:
            size, queries_per_row, keys_per_row = group.batch_size, group.max_queries, group.max_keys
            span = group.query_span
            queries = q_rows[span[0] : span[1]] if span else q_rows.index_select(0, group.query_rows)
            if group.context_lens is not None:  # one query per chunk: the cache is read in place
                attended = decode_attention(queries.contiguous(), key_cache, value_cache, group.kv_blocks.view(size, -1),
                                            group.context_lens, self.scale)
            else:
                keys = key_blocks.index_select(0, group.kv_blocks)
                values = value_blocks.index_select(0, group.kv_blocks)
                attended = F.scaled_dot_product_attention(
                    queries.view(size, queries_per_row, self.num_heads, self.head_dim).transpose(1, 2),
                    keys.view(size, keys_per_row, self.num_kv_heads, self.head_dim).transpose(1, 2),
                    values.view(size, keys_per_row, self.num_kv_heads, self.head_dim).transpose(1, 2),
                    attn_mask=group.mask,
                    scale=self.scale,
                    enable_gqa=self.num_kv_heads != self.num_heads,
                ).transpose(1, 2).reshape(size * queries_per_row, q_size)
                if group.valid_slots is not None:
                    attended = attended.index_select(0, group.valid_slots)
            if span == (0, num_tokens):  # the whole step is this decode group
                out = attended
            elif span is not None:
                out[span[0] : span[1]] = attended
            else:
                out.index_copy_(0, group.output_rows, attended)
        for start, stop in batch.fresh_prompt_spans:
            length = stop - start
            out[start:stop] = F.scaled_dot_product_attention(
                q[None, start:stop].transpose(1, 2), k[None, start:stop].transpose(1, 2),
                v[None, start:stop].transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )[0].transpose(0, 1).reshape(length, q_size)
        return self.o_proj(out, batch.lora, batch.prompt_rows_start)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = LoraLinear(
            config.hidden_size, [config.intermediate_size] * 2, ["gate_proj", "up_proj"], bias=False
        )
        self.down_proj = LoraLinear(config.intermediate_size, [config.hidden_size], ["down_proj"], bias=False)

    def forward(self, hidden: torch.Tensor, lora: LoraBatch | None, prompt_rows_start: int | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden, lora, prompt_rows_start)
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        return self.down_proj(F.silu(gate) * up, lora, prompt_rows_start)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, cos, sin, batch: ForwardBatch, kv_cache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, batch, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), batch.lora, batch.prompt_rows_start)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        # With tied embeddings the head reuses the embedding matrix (no copy).
        self.lm_head_weight: nn.Parameter | None = (
            None if config.tie_word_embeddings else nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        )
        self.packed_head: PackedDenseWeight | None = None  # set by pack_weights

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head_weight is None else self.lm_head_weight

    def store_weights_as(self, weight_dtype: torch.dtype) -> None:
        """Keep dense projection weights, the embedding and the head in `weight_dtype`;
        activations stay in the dtype of the norms."""
        for module in self.modules():
            if isinstance(module, LoraLinear) and module.weight is not None:
                module.weight.data = module.weight.data.to(weight_dtype)
                module.packed = None  # a packed copy of the old weight would be stale
        self.embed_tokens.weight.data = self.embed_tokens.weight.data.to(weight_dtype)
        if self.lm_head_weight is not None:
            self.lm_head_weight.data = self.lm_head_weight.data.to(weight_dtype)
        self.packed_head = None

    def pack_weights(self) -> None:
        """Multiply float32/bf16 dense weights on the CPU through oneDNN-packed copies (the
        head too, a second copy when tied to the embedding); call once the weights and LoRA
        pools are set up. A no-op for other dtypes and devices."""
        for module in self.modules():
            if isinstance(module, LoraLinear):
                module.pack_weight()
        if packing_supported(self.head_weight()):
            self.packed_head = PackedDenseWeight(self.head_weight().data)

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        hidden = self.embed_tokens(batch.input_ids).to(self.norm.weight.dtype)
        cos, sin = self.rotary(batch.positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, cos, sin, batch, kv_cache)
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.head_weight()
        if self.packed_head is not None:
            return self.packed_head.linear(hidden.to(weight.dtype)).float()
        return F.linear(hidden.to(weight.dtype), weight).float()
