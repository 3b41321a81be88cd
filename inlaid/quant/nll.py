"""Teacher-forced negative log-likelihood of each task's reference answers, its adapter on:
the low-noise measure of what a quantized base costs a task.

For an example, the text is the chat prompt (generation prompt included) followed by the
reference answer and `<|im_end|>`; prompt and answer are tokenized separately (the answer's
tokens are exactly what the model would have to generate after the prompt's). Only the
answer tokens are scored: nll = -Σ log p(answer_i | prompt, answer_<i). Greedy task metrics
on 50 examples move by several points between runs of the same model; this moves by far
less, and it is scored on every eval example.

The model runs in fp32 through transformers + PEFT (every adapter loaded, the task's own
active; its linears through oneDNN), a float checkpoint or a GPTQ checkpoint's dequantized
weights alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inlaid.quant.calibration import END_OF_TURN, truncated_prompt_answer
from inlaid.quant.model_io import active_adapter, attach_adapters, onednn_linears


@dataclass
class ExampleNll:
    """One example: its id, the summed NLL of its answer tokens (nats), their count, and the
    summed Gini impurity 1 - Σ_v p_v² of the model's distribution at those positions (how
    much a perturbation of the logits can cost there: about ½·(1 - Σp²)·σ² nats for logit
    noise of variance σ²)."""

    id: str
    nll: float
    tokens: int
    impurity: float = 0.0


def load_scoring_model(model_dir: Path, quantized_dir: Path | None = None) -> torch.nn.Module:
    """The base model in fp32; with `quantized_dir`, its linears replaced by that GPTQ
    checkpoint's dequantized weights (exactly the values the checkpoint stores)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if quantized_dir is not None:
        from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint

        state = dequantized_state_dict(load_gptq_checkpoint(quantized_dir))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lm_head" not in key for key in missing):
            raise ValueError(f"{quantized_dir} does not fit {model_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.config.use_cache = False
    return model


def tokenize_example(example: dict, tokenizer, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of one eval example; with `max_tokens`, cut to the
    sample's first `max_tokens` tokens as the calibration passes cut it (`truncated_prompt_answer`)."""
    prompt = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example["reference"] + END_OF_TURN, add_special_tokens=False)["input_ids"]
    return truncated_prompt_answer(prompt_ids, answer_ids, max_tokens)


@torch.no_grad()
def answer_nll(model: torch.nn.Module, tokenizer, examples: list[dict], adapter: str | None = None,
               peft_model=None, max_batch_tokens: int = 2048, max_tokens: int | None = None) -> list[ExampleNll]:
    """Per example, the NLL of its reference answer given its prompt (in the input order).

    With `max_tokens` (mlgptq's cost probe: --max-tokens) each example is its first
    `max_tokens` tokens, only the answer tokens among them scored; an example whose prompt
    fills the limit scores none (0 tokens) and is not run. Without it (evaluation) every token.

    Batches are right-padded sequences of similar length; causal attention keeps the real
    tokens exact without a mask, and the vocabulary projection runs on answer positions only."""
    encoded = [tokenize_example(example, tokenizer, max_tokens) for example in examples]
    results: list[ExampleNll | None] = [None] * len(examples)
    for index, (_, answer_ids) in enumerate(encoded):
        if not answer_ids:  # cut off by max_tokens (an untruncated answer holds at least END_OF_TURN)
            results[index] = ExampleNll(str(examples[index].get("id", index)), 0.0, 0, 0.0)
    scored = [index for index in range(len(examples)) if results[index] is None]
    order = sorted(scored, key=lambda index: len(encoded[index][0]) + len(encoded[index][1]))
    forward_model = peft_model if peft_model is not None else model
    decoder = _decoder_of(forward_model)
    head = model.get_output_embeddings()
    batch: list[int] = []

    def run(indices: list[int]) -> None:
        sequences = [encoded[i][0] + encoded[i][1] for i in indices]
        length = max(len(s) for s in sequences)
        ids = torch.zeros(len(indices), length, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
        hidden = decoder(input_ids=ids).last_hidden_state
        # position p predicts token p + 1: an answer is predicted from p = len(prompt) - 1 on;
        # the vocabulary projection runs once for every answer position of the batch
        spans = [(len(encoded[i][0]) - 1, len(encoded[i][1])) for i in indices]
        states = torch.cat([hidden[row, start : start + count] for row, (start, count) in enumerate(spans)])
        targets = torch.tensor([token for i in indices for token in encoded[i][1]])
        token_nll, impurity = answer_token_scores(head, states, targets)
        counts = [count for _, count in spans]
        for index, piece, spread in zip(indices, torch.split(token_nll, counts), torch.split(impurity, counts)):
            results[index] = ExampleNll(str(examples[index].get("id", index)), float(piece.sum()), len(piece),
                                        float(spread.sum()))

    with active_adapter(peft_model, adapter):
        for index in order:
            size = len(encoded[index][0]) + len(encoded[index][1])
            if batch and (len(batch) + 1) * size > max_batch_tokens:
                run(batch)
                batch = []
            batch.append(index)
        if batch:
            run(batch)
    return results  # type: ignore[return-value]


# Answer positions whose vocabulary distributions are held at once: a float64 log-softmax
# over the vocabulary per position (49,152 entries: ~0.4 MB, ~1 MB with its temporaries)
# held for every answer position took a 2,500-token answer to +2.5 GB; a calibration line's
# (up to 32 KiB) would have needed ~30 GB. In chunks, the peak is this many positions' worth.
SCORED_POSITIONS_PER_CHUNK = 256


def answer_token_scores(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, targets: torch.Tensor,
                        chunk: int = SCORED_POSITIONS_PER_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """For hidden states [n, hidden] and the tokens they predict [n]: each position's NLL of
    its token and Gini impurity 1 - Σ_v p_v², both float64 [n] on the states' device. The
    vocabulary projection and its float64 log-softmax run `chunk` positions at a time (each
    row is independent: the values are the unchunked computation's)."""
    token_nll = torch.empty(len(states), dtype=torch.float64, device=states.device)
    impurity = torch.empty(len(states), dtype=torch.float64, device=states.device)
    for start in range(0, len(states), chunk):
        rows = slice(start, start + chunk)
        log_probs = torch.log_softmax(head(states[rows]).double(), dim=-1)
        token_nll[rows] = -log_probs.gather(1, targets[rows, None].to(log_probs.device))[:, 0]
        # in place: the chunk's log-probabilities are not needed again (one buffer, not three)
        impurity[rows] = 1.0 - log_probs.mul_(2.0).exp_().sum(dim=-1)
    return token_nll, impurity


def _decoder_of(forward_model):
    """The decoder stack (embeddings ... final norm) under a PEFT wrapper or not."""
    inner = forward_model
    while not hasattr(inner, "layers"):
        inner = inner.model if hasattr(inner, "model") else inner.base_model
    return inner


def suite_answer_nll(model_dir: Path, adapters: dict[str, Path], examples: dict[str, list[dict]],
                     quantized_dir: Path | None = None, progress: bool = True) -> dict[str, list[ExampleNll]]:
    """task -> per-example answer NLL with the task's adapter (`adapters[task]`) active, on
    the base model or on the quantized checkpoint `quantized_dir`."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_scoring_model(model_dir, quantized_dir)
    peft_model = attach_adapters(model, {task: adapters[task] for task in examples if adapters.get(task)})
    onednn_linears(peft_model if peft_model is not None else model)
    scored: dict[str, list[ExampleNll]] = {}
    for task in tqdm(list(examples), desc="answer NLL", unit="task", disable=not progress):
        scored[task] = answer_nll(model, tokenizer, examples[task], task if adapters.get(task) else None, peft_model)
    return scored


def mean_nll(values: list[ExampleNll]) -> float:
    """NLL per answer token over a set of examples (token-weighted)."""
    tokens = sum(v.tokens for v in values)
    return sum(v.nll for v in values) / tokens if tokens else float("nan")
