"""Fault handling of adapter files, without a server: corrupted weights, any adapter config, unreadable paths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_corruptions import CORRUPTIONS, copy_adapter, first_tensor, rewrite_tensors
from inlaid.engine.adapter_config import AdapterError, read_adapter_spec
from inlaid.engine.adapter_weights import check_adapter_weights
from inlaid.engine.config import ModelConfig
from inlaid.engine.lora import load_adapter_tensors
from test_fault_units import PROPERTY


@pytest.fixture(scope="module")
def model_config(model_dir) -> ModelConfig:
    return ModelConfig.from_dir(model_dir)


def test_every_corrupted_adapter_is_refused_up_front(adapter_dirs, model_config, tmp_path):
    good = adapter_dirs["attn-r8"]  # rank 8, q_proj + v_proj
    check_adapter_weights(read_adapter_spec("good", good), model_config, max_rank=32)
    for index, (what, (corrupt, message)) in enumerate(CORRUPTIONS.items()):
        adapter = copy_adapter(good, tmp_path, f"case{index}")
        corrupt(adapter)
        with pytest.raises(AdapterError, match=message) as refused:
            check_adapter_weights(read_adapter_spec("bad", adapter), model_config, max_rank=32)
        assert "'bad'" in str(refused.value), what


def test_what_the_check_accepts_the_executor_loads(adapter_dirs, model_config, tmp_path):
    """Every dtype the check accepts loads in the executor's torch loader to the same values."""
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        adapter = copy_adapter(adapter_dirs["mlp-r16"], tmp_path, str(dtype))
        rewrite_tensors(adapter, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
        spec = read_adapter_spec("ok", adapter)
        check_adapter_weights(spec, model_config, max_rank=16)
        loaded = load_adapter_tensors(spec, model_config.num_layers)
        assert len(loaded) == model_config.num_layers * 3
    # And a bf16 NaN is found (bf16 is read from its raw bits, not through numpy's float types).
    adapter = copy_adapter(adapter_dirs["mlp-r16"], tmp_path, "bf16-nan")
    rewrite_tensors(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    rewrite_tensors(adapter, lambda t: t[first_tensor(t)].view(-1).__setitem__(5, math.nan))
    with pytest.raises(AdapterError, match="NaN"):
        check_adapter_weights(read_adapter_spec("x", adapter), model_config, max_rank=16)
    with pytest.raises(AdapterError, match="NaN"):  # the executor's loader agrees
        load_adapter_tensors(read_adapter_spec("x", adapter), model_config.num_layers)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=3), max_leaves=10)
config_fields = st.fixed_dictionaries({}, optional={
    "r": json_values | st.integers(-3, 70), "lora_alpha": json_values, "target_modules": json_values
    | st.just(["q_proj", "v_proj"]) | st.just("all-linear"), "peft_type": json_values | st.just("LORA"),
    "use_rslora": json_values, "use_dora": json_values, "bias": json_values | st.just("none"),
    "modules_to_save": json_values, "rank_pattern": json_values, "layers_to_transform": json_values,
})


@settings(PROPERTY, max_examples=120)
@given(st.one_of(config_fields, json_values))
def test_any_adapter_config_gives_a_spec_or_an_adapter_error(tmp_path_factory, config):
    adapter = tmp_path_factory.mktemp("cfg")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    try:
        spec = read_adapter_spec("fuzz", adapter)
    except AdapterError:
        return
    assert isinstance(spec.rank, int) and spec.rank >= 1 and math.isfinite(spec.lora_alpha)
    assert spec.target_modules and isinstance(spec.use_rslora, bool)


def test_unreadable_adapter_paths_are_adapter_errors(tmp_path):
    for path in ("", "\x00bad", str(tmp_path / "missing"), "/dev/null", str(tmp_path)):
        with pytest.raises(AdapterError):
            read_adapter_spec("x", path)
    (tmp_path / "adapter_config.json").mkdir()  # a directory where the file should be
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="adapter_config.json is a directory, not a file"):
        read_adapter_spec("x", tmp_path)


def test_adapter_path_messages_say_what_the_path_is(tmp_path):
    # Found by an outside probe: a file, a symlink loop and a FIFO were all "not found".
    import os

    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    os.mkfifo(adapter / "adapter_model.safetensors")
    for path, message in [(tmp_path / "missing", "directory not found"), (tmp_path / "file", "is a file, not a directory"),
                          (tmp_path / "loop_a", "broken symbolic link"), (adapter, "not a regular file")]:
        with pytest.raises(AdapterError, match=message):
            read_adapter_spec("x", path)
