"""PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ adapters (PEFT's init_lora_weights) were accepted and
served wrongly (an outside probe, 2026-12-06): the first four were trained on the base minus
their initial B @ A (PEFT takes it out again when it loads PiSSA, CorDA and OLoRA), which a
shared base cannot do, so the engine counted the principal part twice; LoftQ trains on its
own quantization of the base. They are refused with the way out where PEFT has one (its
conversion to a plain LoRA on save), and the converted adapter answers as PEFT answers the
original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapter_corruptions import copy_adapter
from inlaid.engine.adapter_config import AdapterError, read_adapter_spec
from test_tasks_adapters import _merged_by_hand  # the adapter's B @ A added to the base, float64

PROMPT = "The capital of France is"
TARGETS = ["q_proj", "v_proj"]


def _fresh_base(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pissa_adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """A PiSSA adapter "trained" (its A and B moved), saved as PEFT saves it, and the same
    adapter converted to a plain LoRA by PEFT."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("pissa")
    torch.manual_seed(0)
    model = get_peft_model(_fresh_base(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights="pissa", lora_dropout=0.0))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial copy
    model.save_pretrained(str(root / "initial"))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # a training step's worth of change
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(str(root / "pissa"))
    model.save_pretrained(str(root / "converted"), path_initial_model_for_weight_conversion=str(root / "initial"))
    return {"pissa": root / "pissa", "converted": root / "converted"}


def _peft_logits(model_dir: Path, adapter: Path, prompt_ids: list[int]) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_fresh_base(model_dir), str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0, -1]


def test_a_pissa_adapter_is_refused_and_its_conversion_answers_as_peft_answers_it(model_dir, pissa_adapters,
                                                                                  greedy_logits):
    from inlaid.engine import Engine, EngineConfig

    with pytest.raises(AdapterError, match=r"init_lora_weights='pissa' is not supported: it was trained on the base "
                                           r"minus its initial B @ A.*path_initial_model_for_weight_conversion"):
        read_adapter_spec("pissa", pissa_adapters["pissa"])
    assert read_adapter_spec("converted", pissa_adapters["converted"]).rank == 8  # PEFT doubles it
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=2,
                                       max_lora_rank=8, max_model_len=64))
    with pytest.raises(AdapterError, match="trained on the base minus its initial B @ A"):
        engine.register_adapter("pissa", str(pissa_adapters["pissa"]))
    engine.register_adapter("converted", str(pissa_adapters["converted"]))
    prompt_ids = engine.tokenizer.encode(PROMPT)
    (served,) = greedy_logits(engine, [prompt_ids], ["converted"], max_tokens=1)[0]
    as_peft_loads_pissa = _peft_logits(model_dir, pissa_adapters["pissa"], prompt_ids)
    on_the_shared_base = _peft_logits(model_dir, pissa_adapters["converted"], prompt_ids)
    torch.testing.assert_close(on_the_shared_base, as_peft_loads_pissa, atol=2e-4, rtol=0)
    torch.testing.assert_close(served, as_peft_loads_pissa, atol=2e-4, rtol=0)
    # what serving the PiSSA file's A and B on the unchanged base computed: far from PEFT's
    with torch.no_grad():
        naive = _merged_by_hand(model_dir, pissa_adapters["pissa"])(torch.tensor([prompt_ids])).logits[0, -1]
    assert float((naive.float() - as_peft_loads_pissa).abs().max()) > 0.5


def _with_config(adapter_dirs, tmp_path, **fields) -> Path:
    adapter = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "variant")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return adapter


@pytest.mark.parametrize("fields, words", [
    ({"init_lora_weights": "pissa_niter_4"}, "trained on the base minus its initial B @ A"),
    ({"init_lora_weights": "olora"}, "trained on the base minus its initial B @ A"),
    ({"init_lora_weights": "OLoRA"}, "trained on the base minus its initial B @ A"),
    ({"init_lora_weights": "corda"}, "trained on the base minus its initial B @ A"),
    ({"init_lora_weights": "lora_ga"}, "trained on the base minus its initial B @ A"),  # PEFT cannot redo it
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "LoftQ's own quantization of the base"),
    # PEFT's LoftQ recipe saves with init_lora_weights=True; its loftq_config stays
    ({"init_lora_weights": True, "loftq_config": {"loftq_bits": 4}}, "LoftQ's own quantization of the base"),
])  # fmt: skip
def test_every_init_trained_on_another_base_is_refused(adapter_dirs, tmp_path, fields, words):
    with pytest.raises(AdapterError, match=words):
        read_adapter_spec("variant", _with_config(adapter_dirs, tmp_path, **fields))


@pytest.mark.parametrize("init, served", [(True, True), (False, True), (None, True), ("gaussian", True),
                                          ("Gaussian", True), ("eva", True), ("orthogonal", True), ("mica", True),
                                          ("kaiming", False), (3, False)])
def test_inits_that_leave_the_base_alone_are_served_and_unknown_ones_refused(adapter_dirs, tmp_path, init, served):
    adapter = _with_config(adapter_dirs, tmp_path, init_lora_weights=init, loftq_config={})  # PEFT writes {}
    if served:
        assert read_adapter_spec("variant", adapter).rank == 8
    else:
        with pytest.raises(AdapterError, match=r"init_lora_weights=.* is not supported \(PEFT knows true, false"):
            read_adapter_spec("variant", adapter)
