"""PEFT adapter features at the edge of what the engine serves (an outside parity probe,
2026-12-05): an activated LoRA (aLoRA) was accepted and served as a plain LoRA on every
token; the in-process `Engine.register_adapter` checked the config alone, so adapters the
server refuses (a tensor no executor loads, projections the config does not list) were
registered and failed or were served wrongly later; a valid `exclude_modules` adapter,
which the engine serves as PEFT does, was refused by the server's check as "missing
tensors"."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from adapter_corruptions import copy_adapter, rewrite_tensors
from peft_served import served_where_peft_puts_lora
from inlaid.engine.adapter_config import AdapterError, read_adapter_spec
from inlaid.engine.adapter_weights import check_servable_adapter
from inlaid.engine.config import ModelConfig


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(scope="module")
def engine(model_dir):
    from inlaid.engine import Engine, EngineConfig

    return Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=4,
                                     max_lora_rank=32, max_model_len=256))


def test_an_activated_lora_is_refused_naming_it(adapter_dirs, tmp_path):
    alora = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "alora")
    _edit_config(alora, alora_invocation_tokens=[28, 1002])
    with pytest.raises(AdapterError, match="activated LoRA"):
        read_adapter_spec("alora", alora)
    _edit_config(alora, alora_invocation_tokens=None)  # PEFT writes null for a plain LoRA
    assert read_adapter_spec("alora", alora).rank == 8


@pytest.mark.parametrize("field, value, words", [
    ("layer_replication", [[0, 15], [0, 15]], "layer replication"),  # PEFT 0.21.2 writes it so
    ("lora_bias", True, "lora_bias=true"),
    ("use_qalora", True, "QA-LoRA"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "LoRA on parameters"),
    ("trainable_token_indices", [5, 7], "trainable tokens"),
    ("arrow_config", {"top_k": 3}, "Arrow"),
    ("use_bdlora", {"a": 1}, "BD-LoRA"),
    ("kasa_config", {"x": 1}, "KaSA"),
    ("monteclora_config", {"x": 1}, "MonteCLoRA"),
])  # fmt: skip
def test_lora_variants_the_engine_does_not_compute_are_refused(adapter_dirs, tmp_path, field, value, words):
    """An outside probe: PEFT's layer_replication adapter was accepted and answered as the base."""
    variant = copy_adapter(adapter_dirs["attn-r8"], tmp_path, field)
    _edit_config(variant, **{field: value})
    with pytest.raises(AdapterError, match=f"{words}.* is not supported"):
        read_adapter_spec(field, variant)
    _edit_config(variant, **{field: None if field != "lora_bias" else False})  # what PEFT writes without it
    assert read_adapter_spec(field, variant).rank == 8


def test_register_adapter_checks_the_weights_as_the_server_does(engine, adapter_dirs, tmp_path):
    listed_elsewhere = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "listed")
    _edit_config(listed_elsewhere, target_modules=["q_proj"])  # the file also holds v_proj
    with_bias = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "bias")

    def add_bias(tensors: dict) -> None:
        name = next(k for k in sorted(tensors) if "lora_B" in k)
        tensors[name.replace(".weight", ".bias")] = torch.zeros(tensors[name].shape[0])

    rewrite_tensors(with_bias, add_bias)
    for adapter, words in ((listed_elsewhere, "which target_modules"), (with_bias, "unsupported tensor")):
        with pytest.raises(AdapterError, match=words):
            engine.register_adapter(adapter.name, str(adapter))
        assert adapter.name not in engine.adapter_names
    engine.register_adapter("good", str(adapter_dirs["attn-r8"]))
    assert "good" in engine.adapter_names


