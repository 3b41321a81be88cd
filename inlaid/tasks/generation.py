"""Greedy generation for evaluation, through Inlaid's engine or, as a reference, PEFT.

A request is (prompt text, adapter name or None, max_new_tokens). Both backends take the
whole list at once, so requests of different tasks and adapters share batches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from inlaid.interrupts import was_terminated


class GenerationError(RuntimeError):
    """The engine failed requests (their outputs would be empty text, scored as wrong)."""


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation: `results` holds each request's result, None where it had
    not finished. A KeyboardInterrupt still (a caller that does not look ends as before), so
    that `eval` can keep what finished: it threw away every finished prediction."""

    def __init__(self, results: list[GenerationResult | None], terminated: bool = False) -> None:
        super().__init__()
        self.results = results
        self.terminated = terminated  # SIGTERM (`inlaid.interrupts`), not Ctrl-C


@dataclass
class GenerationRequest:
    prompt: str
    adapter: str | None
    max_new_tokens: int


@dataclass
class GenerationResult:
    text: str
    num_tokens: int
    finish_reason: str


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def engine_available() -> bool:
    try:
        from inlaid.engine import Engine, EngineConfig, SamplingParams  # noqa: F401
        from inlaid.engine.runner import ModelRunner  # noqa: F401
    except ImportError:
        return False
    return True


def generate_with_engine(model_dir: Path, adapters: dict[str, Path], requests: list[GenerationRequest],
                         show_progress: bool = True, threads: int | None = None,
                         dtype: str = "auto", weight_dtype: str = "auto") -> list[GenerationResult]:
    """All requests through Inlaid's engine in one call: it batches across tasks itself.

    Prompts go in as token ids made by the Hugging Face tokenizer without special tokens,
    exactly as training tokenised them.
    """
    from transformers import AutoTokenizer

    from inlaid.engine import Engine, EngineConfig, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_rank = adapters_pool_rank(model_dir, adapters.values(), at_least=64)
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), max_lora_rank=max_rank, threads=threads,
                                      dtype=dtype, weight_dtype=weight_dtype, max_num_seqs=96))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    prompts = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in requests]
    ids = [engine.add_request(prompt, sampling=SamplingParams(temperature=0.0, max_tokens=r.max_new_tokens),
                              adapter=r.adapter) for prompt, r in zip(prompts, requests)]
    eos_ids = set(engine.model_config.eos_token_ids)
    results: list[GenerationResult | None] = [None] * len(requests)
    try:
        # Stepped here, not through `engine.generate`: on Ctrl-C the finished results are kept.
        _run_to_completion(engine, ids, results, tokenizer, eos_ids, show_progress,
                           [r.max_new_tokens for r in requests])
    except KeyboardInterrupt as interrupt:
        raise GenerationInterrupted(results, was_terminated(interrupt)) from None
    failed = sorted({r.adapter or "the base model" for r, o in zip(requests, results) if o and o.finish_reason == "error"})
    if failed:
        # An executor failure ends a request with no tokens; scoring that "" would record a
        # score of 0 for a model that never ran.
        count = sum(o is not None and o.finish_reason == "error" for o in results)
        raise GenerationError(f"the engine failed {count} of {len(results)} requests (adapter {', '.join(failed)}); "
                              "no score recorded")
    return [r for r in results if r is not None]


