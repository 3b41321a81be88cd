"""Incremental MLGPTQ against a full MLGPTQ from the same inputs (tiny random Llama, three
PEFT adapters, the real driver): tasks alpha and beta quantized with their state stored,
then gamma added incrementally, compared with a full run over alpha, beta and gamma."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tiny_llama import calibration_tasks, make_adapter, make_tiny_model, quantize_full, write_calibration
from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, WEIGHTS_FILE, load_gptq_checkpoint
from inlaid.quant.incremental import (
    IncrementalError, IncrementalQuantizer, IncrementalSettings, read_layer_tensors, unpack_layer_linear,
)
from inlaid.quant.errors import CheckpointError
from inlaid.quant import incremental
from inlaid.quant.incremental_cli import write_incremental_checkpoint
from inlaid.quant.layer_decisions import KEPT_QUALITY, KEPT_UNCHANGED, REQUANTIZED
from inlaid.quant.model_io import GROUP_OF_LINEAR, LINEAR_NAMES
from inlaid.quant.spec import QuantSpec
from inlaid.quant.state import load_layer_state
from inlaid.quant.task_costs import COSTS_FILE

pytest.importorskip("peft")
LAYERS = 4
SPEC = QuantSpec(bits=4, group_size=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("incremental")
    model = make_tiny_model(root / "model", model_dir, layers=LAYERS)
    tasks = calibration_tasks(model, root, {"alpha": 6, "beta": 7, "gamma": 8})
    quantize_full(model, tasks[:2], root / "ab")
    quantize_full(model, tasks, root / "abc")
    return root, model, tasks


def _run(setup, name: str, **settings) -> list:
    root, model, tasks = setup
    quantizer = IncrementalQuantizer(model, root / "ab", tasks[2], IncrementalSettings(**settings), root / name)
    return list(quantizer.layers())


def _float_weight(model_dir, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor(key + ".weight").double()


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W−Q)X‖²/‖WX‖² in float64, from H = (2/n) X Xᵀ (the independent reference)."""
    delta = weight - quantized.double()
    hessian = hessian.double()
    return float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum())


def test_exact_mode_is_bit_identical_to_full_mlgptq(setup):
    """Existing tasks' Hessians recomputed on the new base, threshold 0, no gate: the same
    packed tensors and the same Hessian state as the full run, layer for layer."""
    root, _, _ = setup
    outcomes = _run(setup, "exact", exact=True, change_threshold=0.0, quality_tolerance=None)
    assert [o.layer for o in outcomes] == list(range(LAYERS))
    for outcome in outcomes:
        assert all(d.action == REQUANTIZED for d in outcome.decisions)
        full = read_layer_tensors(root / "abc" / WEIGHTS_FILE, outcome.layer)
        assert set(full) == set(outcome.tensors)
        for key, tensor in full.items():
            assert torch.equal(tensor, outcome.tensors[key]), key
        full_state, _ = load_layer_state(root / "abc" / HESSIAN_STATE_DIR, outcome.layer)
        ours, _ = load_layer_state(root / "exact", outcome.layer)
        for group, per_task in full_state.items():
            assert list(ours[group]) == list(per_task) == ["alpha", "beta", "gamma"]
            for task, stat in per_task.items():
                assert torch.equal(stat.hessian, ours[group][task].hessian) and stat.tokens == ours[group][task].tokens
    # mlgptq weighs the tasks by their probed costs: alpha's and beta's stored, gamma's probed
    # now, together the full run's own probes
    full_costs = json.loads((root / "abc" / HESSIAN_STATE_DIR / COSTS_FILE).read_text())
    assert json.loads((root / "exact" / COSTS_FILE).read_text()) == full_costs
    assert list(full_costs) == ["alpha", "beta", "gamma"] and len(set(full_costs.values())) == 3