def test_exclude_modules_adapters_are_served_and_a_lone_half_is_still_refused(engine, model_dir, adapter_dirs,
                                                                             tmp_path):
    model = ModelConfig.from_dir(str(model_dir))
    excluded = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "excluded")
    rewrite_tensors(excluded, lambda t: [t.pop(k) for k in list(t) if ".layers.0." in k])
    with pytest.raises(AdapterError, match="LoRA tensors are missing"):  # without the config saying so
        check_servable_adapter("excluded", str(excluded), model, 32)
    _edit_config(excluded, exclude_modules=["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
    assert check_servable_adapter("excluded", str(excluded), model, 32).has_exclusions
    engine.register_adapter("excluded", str(excluded))
    # PEFT's rule is the engine's: the excluded layer runs the base alone. Zeroing layer 0's
    # LoRA in the full adapter must give the same greedy tokens.
    zeroed = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "zeroed")
    rewrite_tensors(zeroed, lambda t: [t[k].zero_() for k in t if ".layers.0." in k])
    engine.register_adapter("zeroed", str(zeroed))
    from inlaid.protocol import SamplingParams

    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    outputs = engine.generate(["The capital of France is"] * 2, sampling, ["excluded", "zeroed"])
    assert outputs[0].token_ids == outputs[1].token_ids
    half = copy_adapter(excluded, tmp_path, "half")
    rewrite_tensors(half, lambda t: t.pop(next(k for k in sorted(t) if ".layers.1." in k and "lora_B" in k)))
    with pytest.raises(AdapterError, match="LoRA tensors are missing"):
        check_servable_adapter("half", str(half), model, 32)


@pytest.mark.parametrize("rename", [
    lambda key: key.replace("self_attn.q_proj", "mlp.q_proj"),  # was served on the attention's q_proj
    lambda key: key.removeprefix("base_model.model."),  # PEFT itself does not load these
    lambda key: key.replace("base_model.model.model.", "base_model.model.vision_model."),
])  # fmt: skip
def test_lora_keys_are_read_whole_as_peft_saves_them(model_dir, adapter_dirs, tmp_path, rename):
    """An outside probe: keys were matched by their tail (`search`), so a q_proj under `mlp`
    and keys without PEFT's prefix were served though PEFT loads neither."""
    from inlaid.engine.lora import load_adapter_tensors

    model = ModelConfig.from_dir(str(model_dir))
    renamed = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "renamed")
    rewrite_tensors(renamed, lambda tensors: tensors.update({rename(key): tensors.pop(key) for key in list(tensors)}))
    spec = read_adapter_spec("renamed", renamed)
    for check in (lambda: check_servable_adapter("renamed", str(renamed), model, 32),
                  lambda: load_adapter_tensors(spec, model.num_layers)):
        with pytest.raises(AdapterError, match=r"unsupported tensor .*keyed as PEFT saves them: "
                                               r"base_model\.model\.model\.layers\.<i>"):
            check()
    assert len(load_adapter_tensors(read_adapter_spec("as-saved", adapter_dirs["attn-r8"]), model.num_layers)) == 60


@pytest.mark.parametrize("which", [
    {"exclude_modules": r"model\.layers\.[01]\.self_attn\.q_proj|.*\.5\.mlp\.down_proj"},  # the whole name
    {"exclude_modules": ["down_proj", "model.layers.2.self_attn.v_proj"]},  # equal, or ending in "." + the entry
    {"layers_to_transform": [0, 5, 10], "layers_pattern": "layers"},  # refused before: served as PEFT serves it
    {"layers_to_transform": 3},  # one index, PEFT's default pattern
    {"layers_to_transform": [1, 2], "exclude_modules": ["v_proj"]},
])  # fmt: skip
def test_exclude_modules_match_as_peft_matches_them(engine, model_dir, tmp_path, greedy_logits, which):
    """exclude_modules is matched by PEFT's rule, projection by projection: any missing pair
    used to be excused once exclude_modules was set (an outside probe: a pattern matching
    nothing, a layer's tensors deleted, served as zeros where PEFT keeps its initial
    weights). Logits against PEFT's own, with the adapter PEFT saved."""
    adapted = served_where_peft_puts_lora(engine, model_dir, tmp_path / "excluded", greedy_logits, 7,
                                           target_modules=["q_proj", "v_proj", "down_proj"], **which)
    assert adapted < 90  # it excluded something