def _run_to_completion(engine, ids: list[str], results: list[GenerationResult | None], tokenizer,  # type: ignore[no-untyped-def]
                       eos_ids: set[int], show_progress: bool, budgets: list[int]) -> None:
    """Step `engine` until every request in `ids` finished, each result put in `results` (by
    the request's position) as it finishes.

    The bar counts tokens against the requests' max-token budgets (`budgets`, by position), not
    finished requests: a mixed batch decodes side by side and its requests finish near the
    end, so a count of requests sat at 0 % for most of the run. A request that stops early
    counts its unused budget as done when it finishes, so the bar ends at 100 %."""
    from tqdm import tqdm

    position = {rid: index for index, rid in enumerate(ids)}
    budget = {rid: max(1, budgets[index]) for index, rid in enumerate(ids)}
    counted = dict.fromkeys(ids, 0)  # units of each request's budget the bar has shown
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    pending = set(ids)
    # The finished requests' count stays where the count of requests stood (`1/2 [`), after the tokens.
    bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit}{postfix} [{elapsed}<{remaining}, {rate_fmt}]"
    with tqdm(total=sum(budget.values()), desc="generate", unit="tok", bar_format=bar_format,
              disable=not show_progress) as progress:
        progress.set_postfix_str(f"requests 0/{len(ids)}")
        while pending:
            moved = 0
            for output in engine.step():
                if output.request_id not in position:
                    continue
                rid = output.request_id
                tokens[rid].extend(output.new_token_ids)
                if output.finished:
                    pending.discard(rid)
                    kept = tokens[rid]
                    if kept and kept[-1] in eos_ids:
                        kept = kept[:-1]
                    text = tokenizer.decode(kept, skip_special_tokens=True)
                    results[position[rid]] = GenerationResult(text, len(kept), str(output.finish_reason))
                shown = budget[rid] if output.finished else min(len(tokens[rid]), budget[rid])
                moved += shown - counted[rid]
                counted[rid] = shown
            if moved:  # after the results are kept: what the bar counts survives a Ctrl-C
                progress.set_postfix_str(f"requests {len(ids) - len(pending)}/{len(ids)}", refresh=False)
                progress.update(moved)


def adapters_pool_rank(model_dir: Path | str, paths: Iterable[Path | str], at_least: int) -> int:
    """The rank the LoRA pools must hold for these adapters (rank_pattern's too: `r` alone
    sized them), and at least `at_least`; the model's config read once for all of them."""
    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.engine.config import ModelConfig

    num_layers = ModelConfig.from_dir(str(model_dir)).num_layers
    return max([at_least, *(read_adapter_spec(Path(path).name, path).rank_used(num_layers) for path in paths)])


def generate_with_peft(model_dir: Path, adapters: dict[str, Path], requests: list[GenerationRequest],
                       batch_size: int = 16, show_progress: bool = True) -> list[GenerationResult]:
    """Reference path: transformers + PEFT, mixed-adapter batches via `adapter_names`.

    Requests are sorted by (budget, prompt length) so a batch wastes little padding and few
    decode steps; rows of a batch may use different adapters.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    eos_id = tokenizer.eos_token_id
    lengths = [len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (requests[i].max_new_tokens, lengths[i]))
    results: list[GenerationResult | None] = [None] * len(requests)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for batch in tqdm(batches, desc="generate (peft)", disable=not show_progress, file=sys.stderr):
            _peft_batch(model, tokenizer, requests, batch, results, eos_id, bool(adapters))
    except KeyboardInterrupt as interrupt:
        raise GenerationInterrupted(results, was_terminated(interrupt)) from None
    return [r for r in results if r is not None]


def _peft_batch(model, tokenizer, requests: list[GenerationRequest], batch: list[int],  # type: ignore[no-untyped-def]
                results: list[GenerationResult | None], eos_id: int, with_adapters: bool) -> None:
    import torch

    encoded = tokenizer([requests[i].prompt for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    budget = max(requests[i].max_new_tokens for i in batch)
    kwargs = {}
    if with_adapters:
        kwargs["adapter_names"] = [requests[i].adapter or "__base__" for i in batch]
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=budget, do_sample=False, eos_token_id=eos_id,
                                pad_token_id=eos_id, **kwargs)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    for row, index in enumerate(batch):
        tokens = new_tokens[row].tolist()[: requests[index].max_new_tokens]
        finish = "length"
        if eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id)]
            finish = "stop"
        results[index] = GenerationResult(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), finish)
