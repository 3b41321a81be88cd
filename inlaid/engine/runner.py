"""The executor side: owns weights, KV cache and adapter pool; runs one BatchPlan a step.

It is stateless about scheduling: the plan says which tokens to compute, where their
keys/values go (block tables) and which adapters to load into which slots.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from inlaid.engine.adapter_cache import HOST_ADAPTER_CACHE_POOLS, HostAdapterCache
from inlaid.engine.adapter_config import AdapterError
from inlaid.engine.adapter_weights import max_weights_bytes
from inlaid.engine.attention_groups import attention_group, row_attention_group
from inlaid.engine.config import EngineConfig, ModelConfig, ModelLoadError
from inlaid.engine.cuda_graphs import DecodeGraphs
from inlaid.engine.lora import LoraBatch, LoraLinear, install_adapter
from inlaid.engine.model import ForwardBatch, LlamaModel
from inlaid.engine.sampler import RowFailure, sample_tokens
from inlaid.engine.weights import is_gptq_checkpoint, load_model, prepare_module, quantized_slices
from inlaid.kernels import attention_native
from inlaid.kernels.attention_native import native_attention_available, native_attention_fits
from inlaid.kernels.dispatch import lora_host_segments
from inlaid.protocol import AdapterLoad, BatchPlan, ChunkPlan, ErrorCode, SampledToken, SequenceFailure, StepResult

log = logging.getLogger("inlaid.engine")
_SLICE_OF = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def step_order(chunks: list[ChunkPlan]) -> list[ChunkPlan]:
    """A step's chunks in batch order: decode tokens first, then prompt chunks (each low-bit
    projection multiplies the two parts by their own routes, `ForwardBatch.prompt_rows_start`);
    within each part the tokens of one adapter are contiguous, so they form one LoRA segment."""
    return sorted(chunks, key=lambda chunk: (len(chunk.token_ids) > 1, chunk.adapter_slot))


def _check_quantized_dir(quantized_dir: Path) -> None:
    """ModelLoadError unless `quantized_dir` is a GPTQ checkpoint the engine serves quantized:
    without a quantization_config in its config.json the loader read it as a float model, and
    `--quantized <float model>` silently ran unquantized."""
    from inlaid.quant.checkpoint_files import quantized_dir_problem

    problem = quantized_dir_problem(quantized_dir,
                                    float_hint="a float model goes in as the model, not as the quantized checkpoint")
    if problem is None and not is_gptq_checkpoint(quantized_dir):  # AutoGPTQ's quantize_config.json alone
        problem = (f"{quantized_dir}: config.json has no GPTQ quantization_config (quantize_config.json alone): "
                   "not a quantized checkpoint the engine serves")
    if problem is not None:
        raise ModelLoadError(f"cannot load the quantized checkpoint {quantized_dir}: {problem}")


class ModelRunner:
    def __init__(self, config: EngineConfig, host_adapter_cache: int = 64, model: LlamaModel | None = None,
                 host_adapter_cache_bytes: int | None = None) -> None:
        """`model`: an already built model for `config` (benchmarks with random weights);
        by default it is loaded from the config's directories. `host_adapter_cache` (entries)
        and `host_adapter_cache_bytes` (default: HOST_ADAPTER_CACHE_POOLS slot pools) bound
        the host copies of adapters; the least recently loaded go first."""
        config.validate()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ModelLoadError(f"device {config.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s) (torch {torch.__version__})")
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.weight_dtype = self.dtype if config.weight_dtype == "auto" else resolve_dtype(config.weight_dtype, self.device)
        self.model_config = ModelConfig.from_dir(config.model_dir)
        weights_dir = config.quantized_dir or config.model_dir
        if model is None and config.quantized_dir:
            _check_quantized_dir(Path(config.quantized_dir))
        self.model: LlamaModel = model if model is not None else load_model(
            self.model_config, weights_dir, self.dtype, self.device, config.quant_kernel, self.weight_dtype,
            config.batch_invariant)
        self.model.eval()
        mc = self.model_config
        # With decode graphs, one block past the scheduler's blocks takes the padding rows' writes.
        num_blocks = config.num_kv_blocks + (1 if config.cuda_graphs else 0)
        self.kv_caches = [
            tuple(
                torch.zeros(num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(2)
            )
            for _ in range(mc.num_layers)
        ]
        self._attention_fits_native = native_attention_fits(self.dtype, self.device, mc.num_heads, mc.num_kv_heads,
                                                            mc.head_dim)
        self.linears: dict[tuple[int, str], tuple[LoraLinear, int]] = {}
        for layer_index, layer in enumerate(self.model.layers):
            for projection, (module_path, slice_index) in _SLICE_OF.items():
                linear = layer.get_submodule(module_path)
                self.linears[(layer_index, projection)] = (linear, slice_index)
        for module in self.model.modules():
            if isinstance(module, LoraLinear):
                module.allocate_lora(config.max_lora_slots, config.max_lora_rank, self.dtype, self.device)
                module.fuse_lora_expand(pack=config.pack_weights)
        if config.pack_weights:
            self.model.pack_weights()
        # The quantization version each decoder layer serves (0: the checkpoint's own).
        self.layer_versions = [0] * mc.num_layers
        self._quant_format: tuple[int, int] | None = None
        if config.quantized_dir and is_gptq_checkpoint(Path(config.quantized_dir)):
            quant = json.loads((Path(config.quantized_dir) / "config.json").read_text())["quantization_config"]
            self._quant_format = (int(quant["bits"]), int(quant["group_size"]))
        if host_adapter_cache_bytes is None:
            slot_elements = config.max_lora_rank * sum(linear.in_features + linear.out_slices[index]
                                                       for linear, index in self.linears.values())
            host_adapter_cache_bytes = (HOST_ADAPTER_CACHE_POOLS * config.max_lora_slots * slot_elements
                                        * torch.empty((), dtype=self.dtype).element_size())
        self.host_adapters = HostAdapterCache(mc.num_layers, host_adapter_cache, host_adapter_cache_bytes,
                                              max_weights_bytes(mc, config.max_lora_rank))
        self.slot_contents: dict[int, str] = {}  # slot -> adapter path (for introspection and tests)
        self._load_failures_logged: set[tuple[str, str]] = set()  # (adapter, exception type)
        self.decode_graphs: DecodeGraphs | None = None
        if config.cuda_graphs:
            self.decode_graphs = DecodeGraphs.for_runner(
                self.model, self.kv_caches, max_num_seqs=config.max_num_seqs, max_context=config.context_length(mc),
                block_size=config.block_size, num_kv_blocks=config.num_kv_blocks)

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> list[int]:
        """Capture every decode graph now (the executor calls this at start on CUDA); returns
        the captured batch sizes. Without `EngineConfig.cuda_graphs`, captures nothing."""
        return self.decode_graphs.capture() if self.decode_graphs is not None else []

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, slot: int, name: str, path: str, signature: str = "") -> None:
        if not 0 <= slot < self.config.max_lora_slots:
            raise ValueError(f"slot {slot} out of range (0..{self.config.max_lora_slots - 1})")
        copy = self.host_adapters.get(name, path, signature)
        install_adapter(self.linears, copy.spec, copy.tensors, slot, self.config.max_lora_rank)
        self.slot_contents[slot] = path
        if self.decode_graphs is not None:
            self.decode_graphs.weights_changed()

    def forget_adapters(self, paths: list[str]) -> None:
        """Drop the host copies of adapters no task serves any more (`BatchPlan.adapter_drops`).
        A device slot that still holds one is left as it is: the slot pool is allocated once,
        so clearing it frees nothing, and the coordinator freed the slot for the next load to
        overwrite. A later load of the same path reads the files again."""
        self.host_adapters.forget(paths)

    # ------------------------------------------------------------------ quantized layers
    def swap_layer(self, layer: int, version: int, tensors: dict[str, torch.Tensor]) -> None:
        """Install a re-quantized decoder layer: `tensors` are its seven linears' GPTQ tensors
        (`model.layers.{layer}.<projection>.qweight` ...). Call between steps. Every projection
        is prepared before any is installed, so a bad layer leaves the old one whole."""
        from inlaid.quant.checkpoint import take_quant_linears  # reading what the quantizer wrote

        if self._quant_format is None:
            raise ValueError("this executor serves no GPTQ checkpoint: there is no quantized layer to swap")
        if not 0 <= layer < self.model_config.num_layers:
            raise ValueError(f"layer {layer} out of range (0..{self.model_config.num_layers - 1})")
        prefix = f"model.layers.{layer}."
        stray = sorted(key for key in tensors if not key.startswith(prefix))
        if stray:
            raise ValueError(f"a swap of layer {layer} holds tensors of other layers, e.g. {stray[:2]}")
        bits, group_size = self._quant_format
        raw = {key: tensor.to(self.device) for key, tensor in tensors.items()}
        linears = take_quant_linears(raw, bits, group_size, f"layer {layer} swap")
        if raw:
            raise ValueError(f"a swap of layer {layer} holds unexpected tensors {sorted(raw)[:3]}")
        slices = quantized_slices(self.model, linears)
        modules = {f"layers.{layer}.{path}" for path, _ in _SLICE_OF.values()}
        if set(slices) != modules:
            raise ValueError(f"a swap of layer {layer} must hold every projection of it, got {sorted(linears)}")
        prepared = {}
        for module_path, module_slices in slices.items():
            module = self.model.get_submodule(module_path)
            for index, weights in module_slices.items():
                if (weights.in_features, weights.out_features) != (module.in_features, module.out_slices[index]):
                    raise ValueError(f"{module_path} slice {index}: got {weights.in_features}x{weights.out_features}, "
                                     f"the model has {module.in_features}x{module.out_slices[index]}")
            prepared[module_path] = prepare_module(self.model, module_path, module_slices, self.device, self.dtype,
                                                   self.config.quant_kernel, f"layer {layer} swap",
                                                   self.config.batch_invariant)
        for module_path, parts in prepared.items():
            self.model.get_submodule(module_path).use_quantized(parts)
        self.layer_versions[layer] = version
        if self.decode_graphs is not None:  # the captured graphs read the old layer's tensors
            self.decode_graphs.weights_changed()

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def execute(self, plan: BatchPlan) -> StepResult:
        """Run one plan. A sequence whose adapter cannot be loaded, or whose token cannot be
        sampled, fails alone (`StepResult.failed`); the rest of the step is computed. Only
        an exception in the shared forward pass fails the whole plan."""
        started = time.perf_counter()
        self.forget_adapters(plan.adapter_drops)  # before the loads: a dropped path that comes back is read afresh
        load_errors = self._load_adapters_isolated(plan.adapter_loads)
        failed: list[SequenceFailure] = []
        runnable: list[ChunkPlan] = []
        for chunk in plan.chunks:
            if chunk.adapter_slot in load_errors:
                failed.append(SequenceFailure(seq_id=chunk.seq_id, code=ErrorCode.ADAPTER_FAILED,
                                              message=load_errors[chunk.adapter_slot][1]))
            else:
                runnable.append(chunk)
        sampled: list[SampledToken] = []
        if runnable:
            seq_ids, logits, chunks = self._forward_chunks(runnable)
            outcomes = sample_tokens(logits, [c.sampling for c in chunks], [c.num_generated for c in chunks])
            for seq_id, outcome in zip(seq_ids, outcomes):
                if isinstance(outcome, RowFailure):
                    failed.append(SequenceFailure(seq_id=seq_id, code=ErrorCode.EXECUTOR_FAILED,
                                                  message=outcome.reason))
                else:
                    sampled.append(SampledToken(seq_id=seq_id, token_id=outcome))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return StepResult(
            step_id=plan.step_id,
            sampled=sampled,
            num_tokens=sum(len(c.token_ids) for c in runnable),
            compute_seconds=time.perf_counter() - started,
            failed=failed,
            failed_adapters=[name for name, _ in load_errors.values()],
        )

    def _load_adapters_isolated(self, loads: list[AdapterLoad]) -> dict[int, tuple[str, str]]:
        """Load each adapter on its own; returns {slot: (adapter name, why it failed)}."""
        errors: dict[int, tuple[str, str]] = {}
        for load in loads:
            try:
                self.load_adapter(load.slot, load.name, load.path, load.signature)
            except AdapterError as error:  # the adapter's files: the message says what is wrong with them
                self.slot_contents.pop(load.slot, None)
                errors[load.slot] = (load.name, f"adapter {load.name!r} could not be loaded: {error}")
            except Exception as error:  # noqa: BLE001 - any failure costs this adapter's sequences only
                self.slot_contents.pop(load.slot, None)
                errors[load.slot] = (load.name, f"adapter {load.name!r} could not be loaded: "
                                                f"{type(error).__name__}: {error}")
                # a fault of the engine's, not of the files: its traceback, once for each such
                # failure (one message per request, naming no cause, was all: an outside probe)
                if (seen := (load.name, type(error).__name__)) not in self._load_failures_logged:
                    self._load_failures_logged.add(seen)
                    log.exception("an adapter load failed in the engine", extra={"adapter": load.name,
                                                                                  "path": load.path})
        return errors

    @torch.inference_mode()
    def forward_logits(self, plan: BatchPlan) -> tuple[list[int], torch.Tensor, list[ChunkPlan]]:
        """Run the plan's forward; return (seq ids, float32 logits [B, V], chunks) of sampled rows."""
        self.forget_adapters(plan.adapter_drops)
        for load in plan.adapter_loads:
            self.load_adapter(load.slot, load.name, load.path, load.signature)
        return self._forward_chunks(plan.chunks)

    @torch.inference_mode()
    def forward_hidden(self, plan: BatchPlan) -> tuple[list[ChunkPlan], torch.Tensor, list[int]]:
        """Run the plan's forward; return (its chunks in batch order, the final hidden states
        [T, H] of every token, the row of each chunk's first token). `model.logits` of any
        rows gives their next-token logits (teacher-forced scoring uses all of them)."""
        self.forget_adapters(plan.adapter_drops)
        for load in plan.adapter_loads:
            self.load_adapter(load.slot, load.name, load.path, load.signature)
        chunks = step_order(plan.chunks)
        batch, last_token_rows = self._build_batch(chunks)
        hidden = self.model(batch, self.kv_caches)
        first_rows = [last - len(chunk.token_ids) + 1 for chunk, last in zip(chunks, last_token_rows)]
        return chunks, hidden, first_rows

    def _forward_chunks(self, plan_chunks: list[ChunkPlan]) -> tuple[list[int], torch.Tensor, list[ChunkPlan]]:
        chunks = step_order(plan_chunks)
        hidden = self.decode_graphs.run(chunks) if self.decode_graphs is not None else None
        if hidden is not None:  # a decode step replayed from a graph: chunk i on row i
            last_token_rows = list(range(len(chunks)))
        else:
            batch, last_token_rows = self._build_batch(chunks)
            hidden = self.model(batch, self.kv_caches)
        sampled = [(chunk, row) for chunk, row in zip(chunks, last_token_rows) if chunk.sample]
        rows = torch.tensor([row for _, row in sampled], dtype=torch.long, device=self.device)
        logits = self.model.logits(hidden[rows])
        return [chunk.seq_id for chunk, _ in sampled], logits, [chunk for chunk, _ in sampled]

    def _build_batch(self, chunks: list[ChunkPlan]) -> tuple[ForwardBatch, list[int]]:
        block_size = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        offsets: list[int] = []
        for chunk in chunks:
            offsets.append(len(input_ids))
            input_ids.extend(chunk.token_ids)
            for position in range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)):
                positions.append(position)
                slot_mapping.append(chunk.block_table[position // block_size] * block_size + position % block_size)
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        position_rows = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.config.batch_invariant and self._native_decode_attention:
            # Every row its own query of the native kernel (attention_groups.py): torch's attention
            # of a whole prompt and of a chunk of it sum in other orders.
            fresh, groups = [], [row_attention_group(chunks, position_rows, block_size)]
        else:
            # Whole prompts attend only themselves: each on its own (model.py, fresh_prompt_spans).
            fresh = [i for i in prefill if chunks[i].start_pos == 0]
            continued = [i for i in prefill if chunks[i].start_pos > 0]
            groups = [attention_group([chunks[i] for i in g], [offsets[i] for i in g], block_size, self.device,
                                      self.dtype, self._native_decode_attention) for g in (decode, continued) if g]

        lora = None
        if any(chunk.adapter_slot >= 0 for chunk in chunks):
            starts, slots = [0], []
            for chunk, offset in zip(chunks, offsets):
                end = offset + len(chunk.token_ids)
                if slots and slots[-1] == chunk.adapter_slot:
                    starts[-1] = end
                else:
                    slots.append(chunk.adapter_slot)
                    starts.append(end)
            segment_starts = torch.tensor(starts, dtype=torch.int32, device=self.device)
            segment_slots = torch.tensor(slots, dtype=torch.int32, device=self.device)
            host = None
            if self.device.type == "cpu":
                host = lora_host_segments(segment_starts, segment_slots, len(input_ids), self.config.max_lora_slots,
                                          row_invariant=self.config.batch_invariant)
            lora = LoraBatch(segment_starts=segment_starts, segment_slots=segment_slots, host=host)
        device = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=position_rows,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            groups=groups,
            lora=lora,
            # Only where the chunks come in step_order: every decode token before every prompt.
            prompt_rows_start=offsets[prefill[0]] if prefill and prefill[0] == len(decode) else None,
            fresh_prompt_spans=[(offsets[i], offsets[i] + len(chunks[i].token_ids)) for i in fresh],
        )
        last_rows = [offset + len(chunk.token_ids) - 1 for chunk, offset in zip(chunks, offsets)]
        return batch, last_rows

    @property
    def _native_decode_attention(self) -> bool:
        """Whether decode groups read the cache in place (kernels/attention_native.py) instead
        of gathering it for SDPA: float32 on the CPU, where the kernel built."""
        return self._attention_fits_native and attention_native.USE_NATIVE and native_attention_available()
