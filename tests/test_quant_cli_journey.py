"""Fixes from an outside probe of the `inlaid quantize` / `quantize-add` user journey:

1. a second quantize-add --task is refused (argparse kept the last one silently);
2. checkpoints record absolute adapter and calibration paths (`--exact` from another directory
   failed), and an older checkpoint's relative path is refused saying from where to run;
3. Ctrl-C before the first layer leaves no --out, the "other settings" refusal names them,
   and an interrupted run with finished layers says how to resume;
4. messages: a missing --checkpoint, a file as --model, --threshold named, --out inside an
   adapter refused, the quality gate's reasons summarised per layer, a bar for the cost probe;
5. transformers' is_gradient_checkpointing FutureWarning silenced where adapters attach.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from inlaid.engine.adapter_config import adapter_signature
from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.checkpoint import METADATA_FILE

from test_quant_cli_inputs import _add, _fake_checkpoint, _quantize, no_model_load, tiny  # noqa: F401
from tiny_llama import quantize_full

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _one_line_error(capsys, *needles: str) -> str:
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                    if "Loading weights" not in line and "probe task costs" not in line)
    assert "\n" not in err and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    return err


@pytest.fixture(scope="module")
def relative_checkpoint(tiny, tmp_path_factory):
    """A checkpoint made from the tiny model's directory with relative task paths, as typed."""
    import os

    root, model_dir, adapter, calib = tiny
    here = os.getcwd()
    os.chdir(root)
    try:
        task = CalibrationTask("alpha", Path(adapter.name), Path(calib.name))
        return quantize_full(model_dir, [task], tmp_path_factory.mktemp("relative") / "base")
    finally:
        os.chdir(here)


# ---------------------------------------------------------------- 1: one --task

