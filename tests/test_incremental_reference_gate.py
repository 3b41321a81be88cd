"""Incremental re-quantization's quality gate measures each existing task against its
REFERENCE error on a linear, kept in the Hessian state beside its Hessians, not against the
served weight's error: measured against the served one, every job could double a task's error
again (an outside probe saw a task added live end at 3.3x the teacher-forced NLL it had before
its own job, after two more jobs; worse than on the original base). Three jobs chained on a
tiny Llama (alpha and beta quantized fully, then gamma, delta and epsilon added one after
another, each on the layers and state the previous one left); every error is recomputed in
float64 from the stored Hessians."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tiny_llama import calibration_tasks, make_tiny_model, quantize_full
from inlaid.quant.checkpoint import WEIGHTS_FILE
from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings, read_layer_tensors, unpack_layer_linear
from inlaid.quant.model_io import GROUP_OF_LINEAR
from inlaid.quant.spec import QuantSpec
from inlaid.quant.state import load_layer_state, load_reference_errors
from test_dynamic_incremental import _float_weight, _relative_error

pytest.importorskip("peft")
LAYERS = 3
SPEC = QuantSpec(bits=4, group_size=32)
TOLERANCE = 0.25

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def chain(tmp_path_factory, model_dir):  # type: ignore[no-untyped-def]
    """Each job's committed layers (layer -> file) and state directory, in order."""
    root = tmp_path_factory.mktemp("reference_gate")
    model = make_tiny_model(root / "model", model_dir, layers=LAYERS)
    tasks = calibration_tasks(model, root, {"alpha": 6, "beta": 7, "gamma": 8, "delta": 6, "epsilon": 7})
    quantize_full(model, tasks[:2], root / "ab")
    served: dict[int, Path] = {}
    state_dirs: list[Path] = []
    jobs = []
    for task in tasks[2:]:
        out = root / f"job_{task.name}"
        quantizer = IncrementalQuantizer(model, root / "ab", task,
                                         IncrementalSettings(quality_tolerance=TOLERANCE), out,
                                         served_layers=dict(served), state_dirs=[*state_dirs] or None)
        outcomes = list(quantizer.layers())
        before = dict(served)
        for outcome in outcomes:
            if outcome.changed:
                file = root / f"layer_{outcome.layer}.{task.name}.safetensors"
                save_file({k: v.contiguous() for k, v in outcome.tensors.items()}, str(file))
                served[outcome.layer] = file
        jobs.append((task.name, before, dict(served), out, outcomes))
        state_dirs = [out]
    return root, model, jobs, tasks


def _errors(model, root, served: dict[int, Path], layer: int, linear: str, hessians: dict) -> dict[str, float]:
    key = f"model.layers.{layer}.{linear}"
    weight = _float_weight(model, key)
    tensors = read_layer_tensors(served.get(layer, root / "ab" / WEIGHTS_FILE), layer)
    dense = unpack_layer_linear(tensors, key, SPEC, weight.shape[1], weight.shape[0]).dequantize()
    return {task: _relative_error(weight, dense, stat.hessian) for task, stat in hessians.items()}


def test_no_task_drifts_past_the_tolerance_of_its_reference_over_chained_jobs(chain) -> None:
    root, model, jobs, _ = chain
    first_seen: dict[tuple[int, str, str], float] = {}  # (layer, linear, task) -> its reference
    compounding_refused = 0
    for name, before, after, state_dir, outcomes in jobs:
        for outcome in outcomes:
            state, _ = load_layer_state(state_dir, outcome.layer)
            stored = load_reference_errors(state_dir, outcome.layer)
            for decision in outcome.decisions:
                hessians = state[GROUP_OF_LINEAR[decision.linear]]
                served_errors = _errors(model, root, before, outcome.layer, decision.linear, hessians)
                chosen_errors = _errors(model, root, after, outcome.layer, decision.linear, hessians)
                for task in hessians:
                    place = (outcome.layer, decision.linear, task)
                    if place not in first_seen:  # an existing task: its served error; the job's task: its own
                        first_seen[place] = served_errors[task] if task != name else chosen_errors[task]
                    reference = first_seen[place]
                    assert stored[GROUP_OF_LINEAR[decision.linear]][task][decision.linear] == pytest.approx(
                        reference, rel=1e-4), place
                    if task != name:  # the gate: never past (1 + tolerance) x the reference
                        assert chosen_errors[task] <= reference * (1 + TOLERANCE) * (1 + 1e-5), place
                if decision.action == "kept-quality":
                    vetoing = decision.reason.split("'")[1]
                    assert "against its reference error" in decision.reason
                    # the served error would have let it through: the losses would have compounded
                    compounding_refused += decision.errors_new[vetoing] <= (1 + TOLERANCE) * served_errors[vetoing]
    assert len({place[2] for place in first_seen}) == 5
    assert compounding_refused > 0  # this chain holds a case the served-error gate accepted


def test_a_state_without_references_measures_against_the_served_error(chain, tmp_path) -> None:
    """A full run's state (and one written before references were kept) holds none: the
    first job takes the served errors as the references, as the gate measured before."""
    root, _, jobs, _ = chain
    assert load_reference_errors(root / "ab" / "hessian_state", 0) == {}
    first = jobs[0]
    stored = load_reference_errors(first[3], 0)
    assert set(stored["attn_in"]) == {"alpha", "beta", "gamma"}
    assert all(value >= 0 for errors in stored["attn_in"].values() for value in errors.values())
    assert torch.isfinite(torch.tensor(list(stored["attn_in"]["alpha"].values()))).all()


def test_an_exact_job_keeps_the_stored_references(chain, tmp_path) -> None:
    """exact=True recomputes every Hessian, but gates against, and keeps, the references the
    state holds (it took the served errors again: a reviewer)."""
    root, model, jobs, (alpha, beta, gamma, delta, _) = chain
    _, _, served, state_dir, _ = jobs[0]  # gamma's job
    quantizer = IncrementalQuantizer(model, root / "ab", delta, IncrementalSettings(quality_tolerance=TOLERANCE,
                                                                                    exact=True),
                                     tmp_path / "exact", served_layers=served, state_dirs=[state_dir],
                                     existing_tasks=[alpha, beta, gamma])
    list(quantizer.layers())
    for layer in range(LAYERS):
        before, after = load_reference_errors(state_dir, layer), load_reference_errors(tmp_path / "exact", layer)
        for group, tasks in before.items():
            for task in ("alpha", "beta", "gamma"):
                assert after[group][task] == pytest.approx(tasks[task]), (layer, group, task)