@pytest.mark.parametrize("targets", [
    {"target_modules": r"model\.layers\.(?:[0-4]|1\d)\.self_attn\.[qv]_proj|.*\.7\.mlp\.(?:up|down)_proj"},
    {"target_modules": r".*\.(?:gate|o)_proj"},
    {"target_modules": ["self_attn.q_proj", "model.layers.3.mlp.down_proj", "v_proj"]},  # qualified, whole, bare
    {"target_modules": ["mlp.up_proj", "k_proj"], "layers_to_transform": [1, 4],
     "exclude_modules": ["4.self_attn.k_proj"]},
])  # fmt: skip
def test_target_modules_as_a_pattern_or_qualified_names_are_served_as_peft_serves_them(
        engine, model_dir, tmp_path, greedy_logits, targets):
    """PEFT matches target_modules against whole module names: a regular expression, or
    entries equal to a name or ending it. Such adapters were refused ("give a list of
    projection names", an outside probe); now each (layer, projection) carries LoRA exactly
    where PEFT puts it. Logits against PEFT's own, with the adapter PEFT saved."""
    adapted = served_where_peft_puts_lora(engine, model_dir, tmp_path / "targeted", greedy_logits, 11, **targets)
    assert 0 < adapted < 7 * 30  # on some projections


def test_a_target_pattern_reaching_beyond_the_projections_is_refused(adapter_dirs, tmp_path):
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "wide")
    for targets, words in ((r".*_proj|lm_head", "LoRA on lm_head"), (r".*embed_tokens|.*q_proj", "LoRA on model.embed"),
                           (["q_proj", "embed_tokens"], "LoRA on ['embed_tokens']"),
                           (["self_attn.rotary"], "LoRA on ['self_attn.rotary']"),
                           ("(unclosed", "is not a regular expression")):
        _edit_config(adapter, target_modules=targets)
        with pytest.raises(AdapterError, match=re.escape(words)):
            read_adapter_spec("wide", adapter)
    # PEFT refuses a pattern matching a module that is no Linear ("LlamaAttention is not
    # supported"), and a pattern beside layers_to_transform (a reviewer's cases)
    for targets, extra, words in ((r".*self_attn.*", {}, "LoRA on model.layers.0.self_attn"),
                                  (r"model\.layers\..*", {}, "LoRA on model.layers.0 "),
                                  (r".*_proj", {"layers_to_transform": [1]}, "PEFT refuses the two together")):
        _edit_config(adapter, target_modules=targets, **extra)
        with pytest.raises(AdapterError, match=re.escape(words)):
            read_adapter_spec("wide", adapter)
    # A pattern that backtracks without end is timed here too (`re` held the interpreter for minutes)
    _edit_config(adapter, target_modules=r"(.|.|.|.)*\d{5}", layers_to_transform=None)
    started = time.monotonic()
    with pytest.raises(AdapterError, match="backtracks"):
        read_adapter_spec("wide", adapter)
    assert time.monotonic() - started < 10
    for targets in ("ALL-LINEAR", ["q_proj", "v_proj", ""]):  # read as PEFT reads them
        _edit_config(adapter, target_modules=targets)
        spec = read_adapter_spec("wide", adapter)
        assert spec.target_names is None and {"q_proj", "v_proj"} <= set(spec.target_modules), targets


