"""Quality evidence: the teacher-forced answer NLL against a plain PEFT forward per example,
on the float base and on a quantized checkpoint; bootstrap intervals against known answers
and sacreBLEU's own corpus score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inlaid.quant.bootstrap import (
    bleu_rows, bleu_statistic, interval, mean_statistic, paired_difference, ratio_statistic, resample_indices,
)
from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.driver import DriverConfig, quantize_model
from inlaid.quant.methods import parse_method
from inlaid.quant.nll import mean_nll, suite_answer_nll
from inlaid.quant.spec import QuantSpec

from test_quant_driver import _make_adapter, _make_tiny_model
from tiny_llama import write_calibration

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _reference_nll(model, tokenizer, example: dict) -> tuple[float, int]:
    """One example, unbatched: the full-sequence logits in float64, the answer's log-probs."""
    prompt = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example["reference"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    targets = ids[0, len(prompt_ids):]
    picked = log_probs[len(prompt_ids) - 1 : -1].gather(1, targets[:, None])
    return -float(picked.sum()), len(answer_ids)


def test_answer_nll_matches_a_plain_forward_on_float_and_quantized_weights(tmp_path) -> None:
    from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint

    model_dir = _make_tiny_model(tmp_path / "model")
    adapter = _make_adapter(model_dir, tmp_path / "adapter", seed=1)
    calib = write_calibration(tmp_path / "alpha.jsonl", "alpha", 6)
    examples = [json.loads(line) for line in calib.read_text().splitlines()]
    quantize_model(DriverConfig(model_dir=model_dir, tasks=[CalibrationTask("alpha", adapter, calib)],
                                method=parse_method("gptq-mean-lora"), spec=QuantSpec(bits=3, group_size=32),
                                out_dir=tmp_path / "q3", max_tokens=64, progress=False, save_hessian_state=False))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for quantized in (None, tmp_path / "q3"):
        scored = suite_answer_nll(model_dir, {"alpha": adapter}, {"alpha": examples}, quantized_dir=quantized,
                                  progress=False)["alpha"]
        base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        if quantized is not None:
            base.load_state_dict(dequantized_state_dict(load_gptq_checkpoint(quantized)), strict=False)
        reference_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        for example, result in zip(examples, scored):
            expected, tokens = _reference_nll(reference_model, tokenizer, example)
            assert result.id == example["id"] and result.tokens == tokens
            assert result.nll == pytest.approx(expected, rel=2e-5)
        if quantized is None:
            float_nll = mean_nll(scored)
    # 3-bit weights cost likelihood on the text the adapter was given
    assert mean_nll(scored) != pytest.approx(float_nll, rel=1e-6)


def test_bootstrap_intervals_against_known_answers() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(2.0, 1.0, size=(400, 1))
    draws = resample_indices(400, resamples=2000, seed=1)
    result = interval(values, mean_statistic, draws)
    standard_error = values[:, 0].std() / 400 ** 0.5
    assert result.value == pytest.approx(values.mean())
    assert result.low == pytest.approx(result.value - 1.96 * standard_error, abs=0.25 * standard_error)
    assert result.high == pytest.approx(result.value + 1.96 * standard_error, abs=0.25 * standard_error)
    # paired: a constant shift is significant however noisy the examples; pure noise is not
    shifted = values + 0.05
    assert paired_difference(shifted, values, mean_statistic, draws).significant
    noise = values + rng.normal(0, 1.0, size=values.shape)
    assert not paired_difference(noise[:100], values[:100], mean_statistic, draws[:, :100] % 100).significant
    # NLL per token is token-weighted
    rows = np.array([[4.0, 2], [1.0, 2], [3.0, 4]])
    assert ratio_statistic(rows) == pytest.approx(1.0)


def test_bleu_rows_resum_to_sacrebleu_corpus_score() -> None:
    import sacrebleu

    predictions = ["the cat sat on the mat", "a dog", "hello there world", "je suis la", ""]
    references = ["the cat is on the mat", "the dog barks", "hello world", "je suis ici", "rien"]
    rows = bleu_rows(predictions, references)
    assert bleu_statistic(rows) == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-9)
    subset = [0, 2, 2, 3]
    expected = sacrebleu.corpus_bleu([predictions[i] for i in subset], [[references[i] for i in subset]]).score
    assert bleu_statistic(rows[subset]) == pytest.approx(expected, abs=1e-9)
