"""The transformers + PEFT side of the baseline server: what a user writes by hand.

One `PeftModel` holds every task's adapter; one static batch runs through
`PeftModel.generate(..., adapter_names=[...])` (PEFT's mixed-adapter batches; "__base__"
marks a row without adapter), prompts left-padded. Rows end under the same rules as in
Inlaid (an EOS unless `ignore_eos`, a stop token id, `max_tokens`, the context length, a
stop string; the reason reported the same way), so the same request gets the same tokens,
text and finish reason from either server. The batch runs until its last row ends: what
static batching costs.

Only a batch whose rows share one way of sampling can run together (`generate` takes one
generation config); `sampling_key` names it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from inlaid.protocol import SamplingParams

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def sampling_key(params: SamplingParams) -> tuple:
    """Requests with equal keys can share one `generate` call."""
    if params.temperature == 0.0:
        return ("greedy",)
    return ("sample", params.temperature, params.top_k, params.top_p, params.seed)


@dataclass
class BatchRow:
    """One request in a batch, and what came of it."""

    prompt_ids: list[int]
    task: str | None
    sampling: SamplingParams
    is_abandoned: Callable[[], bool] = lambda: False  # cancelled or past its deadline: stop computing it
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""


@dataclass
class BatchTiming:
    """time.monotonic() instants of one batch."""

    started: float
    first_token_at: float | None = None  # the first forward pass (prefill) done
    forward_passes: int = 0


class PromptEncoder:
    """Prompts to token ids and token ids to text: the tokenizer and the context length, ready
    before the model is (requests are accepted and queued while it loads)."""

    def __init__(self, model_dir: str, max_model_len: int | None) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.vocab_size = int(config.vocab_size)
        limit = int(getattr(config, "max_position_embeddings", None) or 1 << 62)
        self.max_model_len = min(max_model_len or limit, limit)

    def prompt_ids(self, prompt: str | None, messages: list[dict[str, str]] | None,
                   token_ids: list[int] | None) -> list[int]:
        """Token ids of exactly one of a text prompt, chat messages or token ids; ValueError
        with the reason otherwise."""
        if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if messages is not None:
            if not messages:
                raise ValueError("messages must be a non-empty list")
            ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
        elif prompt is not None:
            ids = list(self.tokenizer(prompt, add_special_tokens=False).input_ids)
        else:
            ids = list(token_ids or [])
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _has_private_api(tuner: Any) -> bool:
    """The PEFT internals `add_lora_adapter` calls, with the arguments it passes (PEFT 0.21 here;
    a GPU image may bring another version)."""
    import inspect

    create = getattr(tuner, "_create_and_replace", None)
    if not callable(getattr(tuner, "_check_target_module_exists", None)) or not callable(create):
        return False
    try:
        parameters = inspect.signature(create).parameters
    except (TypeError, ValueError):
        return False
    return "current_key" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def add_lora_adapter(model: Any, name: str, path: str) -> bool:
    """Add a plain LoRA adapter to a PeftModel as `load_adapter` does, through PEFT's own
    per-module `_create_and_replace` on the modules the adapter targets only, then copying its
    weights in. Why: `load_adapter` matches every module of the model,
    the LoRA modules of all earlier adapters included, against every LoRA layer, so the k-th load
    costs ~0.07 k s on the default model and 100 adapters take ~6 minutes: a benchmark's start,
    not its serving. The model that results is the same, weight for weight and module for module
    (tests/test_bench_baseline.py). Returns False, having changed nothing, for an adapter this path
    does not cover (DoRA, rank or alpha patterns, modules to save, ...): use `load_adapter` then."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    config = LoraConfig.from_pretrained(path)
    plain = (not config.use_dora and not config.rank_pattern and not config.alpha_pattern
             and not config.modules_to_save and not config.target_parameters and not config.lora_bias
             and not config.trainable_token_indices and config.layer_replication is None
             and not config.exclude_modules and not getattr(config, "ensure_weight_tying", False))
    if not plain or name in model.peft_config:
        return False
    tuner, inner = model.base_model, model.base_model.model
    if not _has_private_api(tuner):  # another PEFT than this path was written for: the public route
        return False
    # The model's own linear layers (LoRA-wrapped or not), found once: before this path adds any
    # adapter, the walk is short.
    linear_keys: list[str] = getattr(model, "_baseline_linear_keys", None) or [
        key for key, module in inner.named_modules()
        if (isinstance(module, torch.nn.Linear) and ".lora_" not in key and not key.endswith(".base_layer"))
        or hasattr(module, "lora_A")]
    model._baseline_linear_keys = linear_keys
    targets = [key for key in linear_keys if tuner._check_target_module_exists(config, key)]
    weights = load_peft_weights(path, device=str(next(model.parameters()).device))
    if not targets or {key.rsplit(".lora_", 1)[0] for key in weights} != {f"base_model.model.{t}" for t in targets}:
        return False
    config.inference_mode = True
    model.peft_config[name] = config
    for key in targets:
        parent_key, _, target_name = key.rpartition(".")
        tuner._create_and_replace(config, name, inner.get_submodule(key), target_name,
                                  inner.get_submodule(parent_key), current_key=key)
    tuner.targeted_module_names.extend(t for t in targets if t not in tuner.targeted_module_names)
    # Each layer's update_layer has set the active adapters and frozen the new weights; copying
    # them in place is what set_peft_model_state_dict does for plain LoRA keys (cast to the
    # layer's dtype), without its walks over every earlier adapter's parameters.
    with torch.no_grad():
        for key in targets:
            layer = inner.get_submodule(key)
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)[name].weight.copy_(weights[f"base_model.model.{key}.{part}.weight"])
    return True