def test_exclude_modules_excuses_only_what_it_matches(adapter_dirs, model_dir, tmp_path):
    model = ModelConfig.from_dir(str(model_dir))
    deleted = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "deleted")
    rewrite_tensors(deleted, lambda t: [t.pop(k) for k in list(t) if ".layers.5.self_attn.q_proj" in k])
    _edit_config(deleted, exclude_modules=["nonexistent_module"])  # set, matching nothing
    with pytest.raises(AdapterError, match="2 LoRA tensors are missing, e.g. layer 5 q_proj.*do not leave it out"):
        check_servable_adapter("deleted", str(deleted), model, 32)
    _edit_config(deleted, exclude_modules=r"model\.layers\.5\.self_attn\.q_proj")
    assert check_servable_adapter("deleted", str(deleted), model, 32).excludes(5, "q_proj")
    kept = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "kept")  # tensors for a projection it excludes
    _edit_config(kept, exclude_modules=["model.layers.5.self_attn.q_proj"])
    with pytest.raises(AdapterError,
                       match="layer 5 q_proj, which target_modules, exclude_modules or layers_to_transform leave"):
        check_servable_adapter("kept", str(kept), model, 32)
    _edit_config(kept, exclude_modules=["(unclosed"])  # a list holds names, not patterns: matches nothing
    assert check_servable_adapter("kept", str(kept), model, 32).has_exclusions
    _edit_config(kept, exclude_modules="(unclosed")
    with pytest.raises(AdapterError, match="is not a regular expression"):
        read_adapter_spec("kept", kept)
    _edit_config(kept, exclude_modules=[3])
    with pytest.raises(AdapterError, match="must be a list of module names or a regular expression"):
        read_adapter_spec("kept", kept)
    for nothing in (False, "", [""]):  # PEFT excludes nothing for these
        _edit_config(kept, exclude_modules=nothing)
        assert not read_adapter_spec("kept", kept).has_exclusions


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_setting_on_a_base_without_biases_is_served_as_peft_serves_it(engine, model_dir, tmp_path,
                                                                             greedy_logits, bias):
    """bias="all" / "lora_only" was refused by its config alone (an outside probe): on a base
    with no biases PEFT trains and saves none, so the adapter is a plain LoRA. Logits against
    PEFT's own; a bias tensor in the file is still refused (test above)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def base():  # type: ignore[no-untyped-def]
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    torch.manual_seed(5)
    made = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], bias=bias))
    with torch.no_grad():
        for name, parameter in made.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    made.save_pretrained(str(tmp_path / bias))
    engine.register_adapter(bias, str(tmp_path / bias))
    prompt_ids = engine.tokenizer.encode("The capital of France is")
    (served,) = greedy_logits(engine, [prompt_ids], [bias], max_tokens=1)[0]
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(base(), str(tmp_path / bias)).eval()
        expected = peft_model(torch.tensor([prompt_ids])).logits[0, -1]
    torch.testing.assert_close(served, expected, atol=2e-4, rtol=0)
    engine.scheduler.adapters.unregister(bias)


def test_layers_to_transform_leaves_out_the_other_layers_and_bad_values_are_refused(adapter_dirs, model_dir,
                                                                                    tmp_path):
    model = ModelConfig.from_dir(str(model_dir))
    every_layer = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "every-layer")
    _edit_config(every_layer, layers_to_transform=[0])  # its file still holds every layer's tensors
    with pytest.raises(AdapterError,
                       match="layer 1 q_proj, which target_modules, exclude_modules or layers_to_transform leave"):
        check_servable_adapter("every-layer", str(every_layer), model, 32)
    for field, bad in (("layers_to_transform", [-1]), ("layers_to_transform", ["0"]), ("layers_to_transform", True),
                       ("layers_pattern", [3]), ("layers_pattern", "(")):
        _edit_config(every_layer, **{"layers_to_transform": [0], "layers_pattern": None, field: bad})
        with pytest.raises(AdapterError, match=field):
            read_adapter_spec("every-layer", every_layer)


@pytest.mark.parametrize("fields", [
    {"exclude_modules": r"(.|.)*\d{5}"},
    {"layers_to_transform": [0, 1], "layers_pattern": r"(.|.)*\d{5}"},
    {"exclude_modules": r"(?:.|\w)*(?:\w|.)*(?:.|[a-z])*[A-Z]"},
])  # fmt: skip
def test_a_pattern_that_backtracks_without_end_is_refused_when_read(adapter_dirs, tmp_path, fields):
    """`re` matches PEFT's patterns holding the interpreter lock to the end: one admin call
    with `(.|.)*X` froze an outside probe's coordinator (~150 s a module name, ~210 names).
    Each is matched with a time limit, and the spec is checked on module names as it is read."""
    import time

    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "redos")
    _edit_config(adapter, **fields)
    field = "exclude_modules" if "exclude_modules" in fields else "layers_pattern"
    started = time.monotonic()
    with pytest.raises(AdapterError, match=rf"adapter 'redos': {field} .* takes over 0.25 s to match the module "
                                           r"name 'model\.layers\.0\.self_attn\.q_proj' .*: simplify it"):
        read_adapter_spec("redos", adapter)
    assert time.monotonic() - started < 5


def test_a_pattern_re_reads_one_way_is_matched_as_re_matches_it(adapter_dirs, tmp_path):
    """The time-limited matcher reads the syntax as PEFT's `re` does, on every module name."""
    import re

    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "patterns")
    pattern = r"model\.layers\.(?:[0-3]|1\d)\.(?:self_attn\.[qv]|mlp\.down)_proj|.*\.2[0-9]\.self_attn\..*"
    _edit_config(adapter, exclude_modules=pattern)
    spec = read_adapter_spec("patterns", adapter)
    for layer in range(30):
        for projection, group in (("q_proj", "self_attn"), ("v_proj", "self_attn"), ("down_proj", "mlp")):
            expected = (re.fullmatch(pattern, f"model.layers.{layer}.{group}.{projection}") is not None
                        or projection not in spec.target_modules)  # not a target: no LoRA either
            assert spec.excludes(layer, projection) == expected, (layer, projection)


