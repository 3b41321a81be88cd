"""PEFT's rank_pattern and alpha_pattern: per-module ranks and lora_alphas. Such adapters were
refused ("rank_pattern/alpha_pattern (per-module ranks) is not supported"); each module now
carries the rank and scale PEFT gives it (the first pattern, in the file's order, matching
its name or its end after a "."), and the logits are PEFT's own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from adapter_corruptions import copy_adapter
from inlaid.engine.adapter_config import AdapterError, read_adapter_spec
from inlaid.engine.adapter_weights import check_servable_adapter
from inlaid.engine.config import ModelConfig
from peft_served import served_where_peft_puts_lora


@pytest.fixture(scope="module")
def engine(model_dir):
    from inlaid.engine import Engine, EngineConfig

    return Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=4,
                                     max_lora_rank=32, max_model_len=256))


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("patterns", [
    # a bare name, a whole qualified name, and a pattern for some layers; alphas by projection
    {"rank_pattern": {"q_proj": 8, r"model\.layers\.[0-4]\.mlp\.down_proj": 2, "^model.layers.7.self_attn.v_proj": 16},
     "alpha_pattern": {"v_proj": 32, "down_proj": -4.5}},
    # the first matching pattern wins: layer 3's q_proj gets 16, every other q_proj 2
    {"rank_pattern": {"layers.3.self_attn.q_proj": 16, "q_proj": 2}, "alpha_pattern": {r"\d+\.mlp\.down_proj": 3}},
    # rsLoRA scales by sqrt of each module's own rank
    {"rank_pattern": {"v_proj": 9}, "alpha_pattern": {"q_proj": 20}, "use_rslora": True},
])  # fmt: skip
def test_per_module_ranks_and_alphas_are_served_as_peft_serves_them(engine, model_dir, tmp_path, greedy_logits,
                                                                     patterns):
    adapted = served_where_peft_puts_lora(engine, model_dir, tmp_path / "patterned", greedy_logits, 5,
                                          target_modules=["q_proj", "v_proj", "down_proj"], **patterns)
    assert adapted == 90
    spec = read_adapter_spec("patterned", tmp_path / "patterned")
    projections = ("q_proj", "v_proj", "down_proj")
    assert len({spec.rank_at(layer, projection) for layer in range(30) for projection in projections}) > 1


def test_a_patterned_adapter_in_a_mixed_batch_answers_as_it_does_alone(engine, model_dir, adapter_dirs, tmp_path,
                                                                       greedy_logits):
    """Per-module scales sit beside other adapters' in one step: each row as it is alone."""
    served_where_peft_puts_lora(engine, model_dir, tmp_path / "mixed", greedy_logits, 9,
                                target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"],
                                rank_pattern={"k_proj": 12, "gate_proj": 1}, alpha_pattern={"q_proj": 1.5})
    engine.register_adapter("mixed", str(tmp_path / "mixed"))
    engine.register_adapter("attn-r8", str(adapter_dirs["attn-r8"]))
    texts = ("The capital of France is", "Once upon a time", "def add(a, b):")
    prompts = [engine.tokenizer.encode(text) for text in texts]
    adapters = ["mixed", "attn-r8", None]
    together = greedy_logits(engine, prompts, adapters, max_tokens=3)
    for prompt, adapter, rows in zip(prompts, adapters, together):
        alone = greedy_logits(engine, [prompt], [adapter], max_tokens=3)[0]
        for row, solo in zip(rows, alone):
            torch.testing.assert_close(row, solo, atol=1e-4, rtol=0)
    for name in ("mixed", "attn-r8"):
        engine.scheduler.adapters.unregister(name)


@pytest.mark.parametrize("fields, words", [
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern gives 'q_proj' 0; each value must be a rank \(an integer >= 1\)"),
    ({"rank_pattern": {"q_proj": 4.0}}, "rank_pattern gives 'q_proj' 4.0"),
    ({"rank_pattern": {"q_proj": True}}, "rank_pattern gives 'q_proj' True"),
    ({"alpha_pattern": {"q_proj": "16"}}, r"alpha_pattern gives 'q_proj' '16'; each value must be a lora_alpha"),
    ({"alpha_pattern": {"q_proj": 1e309}}, "alpha_pattern gives 'q_proj' inf"),
    ({"rank_pattern": ["q_proj", 4]}, "field 'rank_pattern' must map module names or regular expressions to a rank"),
    ({"rank_pattern": {"q_proj(": 4}}, r"rank_pattern key 'q_proj\(' is not a regular expression the engine reads"),
    ({"alpha_pattern": {f"zz{i}": 4 for i in range(2049)}}, "alpha_pattern holds 2049 keys; at most 2048"),
    ({"alpha_pattern": {"q_proj": 1e6}, "rank_pattern": {"v_proj": 1}},
     r"LoRA scale lora_alpha / r = 1e\+06 \(the largest \|lora_alpha\|, 1e\+06, over the smallest r, 1, that "
     r"lora_alpha, r, alpha_pattern and rank_pattern give\) is over 65504"),
])  # fmt: skip
def test_bad_rank_or_alpha_patterns_are_refused_naming_them(adapter_dirs, tmp_path, fields, words):
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "bad")
    _edit_config(adapter, **fields)
    with pytest.raises(AdapterError, match=words):
        read_adapter_spec("bad", adapter)


def test_a_backtracking_rank_pattern_is_refused_when_read(adapter_dirs, tmp_path):
    """Matched with a time limit, as every pattern PEFT matches with `re`."""
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "redos")
    _edit_config(adapter, rank_pattern={r"(.|.)*\d{5}": 4})
    started = time.monotonic()
    with pytest.raises(AdapterError, match=r"rank_pattern .* takes over 0.25 s to match the module name"):
        read_adapter_spec("redos", adapter)
    assert time.monotonic() - started < 5


