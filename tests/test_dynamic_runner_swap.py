"""The executor's layer swap: a runner serving checkpoint AB, with some layers swapped for
those of checkpoint AB+gamma, computes what transformers computes on the float state dict
that mixes the two the same way; a bad swap changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_llama import calibration_tasks, make_tiny_model, quantize_full
from inlaid.engine.config import EngineConfig
from inlaid.protocol import BatchPlan, ChunkPlan, SamplingParams
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, WEIGHTS_FILE, dequantized_state_dict, load_gptq_checkpoint
from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings
from inlaid.quant.incremental_linears import read_layer_tensors
from inlaid.quant.incremental_cli import write_incremental_checkpoint

pytest.importorskip("peft")
SWAPPED = (0, 2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("swap")
    model = make_tiny_model(root / "model", model_dir, layers=3)
    tasks = calibration_tasks(model, root, {"alpha": 5, "beta": 5, "gamma": 5})
    quantize_full(model, tasks[:2], root / "ab")
    quantizer = IncrementalQuantizer(model, root / "ab", tasks[2], IncrementalSettings(quality_tolerance=None),
                                     root / "abc" / HESSIAN_STATE_DIR)
    write_incremental_checkpoint(quantizer, list(quantizer.layers()), root / "abc")
    return model, root / "ab", root / "abc"


def _runner(model, checkpoint):
    from inlaid.engine.runner import ModelRunner

    return ModelRunner(EngineConfig(model_dir=str(model), quantized_dir=str(checkpoint), dtype="float32",
                                    quant_kernel="dense", num_kv_blocks=16, block_size=8, max_lora_slots=1,
                                    max_lora_rank=4))


def _logits(runner, token_ids: list[int]) -> torch.Tensor:
    blocks = list(range(-(-len(token_ids) // 8)))
    plan = BatchPlan(step_id=0, chunks=[ChunkPlan(seq_id=0, token_ids=token_ids, start_pos=0, block_table=blocks,
                                                  adapter_slot=-1, sample=True, sampling=SamplingParams(),
                                                  num_generated=0)])
    return runner.forward_logits(plan)[1][0]


def _reference(model_dir, ab, abc, token_ids: list[int]) -> torch.Tensor:
    """transformers on AB's dequantized weights with the swapped layers taken from AB+gamma."""
    from transformers import LlamaConfig, LlamaForCausalLM

    state = dequantized_state_dict(load_gptq_checkpoint(ab))
    replacement = dequantized_state_dict(load_gptq_checkpoint(abc))
    for key in state:
        if any(key.startswith(f"model.layers.{layer}.") for layer in SWAPPED):
            state[key] = replacement[key]
    model = LlamaForCausalLM(LlamaConfig(**json.loads((model_dir / "config.json").read_text()))).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].float()


def test_swapped_layers_compute_like_the_mixed_checkpoint(checkpoints):
    model, ab, abc = checkpoints
    token_ids = [5, 900, 31, 77, 4000, 12, 8, 19, 250]
    runner = _runner(model, ab)
    for layer in SWAPPED:
        runner.swap_layer(layer, 7, read_layer_tensors(abc / WEIGHTS_FILE, layer))
    assert runner.layer_versions == [7, 0, 7]
    ours = _logits(runner, token_ids)
    assert (ours - _reference(model, ab, abc, token_ids)).abs().max().item() < 1e-4
    # and every layer swapped: the runner equals one loaded from AB+gamma directly
    runner.swap_layer(1, 7, read_layer_tensors(abc / WEIGHTS_FILE, 1))
    assert torch.equal(_logits(runner, token_ids), _logits(_runner(model, abc), token_ids))