def test_a_pattern_the_engine_would_read_apart_from_peft_is_refused(adapter_dirs, tmp_path):
    """`regex` reads `[[:digit:]]` as a POSIX class, `re` (PEFT's) as a nested set: such a
    pattern matched a layer under one and not the other (a reviewer)."""
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "nested")
    _edit_config(adapter, exclude_modules=r"model\.layers\.[[:digit:]]\.mlp\.down_proj")
    with pytest.raises(AdapterError, match=r"exclude_modules .* is not a regular expression the engine reads as "
                                           r"PEFT does: Possible nested set"):
        read_adapter_spec("nested", adapter)


def test_a_pattern_whose_counted_repeats_write_out_huge_is_refused_before_regex_compiles_it(adapter_dirs, tmp_path):
    """`regex` writes counted repeats out when it compiles: `(?:x{3000}){3000}` took a coordinator
    to 2.5 GB, `(?:x{65535}){65535}` a process to 21 GB (an outside probe). Refused from the
    size, before either compiles it; nested small counts stay accepted."""
    import resource

    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "huge")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for pattern, size in ((r"(?:x{3000}){3000}", 9_000_000), (r"(?:x{65535}){65535}", 4_294_836_225)):
        _edit_config(adapter, exclude_modules=pattern)
        with pytest.raises(AdapterError, match=rf"its counted repeats write out to {size} items; at most 10000"):
            read_adapter_spec("huge", adapter)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no GBs were built
    _edit_config(adapter, exclude_modules=r"((model\.){2}){3}x|.*\.5\.mlp\.down_proj")
    assert read_adapter_spec("huge", adapter).excludes(5, "down_proj")


def test_patterns_slow_on_every_module_name_are_refused_by_their_total(adapter_dirs, tmp_path):
    """Each match under the per-match limit, ~600 of them a check: 13.9 s (a reviewer)."""
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "slow")
    _edit_config(adapter, exclude_modules=r".{15}(.|.)*\d{5}")
    with pytest.raises(AdapterError, match=r"took [0-9.]+ s to match 21 module names|takes over 0.25 s"):
        read_adapter_spec("slow", adapter)
