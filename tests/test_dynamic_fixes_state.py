"""A task that leaves the aggregate while a job rewrites the merged Hessian state, then
comes back (a config task listed again at a restart, a removed task added again): the job
and every later one leave it out consistently instead of failing with `KeyError: 'beta'`
(docs/dynamic-tasks.md, "Removing a task")."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tiny_llama import calibration_tasks, make_tiny_model, quantize_full
from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR
from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings
from inlaid.quant.incremental_tasks import stored_layer_tasks
from inlaid.quant.task_costs import COSTS_FILE

pytest.importorskip("peft")
LAYERS = 4
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("dropped")
    model = make_tiny_model(root / "model", model_dir, layers=LAYERS)
    tasks = calibration_tasks(model, root, {"alpha": 4, "beta": 4, "gamma": 4})
    quantize_full(model, tasks[:2], root / "ab")
    return root, model, tasks


def _job(base, state, task: CalibrationTask, drop: list[str]) -> IncrementalQuantizer:
    """As the server's requantizer builds a job: its state dir read first, written to."""
    root, model, _ = base
    return IncrementalQuantizer(model, root / "ab", task, IncrementalSettings(), state, state_dirs=[state],
                                drop_tasks=drop)


def test_a_task_back_after_a_partial_rewrite_is_left_out_of_every_later_job(base, tmp_path, caplog):
    root, _, (alpha, beta, gamma) = base
    state = tmp_path / "hessian_state"
    # beta removed live; gamma's job rewrites layers 0-1 (and the costs) without it, then the
    # server stops mid-job
    interrupted = _job(base, state, gamma, drop=["beta"])
    assert [o.layer for o in itertools.islice(interrupted.layers(), 2)] == [0, 1]
    assert "beta" not in json.loads((state / COSTS_FILE).read_text())
    # the restart: the config lists beta again, so it is no longer dropped; the job resumes
    with caplog.at_level("WARNING", logger="inlaid.incremental"):
        resumed = _job(base, state, gamma, drop=[])
    assert [o.layer for o in resumed.layers(2)] == [0, 1, 2, 3]  # used to fail: KeyError: 'beta' at layer 2
    assert [r.left_out for r in caplog.records if r.getMessage() == "a stored task is left out of the aggregate"] == [
        "beta"]  # the server's log says which and why
    assert set(resumed.left_out) == {"beta"} and "layer(s) 0-1" in resumed.left_out["beta"]
    assert "added again with its calibration" in resumed.left_out["beta"]
    for layer in range(LAYERS):  # the merged state is consistent again: beta nowhere, alpha and gamma everywhere
        assert all(tasks == {"alpha", "gamma"} for tasks in stored_layer_tasks([state], layer).values())
    # every later addition runs too (it failed at the same layer, for good)
    later = _job(base, state, CalibrationTask("delta", gamma.adapter_dir, gamma.calib_path), drop=[])
    assert later.left_out == {}  # nothing of beta is left to trip over
    assert [o.layer for o in later.layers()] == list(range(LAYERS))
    assert set(json.loads((state / COSTS_FILE).read_text())) == {"alpha", "gamma", "delta"}
    # and the checkpoint's own state is untouched: beta's Hessians are still there
    assert all("beta" in tasks for tasks in stored_layer_tasks([root / "ab" / HESSIAN_STATE_DIR], 0).values())


def test_beta_added_again_with_its_calibration_rejoins(base, tmp_path):
    """The way back the message names: beta's own job computes its Hessians afresh in every layer."""
    _, _, (alpha, beta, gamma) = base
    state = tmp_path / "hessian_state"
    list(itertools.islice(_job(base, state, gamma, drop=["beta"]).layers(), 1))
    again = _job(base, state, beta, drop=[])
    assert "beta" not in again.left_out  # its own job drops its stored Hessians anyway
    assert [o.layer for o in again.layers()] == list(range(LAYERS))
    for layer in range(LAYERS):
        assert all("beta" in tasks and "alpha" in tasks for tasks in stored_layer_tasks([state], layer).values())


def test_a_task_without_a_cost_is_a_clear_error_naming_it(base, tmp_path, monkeypatch):
    """What is still inconsistent (a bug past the rule above; an offline exact run over a
    checkpoint whose costs lack a task) names the task and what to do, not `KeyError: 'beta'`."""
    import shutil

    import inlaid.quant.incremental as incremental
    from inlaid.quant.incremental import IncrementalError
    from inlaid.quant.incremental_tasks import StoredTaskSet

    root, model, (alpha, beta, gamma) = base
    checkpoint = Path(shutil.copytree(root / "ab", tmp_path / "ab"))
    costs = checkpoint / HESSIAN_STATE_DIR / COSTS_FILE
    costs.write_text(json.dumps({"alpha": json.loads(costs.read_text())["alpha"]}))
    with pytest.raises(IncrementalError, match="task 'beta' has no probed cost"):
        exact = IncrementalQuantizer(model, checkpoint, gamma, IncrementalSettings(exact=True), tmp_path / "exact")
        next(iter(exact.layers()))
    # the last guard, should the rule ever let such a task through
    monkeypatch.setattr(incremental, "consistent_stored_tasks", lambda *args: StoredTaskSet(frozenset()))
    with pytest.raises(IncrementalError, match=r"layer 0 \(.*\): task 'beta' has Hessians but no cost"):
        stored = IncrementalQuantizer(model, checkpoint, gamma, IncrementalSettings(), tmp_path / "stored")
        next(iter(stored.layers()))