def test_stored_mode_first_group_exact_the_rest_bounded(setup):
    """The default mode runs gamma's forward only. Layer 0's q/k/v read the embeddings, which
    no quantization touches: bit exact. Every later linear's stored alpha/beta Hessians came
    from the OLD quantization of the linears before it: the difference is that drift,
    measured here, and its effect on every task's error (against the full run's own
    Hessians, in float64) stays bounded."""
    root, model, _ = setup
    outcomes = _run(setup, "stored", change_threshold=0.0, quality_tolerance=None)
    layer0 = read_layer_tensors(root / "abc" / WEIGHTS_FILE, 0)
    first_group = [key for key in layer0 if any(f".self_attn.{p}_proj." in key for p in "qkv")]
    assert len(first_group) == 12 and all(torch.equal(layer0[key], outcomes[0].tensors[key]) for key in first_group)
    for outcome in outcomes:
        full_state, _ = load_layer_state(root / "abc" / HESSIAN_STATE_DIR, outcome.layer)
        stored, _ = load_layer_state(root / "stored", outcome.layer)
        for group, per_task in full_state.items():
            drift = max(float((stored[group][t].hessian - s.hessian).norm() / s.hessian.norm())
                        for t, s in per_task.items() if t != "gamma")
            first = outcome.layer == 0 and group == "attn_in"
            assert drift == 0.0 if first else 0.0 < drift < 0.5  # nonzero, and far from another problem
        full = read_layer_tensors(root / "abc" / WEIGHTS_FILE, outcome.layer)
        worst_full, worst_ours = [], []
        for linear in LINEAR_NAMES:
            key = f"model.layers.{outcome.layer}.{linear}"
            weight = _float_weight(model, key)
            stats = full_state[GROUP_OF_LINEAR[linear]]
            ours = unpack_layer_linear(outcome.tensors, key, SPEC, weight.shape[1], weight.shape[0]).dequantize()
            theirs = unpack_layer_linear(full, key, SPEC, weight.shape[1], weight.shape[0]).dequantize()
            worst_ours.append(max(_relative_error(weight, ours, s.hessian) for s in stats.values()))
            worst_full.append(max(_relative_error(weight, theirs, s.hessian) for s in stats.values()))
        # the MLGPTQ objective (worst task), averaged over the layer's linears
        assert sum(worst_ours) <= 1.15 * sum(worst_full)


def test_threshold_keeps_served_layers(setup):
    root, _, _ = setup
    outcomes = _run(setup, "threshold", change_threshold=10.0, quality_tolerance=None)
    assert all(not o.changed and all(d.action == KEPT_UNCHANGED for d in o.decisions) for o in outcomes)
    # gamma's Hessians joined the state anyway: a later addition aggregates over all three
    for layer in range(LAYERS):
        state, _ = load_layer_state(root / "threshold", layer)
        assert all(list(per_task) == ["alpha", "beta", "gamma"] for per_task in state.values())


def test_quality_gate_protects_existing_tasks(setup):
    """tolerance 25 %: no linear is swapped in that raises an existing task's error by more
    (checked in float64 from the stored Hessians); every veto names a task that really lost
    more, and keeps the served codes."""
    root, model, _ = setup
    tolerance = 0.25
    outcomes = _run(setup, "gate", change_threshold=0.0, quality_tolerance=tolerance)
    actions = [d.action for o in outcomes for d in o.decisions]
    assert KEPT_QUALITY in actions and REQUANTIZED in actions
    served_tensors = {layer: read_layer_tensors(root / "ab" / WEIGHTS_FILE, layer) for layer in range(LAYERS)}
    for outcome in outcomes:
        state, _ = load_layer_state(root / "gate", outcome.layer)
        tensors = outcome.tensors or served_tensors[outcome.layer]
        for decision in outcome.decisions:
            key = f"model.layers.{outcome.layer}.{decision.linear}"
            weight = _float_weight(model, key)
            stats = state[GROUP_OF_LINEAR[decision.linear]]
            served = unpack_layer_linear(served_tensors[outcome.layer], key, SPEC, weight.shape[1], weight.shape[0])
            chosen = unpack_layer_linear(tensors, key, SPEC, weight.shape[1], weight.shape[0])
            for task in ("alpha", "beta"):
                before = _relative_error(weight, served.dequantize(), stats[task].hessian)
                after = _relative_error(weight, chosen.dequantize(), stats[task].hessian)
                assert after <= before * (1 + tolerance) * (1 + 1e-5)
                assert decision.errors_served[task] == pytest.approx(before, rel=1e-4)
            if decision.action == KEPT_QUALITY:
                vetoing = decision.reason.split("'")[1]
                assert decision.errors_new[vetoing] > (1 + tolerance) * decision.errors_served[vetoing]
                assert torch.equal(chosen.codes, served.codes)