def test_weights_of_another_rank_than_the_pattern_gives_are_refused(adapter_dirs, model_dir, tmp_path):
    """attn-r8 saved at rank 8 everywhere: a rank_pattern giving v_proj 4 contradicts its tensors."""
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "contradicts")
    _edit_config(adapter, rank_pattern={"v_proj": 4})
    model = ModelConfig.from_dir(str(model_dir))
    with pytest.raises(AdapterError, match=r"layer 0 v_proj lora_A has shape \[8, 576\]; adapter_config.json says "
                                           r"its rank there is 4 \(r, rank_pattern\), so this base model needs "
                                           r"\[4, 576\]"):
        check_servable_adapter("contradicts", str(adapter), model, 32)


def test_a_pattern_rank_over_the_pools_is_refused_and_one_matching_no_module_counts_for_nothing(
        adapter_dirs, model_dir, engine, tmp_path):
    """A key matching no module builds nothing in PEFT (a warning): it was counted against
    max_lora_rank and refused here (an outside probe). A rank a module gets is counted."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = ModelConfig.from_dir(str(model_dir))
    unmatched = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "unmatched")
    _edit_config(unmatched, rank_pattern={"model.layers.99.self_attn.q_proj": 64})  # no such layer
    assert read_adapter_spec("unmatched", unmatched).rank_used(model.num_layers) == 8
    check_servable_adapter("unmatched", str(unmatched), model, 32)
    engine.register_adapter("unmatched", str(unmatched))
    engine.scheduler.adapters.unregister("unmatched")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 40})
                   ).save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(AdapterError, match=r"has rank 40 \(rank_pattern\); the engine's max_lora_rank is 32"):
        check_servable_adapter("wide", str(tmp_path / "wide"), model, 32)
    with pytest.raises(ValueError, match=r"has rank 40 \(rank_pattern\); the engine.s max_lora_rank is 32"):
        engine.register_adapter("wide", str(tmp_path / "wide"))


def test_one_literal_key_per_module_as_peft_writes_them_reads_fast_and_matches_each_module(adapter_dirs, tmp_path):
    """PEFT's EVA initialisation and LoRA conversion write one key per module: hundreds of keys,
    past `regex`'s compile cache; matched anew for every module, an 80-layer model's took
    13 s a slot load and was refused as "backtracking" when read (a reviewer)."""
    from inlaid.engine.adapter_config import PROJECTIONS

    def module(layer: int, projection: str) -> str:
        return f"model.layers.{layer}.{'mlp' if projection in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}" \
               f".{projection}"

    ranks = {module(layer, p): 1 + (layer + index) % 7 for layer in range(100) for index, p in enumerate(PROJECTIONS)}
    alphas = {module(layer, p): 2.0 + (layer * index) % 5 for layer in range(100) for index, p in enumerate(PROJECTIONS)}
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "literal")
    _edit_config(adapter, target_modules=list(PROJECTIONS), rank_pattern=ranks, alpha_pattern=alphas)
    spec = read_adapter_spec("literal", adapter)  # 1,400 keys: within the budget
    started = time.thread_time()
    for layer in range(100):
        for projection in PROJECTIONS:
            assert spec.rank_at(layer, projection) == ranks[module(layer, projection)]
            assert spec.scale_at(layer, projection) == alphas[module(layer, projection)] / ranks[module(layer, projection)]
    assert time.thread_time() - started < 30  # ~1 s here; uncached, minutes
    assert spec.rank_used(30) == 7 and spec.rank_used(100) == 7  # the modules' own, not r (every one has a key)


def test_eval_sizes_its_pools_for_a_patterns_rank_and_answers_as_peft(model_dir, tmp_path):
    """`inlaid eval` sized the pools from `r` alone (at least 64): a rank_pattern rank past that
    failed at registration (a reviewer). Its answers equal PEFT's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from inlaid.tasks.generation import GenerationRequest, generate_with_engine, generate_with_peft

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    made = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"q_proj": 72}, alpha_pattern={"v_proj": 2}))
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.03)
    made.save_pretrained(str(tmp_path / "wide"))
    adapters = {"wide": tmp_path / "wide"}
    requests = [GenerationRequest("The capital of France is", "wide", 4), GenerationRequest("Once upon a", None, 4)]
    ours = generate_with_engine(model_dir, adapters, requests, show_progress=False, threads=1)
    reference = generate_with_peft(model_dir, adapters, requests, batch_size=1, show_progress=False)
    assert [o.text for o in ours] == [r.text for r in reference]


def test_generate_sizes_its_pools_for_its_adapters_ranks(model_dir, tmp_path, capsys):
    """`inlaid generate` held its pools at rank 64 and refused a rank-72 module that `eval` and a
    server with room serve (an outside probe); its answer is PEFT's."""
    import json as json_module

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid import cli

    torch.manual_seed(4)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    made = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"v_proj": 72}))
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.03)
    made.save_pretrained(str(tmp_path / "wide"))
    assert cli.main(["generate", "--model", str(model_dir), "--adapter", f"wide={tmp_path / 'wide'}", "--use", "wide",
                     "--prompt", "The capital of France is", "--max-tokens", "4", "--temperature", "0",
                     "--json"]) == 0
    served = json_module.loads(capsys.readouterr().out.splitlines()[0])["text"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                                           str(tmp_path / "wide")).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = peft_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert served == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