def test_a_second_task_is_refused(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    checkpoint = _fake_checkpoint(root, model_dir, ["alpha"])
    out = tmp_path / "o"
    assert _add(checkpoint, f"qa={adapter}:{calib}", out, "--task", f"math={adapter}:{calib}") == 2
    _one_line_error(capsys, "quantize-add takes one --task (got 2); run it once per task")
    assert not out.exists()


# ---------------------------------------------------------------- 2: recorded paths

def test_recorded_paths_are_absolute_and_exact_runs_from_elsewhere(tiny, relative_checkpoint, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    root, model_dir, adapter, calib = tiny
    recorded = json.loads((relative_checkpoint / METADATA_FILE).read_text())["tasks"][0]
    assert recorded["adapter"] == str(adapter.absolute()) and recorded["calib"] == str(calib.absolute())
    monkeypatch.chdir(tmp_path)  # not where the checkpoint was made
    assert _add(relative_checkpoint, f"beta={adapter}:{calib}", tmp_path / "plus", "--exact") == 0, \
        capsys.readouterr().err
    added = json.loads((tmp_path / "plus" / METADATA_FILE).read_text())["tasks"]
    assert all(Path(task["calib"]).is_absolute() and Path(task["adapter"]).is_absolute() for task in added)
    assert added[-1]["adapter_signature"] == adapter_signature(adapter)  # quantize-add records it as the driver does


def test_an_old_relative_path_says_where_to_run(tiny, relative_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    import shutil

    root, model_dir, adapter, calib = tiny
    old = tmp_path / "old"
    shutil.copytree(relative_checkpoint, old)
    metadata = json.loads((old / METADATA_FILE).read_text())
    metadata["tasks"][0] |= {"adapter": adapter.name, "calib": calib.name}  # as an older run recorded them
    (old / METADATA_FILE).write_text(json.dumps(metadata))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "plus"
    assert _add(old, f"beta={adapter}:{calib}", out, "--exact") == 2
    _one_line_error(capsys, f"the adapter of task 'alpha' as the relative path {adapter.name}", f"from {tmp_path}",
                    "from the directory `inlaid quantize` ran in")
    assert not out.exists()
    monkeypatch.chdir(root)  # from where it was made, it runs as before
    assert _add(old, f"beta={adapter}:{calib}", out, "--exact") == 0, capsys.readouterr().err


# ---------------------------------------------------------------- 3: interrupts and resumes

def test_an_interrupt_before_the_first_layer_leaves_no_out(tiny, tmp_path, monkeypatch) -> None:
    import inlaid.quant.driver as driver

    root, model_dir, adapter, calib = tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during mlgptq's cost probe

    monkeypatch.setattr(driver, "probe_impurity", interrupted)
    out = tmp_path / "runs" / "o"
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", out, "--no-errors") == 130
    assert not (tmp_path / "runs").exists()


def test_quantize_add_interrupted_before_its_first_layer_leaves_no_out(tiny, relative_checkpoint, tmp_path,
                                                                      monkeypatch) -> None:
    import inlaid.quant.incremental as incremental

    root, model_dir, adapter, calib = tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(incremental, "save_layer_state", interrupted)  # in layer 0
    out = tmp_path / "plus"
    assert _add(relative_checkpoint, f"beta={adapter}:{calib}", out) == 130
    assert not out.exists()


def test_other_settings_are_named_and_the_interrupt_says_how_to_resume(tiny, tmp_path, capsys, monkeypatch) -> None:
    import inlaid.quant.driver as driver

    root, model_dir, adapter, calib = tiny
    real = driver.save_layer_state

    def interrupted_in_layer_1(state_dir, layer_index, *args, **kwargs):
        if layer_index == 1:
            raise KeyboardInterrupt
        return real(state_dir, layer_index, *args, **kwargs)

    monkeypatch.setattr(driver, "save_layer_state", interrupted_in_layer_1)
    out = tmp_path / "o"
    task = f"alpha={adapter}:{calib}"
    assert _quantize(model_dir, task, out, "--no-errors") == 130
    err = capsys.readouterr().err
    assert "probe task costs" in err  # the probe's bar, before the layers'
    assert f"inlaid quantize: 1 finished layer kept in {out}: rerun the same command to resume" in err, err
    assert _quantize(model_dir, task, out, "--no-errors", "--max-samples", "3", "--bits", "3") == 2
    _one_line_error(capsys, "unfinished partial run with other settings", "--max-samples 2 there, 3 here",
                    "--bits 4 there, 3 here", "--restart")


# ---------------------------------------------------------------- 4: messages

def test_a_missing_checkpoint_is_said_to_be_missing(tmp_path, capsys) -> None:
    assert _add(tmp_path / "nonexist", "alpha=:x.jsonl", tmp_path / "o") == 2
    err = _one_line_error(capsys, f"{tmp_path / 'nonexist'} does not exist")
    assert "has no" not in err


def test_a_file_as_model_is_called_a_file(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    assert _quantize(calib, f"alpha={adapter}:{calib}", tmp_path / "o") == 2
    _one_line_error(capsys, f"{calib} is a file, not a directory")


def test_threshold_is_named_by_its_flag(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    checkpoint = _fake_checkpoint(root, model_dir, ["alpha"])
    with pytest.raises(SystemExit) as exited:
        _add(checkpoint, f"beta={adapter}:{calib}", tmp_path / "o", "--threshold", "-1")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--threshold: must be a number >= 0, got -1" in err and "change_threshold" not in err, err


def test_out_inside_an_adapter_is_refused(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    before = sorted(p.name for p in adapter.iterdir())
    for out in (adapter / "q4", adapter / "a" / "b"):
        assert _quantize(model_dir, f"alpha={adapter}:{calib}", out) == 2, out
        _one_line_error(capsys, "overlaps the adapter", "'alpha'")
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_gate_reasons_are_summarised_per_layer() -> None:
    from inlaid.quant.incremental import LayerOutcome
    from inlaid.quant.incremental_cli import decision_lines
    from inlaid.quant.layer_decisions import LinearDecision

    def kept(linear: str) -> LinearDecision:
        return LinearDecision(linear, "kept-quality", 0.1, reason=f"task 'alpha' would lose 50.0% ({linear})")

    outcomes = [LayerOutcome(layer, [kept(f"mlp.{n}") for n in ("up_proj", "gate_proj", "down_proj")]
                             + [LinearDecision("self_attn.q_proj", "kept-unchanged", 0.0, reason="no change")],
                             None, 0.0, 0.0) for layer in range(10)]
    short = decision_lines(outcomes, verbose=False)
    assert len(short) == 11 and short[0].startswith("  layer 0: 3 linears kept-quality"), short
    assert short[-1] == "  (30 linears in all; --verbose lists each)"
    verbose = decision_lines(outcomes, verbose=True)
    assert len(verbose) == 30 and verbose[0] == "  layer 0 mlp.up_proj: task 'alpha' would lose 50.0% (mlp.up_proj)"


# ---------------------------------------------------------------- 5: the FutureWarning

def test_no_gradient_checkpointing_future_warning(tiny, tmp_path) -> None:
    from inlaid.quant.driver import DriverConfig, _prepare
    from inlaid.quant.methods import parse_method
    from inlaid.quant.spec import QuantSpec

    root, model_dir, adapter, calib = tiny
    config = DriverConfig(model_dir=model_dir, tasks=[CalibrationTask("alpha", adapter, calib)],
                          method=parse_method("mlgptq", ["alpha"]), spec=QuantSpec(group_size=32),
                          out_dir=tmp_path / "o", max_samples=1, max_tokens=32, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _prepare(config)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]


def test_large_files_are_told_as_other_files_not_other_contents(tmp_path: Path) -> None:
    """The model's and checkpoint's weights are described by path, size and time (the
    fingerprint hashed them already): a refusal must not claim their contents differ."""
    from inlaid.quant.run_support import files_identity, settings_differences

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    before = files_identity([weights])
    os.utime(weights, ns=(1, 1))  # the same bytes, touched
    after = files_identity([weights])
    assert before != after
    assert settings_differences({"--model": before, "--bits": 4}, {"--model": after, "--bits": 4}) == [
        "--model: other files (path, size or modification time)"]


def test_an_option_left_out_is_named_as_the_default_not_as_none() -> None:
    """quantize-add's refusal read "--max-samples None there, 4 here" (an outside probe)."""
    from inlaid.quant.run_support import settings_differences

    assert settings_differences({"--max-samples": None, "--bits": 4}, {"--max-samples": 4, "--bits": 4}) == [
        "--max-samples not given (the default) there, 4 here"]
    assert settings_differences({"--max-samples": 4}, {"--max-samples": None}) == [
        "--max-samples 4 there, not given (the default) here"]


def test_minimax_runs_its_four_round_search_unless_told(tiny, tmp_path) -> None:
    """`--method minimax` is the unbounded worst-task search docs/quantization.md measured
    (4 rounds); it ran 1 round (no search) once mlgptq's default became 1 (an outside docs
    audit). The rounds given still win, and they change the weights."""
    from safetensors.torch import load_file

    from tiny_llama import make_adapter, write_calibration

    root, model_dir, adapter, calib = tiny
    other = make_adapter(model_dir, tmp_path / "beta_adapter", seed=2, scale=0.6)
    other_calib = write_calibration(tmp_path / "beta.jsonl", "beta", 3)
    tasks = ["--task", f"alpha={adapter}:{calib}", "--task", f"beta={other}:{other_calib}"]

    def quantized(out: str, *extra: str) -> tuple[int, dict]:
        from inlaid.cli import main

        assert main(["quantize", "--model", str(model_dir), *tasks, "--max-samples", "2", "--max-tokens", "48",
                     "--group-size", "32", "--threads", "1", "--method", "minimax", "--out", str(tmp_path / out),
                     *extra]) == 0
        metadata = json.loads((tmp_path / out / METADATA_FILE).read_text())
        return metadata["calibration"]["mlgptq"]["rounds"], load_file(tmp_path / out / "model.safetensors")

    rounds, searched = quantized("default")
    assert rounds == 4
    rounds, told = quantized("four", "--mlgptq-rounds", "4")
    assert rounds == 4 and all(torch.equal(searched[name], told[name]) for name in searched)
    rounds, start_only = quantized("one", "--mlgptq-rounds", "1")
    assert rounds == 1
    assert any(not torch.equal(searched[name], start_only[name]) for name in searched if name.endswith("qweight"))
