"""The layer-by-layer multi-task driver on a tiny random Llama with two PEFT adapters:
Hessians against an independent full-model forward, checkpoint contents, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inlaid.engine.adapter_config import adapter_signature
from inlaid.models.prepare import default_model_dir
from inlaid.quant.calibration import CalibrationTask, sample_text
from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint
from inlaid.quant.driver import DriverConfig, quantize_model
from inlaid.quant.errors import AdapterMismatchError, CalibrationDataError, NonFiniteHessianError
from inlaid.quant.methods import parse_method
from inlaid.quant.model_io import INPUT_GROUPS, LINEAR_NAMES
from inlaid.quant.spec import QuantSpec
from inlaid.quant.state import load_layer_state

from tiny_llama import make_adapter, make_tiny_model, write_calibration

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _make_tiny_model(directory: Path, hidden: int = 64, seed: int = 0) -> Path:
    source = default_model_dir()
    if not (source / "tokenizer.json").is_file():
        pytest.skip("the default model (tokenizer) is not prepared; run `make setup`")
    return make_tiny_model(directory, source, layers=2, hidden=hidden, seed=seed, max_positions=256)


def _make_adapter(model_dir: Path, out_dir: Path, seed: int, poison: bool = False) -> Path:
    return make_adapter(model_dir, out_dir, seed, scale=0.3, poison="layers.1.self_attn.o_proj" if poison else None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_driver")
    model_dir = _make_tiny_model(root / "model")
    tasks = [
        CalibrationTask("alpha", _make_adapter(model_dir, root / "adapter_alpha", seed=1),
                        write_calibration(root / "alpha.jsonl", "alpha", 9)),
        CalibrationTask("beta", _make_adapter(model_dir, root / "adapter_beta", seed=2),
                        write_calibration(root / "beta.jsonl", "beta", 7)),
    ]
    return root, model_dir, tasks


def _config(root: Path, model_dir: Path, tasks, method: str, out: str, **kwargs) -> DriverConfig:
    return DriverConfig(
        model_dir=model_dir, tasks=tasks, method=parse_method(method, [t.name for t in tasks]),
        spec=QuantSpec(bits=4, group_size=32), out_dir=root / out, max_samples=None, max_tokens=64,
        max_batch_tokens=200, progress=False, **kwargs,
    )


class _ReferenceForward:
    """Layer inputs of every layer from ONE full-model PEFT forward per sample (no batching,
    no padding, no layer-by-layer runner), as float64 Hessians: (layer, group) -> (H, tokens)."""

    def __init__(self, model_dir: Path, task: CalibrationTask, max_tokens: int) -> None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.original = {k: v.clone() for k, v in model.state_dict().items()}
        self.model = peft.PeftModel.from_pretrained(model, str(task.adapter_dir)).eval()
        self.base = model
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        self.samples = [tokenizer(sample_text(json.loads(line), tokenizer), add_special_tokens=False)["input_ids"][:max_tokens]
                        for line in task.calib_path.read_text().splitlines()]

    def hessians(self, replaced: dict[str, torch.Tensor]) -> dict[tuple[int, str], tuple[torch.Tensor, int]]:
        """With the base weights in `replaced` swapped in (the rest as in the original model)."""
        modules = dict(self.base.named_modules())
        for key, original in self.original.items():
            module_path, name = key.rsplit(".", 1)
            module = modules[module_path]
            module = module.base_layer if hasattr(module, "base_layer") else module
            getattr(module, name).data.copy_(replaced.get(key, original))
        collected: dict[tuple[int, str], list[torch.Tensor]] = {}
        handles = []
        for index, layer in enumerate(self.base.model.layers):
            for group, module in (("attn_in", layer.self_attn.q_proj), ("attn_out", layer.self_attn.o_proj),
                                  ("mlp_in", layer.mlp.gate_proj), ("mlp_out", layer.mlp.down_proj)):
                def hook(_m, args, key=(index, group)):
                    collected.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
                handles.append(module.base_layer.register_forward_pre_hook(hook))
        with torch.no_grad():
            for ids in self.samples:
                self.base.model(input_ids=torch.tensor([ids]))  # the decoder only: no logits needed
        for handle in handles:
            handle.remove()
        hessians = {}
        for key, chunks in collected.items():
            x = torch.cat(chunks)
            hessians[key] = (2.0 * x.T @ x / x.shape[0], x.shape[0])
        return hessians


def test_mlgptq_checkpoint_hessians_and_reload(tiny_setup) -> None:
    root, model_dir, tasks = tiny_setup
    report = quantize_model(_config(root, model_dir, tasks, "mlgptq", "mlgptq"))
    out = root / "mlgptq"
    checkpoint = load_gptq_checkpoint(out)
    assert checkpoint.config["quantization_config"]["quant_method"] == "gptq"
    assert checkpoint.config["quantization_config"]["bits"] == 4
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 32
    assert set(checkpoint.linears) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_NAMES}
    meta = checkpoint.metadata
    assert meta["method"] == "mlgptq" and [t["name"] for t in meta["tasks"]] == ["alpha", "beta"]
    assert meta["tasks"][0]["samples"] == 9 and meta["tasks"][1]["samples"] == 7
    # what each adapter held, so that a server can tell a re-add of the same files and samples
    assert [t["adapter_signature"] for t in meta["tasks"]] == [adapter_signature(t.adapter_dir) for t in tasks]
    assert len(report.layer_errors) == 2 * len(LINEAR_NAMES)
    assert all(0 < e < 0.2 for entry in report.layer_errors for e in entry["errors"].values())
    assert "model.embed_tokens.weight" in checkpoint.tensors

    # True-sequential: each group's Hessian is taken on inputs computed with every linear
    # before it quantized (the earlier layers, and the earlier groups of its own layer).
    # Reference: a plain full-model PEFT forward with exactly those weights replaced by the
    # checkpoint's.
    dequantized = dequantized_state_dict(checkpoint)
    order = [(layer_index, group) for layer_index in range(2) for group in INPUT_GROUPS]
    references = {task.name: _ReferenceForward(model_dir, task, max_tokens=64) for task in tasks}
    for position, (layer_index, group) in enumerate(order):
        before = {f"model.layers.{i}.{linear}.weight" for i, g in order[:position] for linear in INPUT_GROUPS[g]}
        state, forward = load_layer_state(out / "hessian_state", layer_index)
        assert forward == "adapter"
        for task in tasks:
            reference = references[task.name].hessians({k: dequantized[k] for k in before})
            expected, tokens = reference[(layer_index, group)]
            stored = state[group][task.name]
            assert stored.tokens == tokens
            torch.testing.assert_close(stored.hessian.double(), expected, rtol=2e-4, atol=2e-5)

    # The dequantized checkpoint runs through transformers; on calibration text it is closer
    # to the original than the round-to-nearest checkpoint.
    quantize_model(_config(root, model_dir, tasks, "rtn", "rtn_ref", measure_errors=False))
    rtn_state = dequantized_state_dict(load_gptq_checkpoint(root / "rtn_ref"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    text = sample_text(json.loads(tasks[0].calib_path.read_text().splitlines()[0]), tokenizer)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    logits = {}
    for name, state in (("original", None), ("mlgptq", dequantized), ("rtn", rtn_state)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        if state is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and all("lm_head" in key for key in missing)
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    mlgptq_error = float((logits["mlgptq"] - logits["original"]).norm())
    rtn_error = float((logits["rtn"] - logits["original"]).norm())
    assert 0 < mlgptq_error < rtn_error


def test_resume_after_crash_gives_identical_checkpoint(tiny_setup) -> None:
    root, model_dir, tasks = tiny_setup
    config = _config(root, model_dir, tasks, "gptq-mean-lora", "resume", measure_errors=False)
    quantize_model(config)
    first = load_file(str(root / "resume" / "model.safetensors"))
    # a crash during layer 1: its partial file and the final files never got written
    (root / "resume" / ".partial" / "layer_001.safetensors").unlink()
    (root / "resume" / "model.safetensors").unlink()
    report = quantize_model(config)
    assert report.layers_resumed == 1
    second = load_file(str(root / "resume" / "model.safetensors"))
    assert set(second) == set(first)
    assert all(torch.equal(first[name], second[name]) for name in first)
    # other settings on the same directory are refused rather than mixed in
    other = _config(root, model_dir, tasks, "rtn", "resume", measure_errors=False)
    with pytest.raises(Exception, match="other settings"):
        quantize_model(other)


def test_methods_record_their_forward_and_rtn_needs_no_calibration(tiny_setup) -> None:
    root, model_dir, tasks = tiny_setup
    quantize_model(_config(root, model_dir, tasks, "gptq-mixed", "mixed", measure_errors=False))
    state, forward = load_layer_state(root / "mixed" / "hessian_state", 0)
    assert forward == "base" and set(state["attn_in"]) == {"alpha", "beta"}
    rtn = quantize_model(_config(root, model_dir, tasks, "rtn", "rtn", measure_errors=False))
    assert rtn.layer_errors == [] and not (root / "rtn" / "hessian_state").exists()
    single = quantize_model(_config(root, model_dir, tasks, "gptq-task:beta", "single", save_hessian_state=False))
    # per-task errors are measured for every task, also those the method ignores
    assert {"alpha", "beta"} == set(single.layer_errors[0]["errors"])


def test_clear_errors_for_bad_inputs(tiny_setup, tmp_path) -> None:
    root, model_dir, tasks = tiny_setup
    other_base = _make_tiny_model(tmp_path / "other", hidden=96, seed=5)
    foreign = _make_adapter(other_base, tmp_path / "foreign", seed=3)
    with pytest.raises(AdapterMismatchError, match="another base"):
        quantize_model(_config(root, model_dir, [CalibrationTask("alpha", foreign, tasks[0].calib_path)],
                               "mlgptq", "bad1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationDataError, match="no samples"):
        quantize_model(_config(root, model_dir, [CalibrationTask("alpha", tasks[0].adapter_dir, empty)],
                               "mlgptq", "bad2"))
    poisoned = _make_adapter(model_dir, tmp_path / "poisoned", seed=4, poison=True)
    with pytest.raises(NonFiniteHessianError, match="task 'alpha'"):
        quantize_model(_config(root, model_dir, [CalibrationTask("alpha", poisoned, tasks[0].calib_path)],
                               "mlgptq", "bad3"))


def test_cli_quantize_and_error_exit(tiny_setup, tmp_path, capsys) -> None:
    from inlaid.cli import main

    root, model_dir, tasks = tiny_setup
    task_args = []
    for task in tasks:
        task_args += ["--task", f"{task.name}={task.adapter_dir}:{task.calib_path}"]
    code = main(["quantize", "--model", str(model_dir), *task_args, "--method", "mlgptq", "--bits", "3",
                 "--group-size", "32", "--max-tokens", "48", "--out", str(tmp_path / "cli"), "--no-hessian-state"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "peak memory" in printed and "alpha: 9 samples" in printed
    assert load_gptq_checkpoint(tmp_path / "cli").config["quantization_config"]["bits"] == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["quantize", "--model", str(model_dir), "--task", f"alpha=:{empty}", "--out", str(tmp_path / "x")])
    assert code == 2 and "holds no samples" in capsys.readouterr().err
    # rtn needs no calibration data; every other method says what is missing
    code = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "rtn")])
    assert code == 0 and load_gptq_checkpoint(tmp_path / "rtn").config["quantization_config"]["bits"] == 4
    capsys.readouterr()
    code = main(["quantize", "--model", str(model_dir), "--method", "gptq-mixed", "--out", str(tmp_path / "y")])
    assert code == 2 and "needs calibration data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # the parser's own refusal, as for every number it checks
        main(["quantize", "--model", str(model_dir), *task_args, "--mlgptq-slack", "-0.1",
              "--out", str(tmp_path / "z")])
    assert usage.value.code == 2
    assert "argument --mlgptq-slack: must be a number >= 0, got -0.1" in capsys.readouterr().err


def test_aggregation_study_on_tiny_model(tiny_setup) -> None:
    from inlaid.quant.study import collect_layer_hessians, markdown, run_study

    root, model_dir, tasks = tiny_setup
    hessians = collect_layer_hessians(model_dir, tasks, layers=[1], max_samples=None, max_tokens=64)
    assert set(hessians[1]) == {("alpha", True), ("alpha", False), ("beta", True), ("beta", False)}
    spec = QuantSpec(bits=3, group_size=32)
    variants = ["rtn", "token-mean", "task-mean", "minimax:4:2", "mlgptq", "bounded", "own"]
    results = {r.variant: r for r in run_study(model_dir, hessians, spec, variants)}
    assert results["token-mean"].worst < results["rtn"].worst
    assert results["minimax:4:2"].worst <= results["token-mean"].worst
    # the bounded search starts at the token mean and only keeps rounds that lower the worst task
    assert results["bounded"].worst <= results["token-mean"].worst * (1 + 1e-6)
    assert results["bounded"].mean <= results["token-mean"].mean * 1.05 * (1 + 1e-6)
    assert results["mlgptq"].per_task == results["task-mean"].per_task  # the default is the task mean
    assert results["own"].mean < results["token-mean"].mean
    assert "minimax:4:2" in markdown(list(results.values()), spec, [1])