class HfPeftModel:
    """The base model with every task adapter loaded, on one device."""

    def __init__(self, model_dir: str, tasks: dict[str, str], device: str, dtype: torch.dtype,
                 encoder: PromptEncoder) -> None:
        from peft import PeftModel

        self.encoder = encoder
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.model: Any = base
        for index, (name, path) in enumerate(sorted(tasks.items())):
            if index == 0:
                self.model = PeftModel.from_pretrained(base, path, adapter_name=name)
            elif not add_lora_adapter(self.model, name, path):
                self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        eos = base.generation_config.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = encoder.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        self.tasks = dict(tasks)

    # ------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def run(self, rows: list[BatchRow]) -> BatchTiming:
        """Generate every row to its end (filled into the rows); all rows share a sampling key."""
        timing = BatchTiming(started=time.monotonic())
        width = max(len(row.prompt_ids) for row in rows)
        pad = self.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                                 device=self.device)
        budgets = [min(r.sampling.max_tokens, self.encoder.max_model_len - len(r.prompt_ids)) for r in rows]
        stops = _RowStops(rows, width, self, timing)
        params = rows[0].sampling
        options: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0.0:
            options = {"do_sample": True, "temperature": params.temperature, "top_k": params.top_k,
                       "top_p": params.top_p}
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if self.tasks:  # a PeftModel
            options["adapter_names"] = [row.task or BASE for row in rows]
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max(budgets), pad_token_id=pad,
            eos_token_id=None,  # rows end by _RowStops (per-row EOS rules: ignore_eos)
            stopping_criteria=StoppingCriteriaList([stops]), **options,
        )
        generated = output[:, width:].tolist()
        for index, (row, tokens) in enumerate(zip(rows, generated)):
            end = stops.ends[index] or (len(tokens), "length", False)  # _RowStops ends every row
            row.token_ids = tokens[: end[0]]
            row.finish_reason = end[1]
            row.text = stops.texts[index] if end[2] else self.encoder.decode(row.token_ids)
        return timing


class _RowStops(StoppingCriteria):
    """Ends each row by Inlaid's rules, checked after every generated token: an EOS (unless
    ignore_eos) or a stop token id ends it with 'stop', then max_tokens with 'length', the
    context length with 'context'; a stop string in the text also ends it ('stop' unless a
    token rule fired) and the text is cut before it."""

    def __init__(self, rows: list[BatchRow], width: int, model: HfPeftModel, timing: BatchTiming) -> None:
        self.rows, self.width, self.model, self.timing = rows, width, model, timing
        self.ends: list[tuple[int, str, bool] | None] = [None] * len(rows)  # (tokens kept, reason, cut by a stop string)
        self.texts: list[str] = [""] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        timing = self.timing
        timing.forward_passes += 1
        if timing.first_token_at is None:
            timing.first_token_at = time.monotonic()
        count = input_ids.shape[1] - self.width
        last = input_ids[:, -1].tolist()
        for index, row in enumerate(self.rows):
            if self.ends[index] is not None:
                continue
            params = row.sampling
            token = last[index]
            reason = None
            if (not params.ignore_eos and token in self.model.eos_token_ids) or token in params.stop_token_ids:
                reason = "stop"
            elif count >= params.max_tokens:
                reason = "length"
            elif len(row.prompt_ids) + count >= self.model.encoder.max_model_len:
                reason = "context"
            cut = False
            if params.stop:
                text = self.model.encoder.decode(input_ids[index, self.width :].tolist())
                if not text.endswith("\ufffd"):  # a multi-byte character not complete yet
                    positions = [text.find(stop) for stop in params.stop if stop in text]
                    if positions:
                        self.texts[index] = text[: min(positions)]
                        cut, reason = True, reason or "stop"
            if reason is None and row.is_abandoned():
                reason = "cancelled"
            if reason is not None:
                self.ends[index] = (count, reason, cut)
        return torch.tensor([end is not None for end in self.ends], device=input_ids.device)