def test_bad_swaps_change_nothing(checkpoints):
    model, ab, abc = checkpoints
    token_ids = [3, 14, 15, 92, 65]
    runner = _runner(model, ab)
    before = _logits(runner, token_ids)
    good = read_layer_tensors(abc / WEIGHTS_FILE, 1)
    missing = {k: v for k, v in good.items() if ".mlp.down_proj." not in k}
    other_layer = read_layer_tensors(abc / WEIGHTS_FILE, 2)
    narrow = dict(good)
    narrow["model.layers.1.self_attn.o_proj.qweight"] = good["model.layers.1.self_attn.o_proj.qweight"][:, :8]
    for tensors, match in ((missing, "every projection"), (other_layer, "other layers"), (narrow, "the model has")):
        with pytest.raises(ValueError, match=match):
            runner.swap_layer(1, 1, tensors)
    with pytest.raises(ValueError, match="out of range"):
        runner.swap_layer(3, 1, good)
    assert runner.layer_versions == [0, 0, 0]
    assert torch.equal(_logits(runner, token_ids), before)


def test_swap_only_plan_runs_no_forward(checkpoints):
    model, ab, _ = checkpoints
    result = _runner(model, ab).execute(BatchPlan(step_id=-1, chunks=[]))
    assert result.step_id == -1 and result.sampled == [] and result.num_tokens == 0


def test_float_base_refuses_swaps(checkpoints, tmp_path):
    from inlaid.engine.runner import ModelRunner

    model, _, abc = checkpoints
    runner = ModelRunner(EngineConfig(model_dir=str(model), dtype="float32", num_kv_blocks=4, block_size=8,
                                      max_lora_slots=1, max_lora_rank=4))
    with pytest.raises(ValueError, match="no GPTQ checkpoint"):
        runner.swap_layer(0, 1, read_layer_tensors(abc / WEIGHTS_FILE, 0))


def test_executors_serve_what_the_registry_holds_after_a_restore_fails_on_one(checkpoints, tmp_path):
    """Two executors restore a committed layer: the first reads it, then the file is damaged and
    the second cannot. The layer leaves the registry (a restart serves the checkpoint's), and
    the first, which the old code left serving the dropped layer, goes back to the
    checkpoint's on its next plan: both compute the same logits as a runner that never swapped."""
    from safetensors.torch import save_file

    from inlaid.serve.config import config_from_dict
    from inlaid.serve.executor import apply_swap
    from inlaid.serve.requantization_jobs import RequantizationJobs
    from inlaid.serve.task_records import CommittedLayer
    from inlaid.serve.task_store import TaskStore, file_sha256

    model, ab, abc = checkpoints
    token_ids = [5, 900, 31, 77, 4000, 12]
    store = TaskStore(tmp_path / "state", {"model_dir": str(model), "quantized_dir": str(ab)})
    file = store.layers_dir / "layer_001.v1.safetensors"
    save_file(read_layer_tensors(abc / WEIGHTS_FILE, 1), str(file))
    store.layers[1] = CommittedLayer(version=1, file=str(file), sha256=file_sha256(file))
    store.save()
    jobs = RequantizationJobs(config_from_dict({"server": {"state_dir": "state"}}, base_dir=tmp_path), store, 3,
                              wake=lambda: None, executors=2)
    runners = [_runner(model, ab), _runner(model, ab)]

    def next_plan(executor: int) -> None:  # what the executor's step loop sends, and its answers
        for swap in jobs.take_swaps(executor):
            jobs.on_swap_result(apply_swap(runners[executor], swap), executor=executor)

    next_plan(0)
    assert runners[0].layer_versions == [0, 1, 0]
    file.write_bytes(b"damaged")
    next_plan(1)
    assert 1 not in store.layers and runners[1].layer_versions == [0, 0, 0]
    next_plan(0), next_plan(1)
    assert runners[0].layer_versions == runners[1].layer_versions == [0, 0, 0]
    unswapped = _logits(_runner(model, ab), token_ids)
    assert torch.equal(_logits(runners[0], token_ids), unswapped)
    assert torch.equal(_logits(runners[1], token_ids), unswapped)
    assert not jobs.has_swaps(0) and not jobs.has_swaps(1)