def test_incremental_checkpoint_serves_and_chains(setup, tmp_path):
    """The offline command's checkpoint: loadable by the engine's reader, lists all three
    tasks, and a second addition starts from it."""
    root, model, tasks = setup
    quantizer = IncrementalQuantizer(model, root / "ab", tasks[2], IncrementalSettings(quality_tolerance=None),
                                     tmp_path / "out" / HESSIAN_STATE_DIR)
    write_incremental_checkpoint(quantizer, list(quantizer.layers()), tmp_path / "out")
    checkpoint = load_gptq_checkpoint(tmp_path / "out")
    assert [t["name"] for t in checkpoint.metadata["tasks"]] == ["alpha", "beta", "gamma"]
    assert len(checkpoint.linears) == 7 * LAYERS
    stored = read_layer_tensors(root / "abc" / WEIGHTS_FILE, 0)
    for key, tensor in read_layer_tensors(tmp_path / "out" / WEIGHTS_FILE, 0).items():
        if ".self_attn.o_proj." not in key and ".mlp." not in key:
            assert torch.equal(tensor, stored[key])  # layer 0's q/k/v: bit-exact with the full run (see above)
    delta = CalibrationTask("delta", make_adapter(model, tmp_path / "adapter_delta", seed=9),
                            write_calibration(tmp_path / "delta.jsonl", "delta", 5))
    chained = IncrementalQuantizer(model, tmp_path / "out", delta, IncrementalSettings(), tmp_path / "state2")
    first = next(iter(chained.layers()))
    state, _ = load_layer_state(tmp_path / "state2", first.layer)
    assert list(state["attn_in"]) == ["alpha", "beta", "gamma", "delta"]


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the missing state was found")


def test_bad_inputs_get_typed_errors(setup, tmp_path, monkeypatch):
    root, model, tasks = setup
    from inlaid.quant.errors import CalibrationDataError

    with pytest.raises(IncrementalError, match="no inlaid_quant.json"):
        IncrementalQuantizer(model, tmp_path, tasks[2], IncrementalSettings(), tmp_path / "s")
    with pytest.raises(IncrementalError, match="quality_tolerance"):
        IncrementalSettings(quality_tolerance=-1.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationDataError):
        IncrementalQuantizer(model, root / "ab", CalibrationTask("x", tasks[2].adapter_dir, empty),
                             IncrementalSettings(), tmp_path / "s")
    shutil.copytree(root / "ab", tmp_path / "no_state", ignore=shutil.ignore_patterns(COSTS_FILE))
    with pytest.raises(IncrementalError, match="probed cost"):  # mlgptq's default weighs tasks by them
        IncrementalQuantizer(model, tmp_path / "no_state", tasks[2], IncrementalSettings(), tmp_path / "s")
    shutil.rmtree(tmp_path / "no_state" / HESSIAN_STATE_DIR)
    (tmp_path / "no_state" / HESSIAN_STATE_DIR).mkdir()
    shutil.copyfile(root / "ab" / HESSIAN_STATE_DIR / COSTS_FILE, tmp_path / "no_state" / HESSIAN_STATE_DIR / COSTS_FILE)
    # found when the job starts, before the model loads, not when its layer loop reaches the first
    # layer without state
    monkeypatch.setattr(incremental, "load_base_model", _no_model_load)
    with pytest.raises(CheckpointError, match=r"no Hessian state for layer\(s\) 0-3 in .*the stored state is "
                                              r"incomplete"):
        IncrementalQuantizer(model, tmp_path / "no_state", tasks[2], IncrementalSettings(), tmp_path / "s2")


def test_a_task_added_again_with_its_samples_moves_no_linear(setup):
    """beta again, with the samples its stored Hessians came from: a linear's change is measured
    from the aggregate the served weights came from, beta's old Hessians in it (without them
    the identical samples read as beta's whole weight moving, every linear past the threshold:
    an outside probe saw all 30 layers of the 4-bit suite base re-quantized to the same weights)."""
    root, model, tasks = setup
    quantizer = IncrementalQuantizer(model, root / "ab", tasks[1], IncrementalSettings(quality_tolerance=None),
                                     root / "beta-again")
    outcomes = list(quantizer.layers())
    changes = [d.change for o in outcomes for d in o.decisions]
    assert len(changes) == LAYERS * len(LINEAR_NAMES)
    assert max(changes) < IncrementalSettings().change_threshold, changes
    assert all(not o.changed and all(d.action == KEPT_UNCHANGED for d in o.decisions) for o in outcomes)
    # a task not stored before (gamma) still moves its linears from the aggregate without it
    first = list(IncrementalQuantizer(model, root / "ab", tasks[2], IncrementalSettings(quality_tolerance=None),
                                      root / "gamma-first").layers())
    assert max(d.change for o in first for d in o.decisions) > IncrementalSettings().change_threshold
