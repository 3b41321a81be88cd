"""LoRA training: the loss is the standard causal-LM loss, and a resumed run equals a straight one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, model_dir) -> Path:
    """A 2-layer random Llama with the default model's tokenizer (chat template included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


def _config(tiny_model_dir: Path, out_dir: Path, steps: int):
    from inlaid.tasks.train import TrainConfig

    return TrainConfig(task="sentiment", model_dir=str(tiny_model_dir), out_dir=str(out_dir), rank=4, steps=steps,
                       batch_size=2, lr=1e-2, warmup_steps=1, save_every=2, precision="fp32", save_dtype="float32",
                       split="calib", threads=2)


def test_loss_equals_transformers_causal_lm_loss(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.tasks import get_task
    from inlaid.tasks.train import LORA_TARGET_MODULES, _collate, _loss, tokenize_sample

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    examples = get_task("sentiment").load_split("calib")[:3]
    samples = [tokenize_sample(tokenizer, e["messages"], e["reference"]) for e in examples]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False))
    input_ids, attention, labels = _collate(samples, tokenizer.eos_token_id, torch.device("cpu"))
    with torch.no_grad():
        ours = _loss(model, input_ids, attention, labels)
        reference = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    # the loss covers the reference and the end-of-turn token only
    ids, prompt_len = samples[0]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == examples[0]["reference"]


def test_resumed_training_equals_uninterrupted(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from inlaid.tasks.train import LORA_TARGET_MODULES, train

    straight = train(_config(tiny_model_dir, tmp_path / "straight", steps=4))
    interrupted = tmp_path / "resumed"
    train(_config(tiny_model_dir, interrupted, steps=2))
    (interrupted / "training.json").unlink()
    resumed = train(_config(tiny_model_dir, interrupted, steps=4))  # picks up the step-2 checkpoint

    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it did train
    config = json.loads((straight / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(LORA_TARGET_MODULES) and config["r"] == 4
    info = json.loads((straight / "training.json").read_text())
    assert info["steps"] == 4 and info["task"] == "sentiment" and len(info["train_data_sha256"]) == 64


def test_a_task_of_ones_own_trains_and_scores_from_its_file(tiny_model_dir, tmp_path):
    """A new task could be neither trained nor evaluated with `inlaid` commands: both took only
    the suite's task names (an outside probe of the new-task journey). `NAME=PATH.jsonl` reads
    the examples from the user's file, in the calibration format."""
    from dataclasses import replace

    from inlaid.tasks import TaskError
    from inlaid.tasks.base import file_sha256
    from inlaid.tasks.eval_plan import EvalRun
    from inlaid.tasks.evaluate import evaluate_runs
    from inlaid.tasks.train import TrainConfig, out_problem, train

    data = tmp_path / "colours.jsonl"
    pairs = [("red", "rouge"), ("blue", "bleu"), ("green", "vert"), ("black", "noir")]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"French for {en}?"}],
                                        "reference": fr}) + "\n" for en, fr in pairs))
    config = TrainConfig(task="colours", data=str(data), model_dir=str(tiny_model_dir), out_dir=str(tmp_path / "a"),
                         rank=4, steps=2, batch_size=2, lr=1e-2, warmup_steps=1, precision="fp32",
                         threads=2).with_data_hash()
    out = train(config)
    info = json.loads((out / "training.json").read_text())
    assert info["task"] == "colours" and info["config"]["data"] == str(data)
    assert info["train_data_sha256"] == file_sha256(data) == config.data_sha256
    assert info["train_examples_used"] == len(pairs)
    other = tmp_path / "other.jsonl"
    shutil.copy(data, other)
    problem = out_problem(replace(config, data=str(other)).with_data_hash())
    assert problem is not None and f"data {data} there, {other} here" in problem
    # the same path, its contents edited: resumed silently on other data (an outside probe)
    original = data.read_text()
    data.write_text(original.replace("rouge", "ROUGE"))
    problem = out_problem(config.with_data_hash())
    assert problem is not None and f"data_sha256 {info['train_data_sha256']} there" in problem
    with pytest.raises(TaskError, match="changed since this run was checked"):  # edited after the checks
        train(replace(config, steps=3))
    shutil.rmtree(out / "checkpoint")  # a finished adapter alone: its training.json says which data
    problem = out_problem(config.with_data_hash())
    assert problem is not None and f"data_sha256 {info['train_data_sha256']} there" in problem
    data.write_text(original)
    assert out_problem(config.with_data_hash()) is None

    runs = [EvalRun(f"colours={data}", "a", out), EvalRun(f"colours={data}", None, None)]
    results = evaluate_runs(tiny_model_dir, runs, backend="engine")
    assert set(results["tasks"]) == {"colours"} and set(results["tasks"]["colours"]) == {"a", "base"}
    assert results["dtype"] == "float32"  # the engine's "auto" on the CPU, as it ran (it said "auto")
    for entry in results["tasks"]["colours"].values():
        texts = [p["text"] for p in entry["predictions"]]
        assert entry["examples"] == len(pairs) and entry["primary_metric"] == "rougeL"
        first_lines = [t.strip().splitlines()[0] if t.strip() else "" for t in texts]
        expected = 100 * sum(_rouge_l_by_hand(fr, line) for (_, fr), line in zip(pairs, first_lines))
        assert entry["scores"]["rougeL"] == pytest.approx(expected / len(pairs))
        assert entry["scores"]["exact_match"] == pytest.approx(
            100 * sum(line.strip().lower() == fr for (_, fr), line in zip(pairs, first_lines)) / len(pairs))


def test_the_peft_backend_records_float32_without_the_engine(tiny_model_dir, tmp_path, monkeypatch):
    """Naming the engine's dtype imported the engine after a peft run (auto picks peft when the
    engine cannot import) and lost every result (a reviewer)."""
    import sys

    from inlaid.tasks.eval_plan import EvalRun
    from inlaid.tasks.evaluate import evaluate_runs

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "reference": "hello"}) + "\n")
    monkeypatch.setitem(sys.modules, "inlaid.engine.runner", None)  # an import of it fails
    results = evaluate_runs(tiny_model_dir, [EvalRun(f"one={data}", None, None)], backend="peft")
    assert results["dtype"] == "float32" and results["tasks"]["one"]["base"]["examples"] == 1


def _rouge_l_by_hand(reference: str, prediction: str) -> float:
    """ROUGE-L F1 over lower-cased Unicode words, from the longest common subsequence."""
    import re

    ref, pred = re.findall(r"\w+", reference.lower()), re.findall(r"\w+", prediction.lower())
    lcs = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i, a in enumerate(ref):
        for j, b in enumerate(pred):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[-1][-1]
    return 0.0 if not common else 2 * common / (len(ref) + len(pred))
