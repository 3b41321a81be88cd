"""Interrupted and corrupt quantizer outputs, from an outside probe: an interrupted
`quantize --restart` left the old checkpoint loadable over half-overwritten state; an
interrupted `quantize-add` could neither resume nor restart; a checkpoint whose config says
another bit width than its tensors, or with NaN scales, failed late and naming no tensor;
group sizes the kernels have no fast path for were accepted.

Interruptions are real ones as the CLI sees them: a KeyboardInterrupt (Ctrl-C; `inlaid`
exits 130) raised right after the quantizer has written a given layer's Hessian state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, METADATA_FILE, load_gptq_checkpoint
from inlaid.quant.errors import CheckpointError
from inlaid.quant.partial import PARTIAL_DIR
from inlaid.quant.unfinished import UNFINISHED_FILE

from tiny_llama import make_adapter, quantize_full, two_layer_model_or_skip, write_calibration

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_resilience")
    model_dir = two_layer_model_or_skip(root)
    alpha = make_adapter(model_dir, root / "alpha", seed=1, scale=0.3)
    beta = make_adapter(model_dir, root / "beta", seed=2, scale=0.3)
    alpha_calib = write_calibration(root / "alpha.jsonl", "alpha", 3)
    beta_calib = write_calibration(root / "beta.jsonl", "beta", 3)
    base = quantize_full(model_dir, [CalibrationTask("alpha", alpha, alpha_calib)], root / "base")
    return model_dir, f"alpha={alpha}:{alpha_calib}", f"beta={beta}:{beta_calib}", base


def _quantize(model_dir: Path, task: str, out: Path, *extra: str) -> int:
    from inlaid.cli import main

    return main(["quantize", "--model", str(model_dir), "--task", task, "--max-samples", "2", "--max-tokens", "48",
                 "--threads", "1", "--out", str(out), *extra])


def _add(checkpoint: Path, task: str, out: Path, *extra: str) -> int:
    from inlaid.cli import main

    return main(["quantize-add", "--checkpoint", str(checkpoint), "--task", task, "--out", str(out),
                 "--max-samples", "2", "--threads", "1", *extra])


def _interrupt_after_state_of(monkeypatch, module, layer: int) -> None:
    """Ctrl-C right after `module` has written `layer`'s Hessian state."""
    real = module.save_layer_state

    def save_then_interrupt(state_dir, layer_index, *args, **kwargs):
        path = real(state_dir, layer_index, *args, **kwargs)
        if layer_index == layer:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(module, "save_layer_state", save_then_interrupt)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    return err


# ---------------------------------------------------------------- 1: quantize --restart, interrupted

def test_interrupted_restart_leaves_an_unfinished_checkpoint(tiny, tmp_path, capsys, monkeypatch) -> None:
    import inlaid.quant.driver as driver
    from inlaid.cli import main

    model_dir, alpha, beta, _ = tiny
    out = tmp_path / "ckpt"
    assert _quantize(model_dir, alpha, out, "--group-size", "32") == 0
    assert load_gptq_checkpoint(out).config["quantization_config"]["bits"] == 4
    assert not (out / UNFINISHED_FILE).exists()

    # --restart with other settings, interrupted during layer 1 (layer 0 and the state are new)
    _interrupt_after_state_of(monkeypatch, driver, 1)
    assert _quantize(model_dir, alpha, out, "--group-size", "32", "--bits", "3", "--restart") == 130
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="unfinished checkpoint.*rerun the same command to resume it"):
        load_gptq_checkpoint(out)
    # every consumer refuses it: the engine (generate --quantized) and quantize-add
    assert main(["generate", "--model", str(model_dir), "--quantized", str(out), "--prompt", "Hi",
                 "--max-tokens", "2"]) != 0
    _one_line_error(capsys, str(out), "unfinished")
    assert _add(out, beta, tmp_path / "plus") == 2
    _one_line_error(capsys, "unfinished", "--restart")
    from inlaid.serve.config_parsing import ConfigError, check_quantized_dir  # `inlaid serve`, before executors start

    with pytest.raises(ConfigError, match="model.quantized_dir: .*unfinished checkpoint"):
        check_quantized_dir(str(out))

    # the same command without --restart resumes the interrupted restart at its first missing layer
    assert _quantize(model_dir, alpha, out, "--group-size", "32", "--bits", "3") == 0
    assert "resumed after 1 finished layers" in capsys.readouterr().out
    assert load_gptq_checkpoint(out).config["quantization_config"]["bits"] == 3
    assert not (out / UNFINISHED_FILE).exists()


def test_restart_drops_the_old_hessian_state_first(tiny, tmp_path, monkeypatch) -> None:
    """An interrupted restart leaves none of the old run's Hessian state beside the new one's."""
    import inlaid.quant.driver as driver

    model_dir, alpha, _, _ = tiny
    out = tmp_path / "ckpt"
    assert _quantize(model_dir, alpha, out, "--group-size", "32") == 0
    assert (out / HESSIAN_STATE_DIR / "layer_001.safetensors").is_file()
    _interrupt_after_state_of(monkeypatch, driver, 0)
    assert _quantize(model_dir, alpha, out, "--group-size", "32", "--sym", "--restart") == 130
    assert (out / UNFINISHED_FILE).is_file()
    assert (out / HESSIAN_STATE_DIR / "layer_000.safetensors").is_file()
    assert not (out / HESSIAN_STATE_DIR / "layer_001.safetensors").exists()  # the old run's
    monkeypatch.undo()
    # a later --restart with the first settings starts over and finishes
    assert _quantize(model_dir, alpha, out, "--group-size", "32", "--restart") == 0
    assert load_gptq_checkpoint(out).config["quantization_config"]["sym"] is False


def test_a_checkpoint_being_written_is_called_unfinished_not_foreign(tiny, tmp_path, capsys, monkeypatch) -> None:
    """A first `quantize` run still writing (or interrupted in) its output has no config.json
    or weights yet: `inlaid serve` and `generate --quantized` said it was "not a checkpoint
    written by `inlaid quantize`"; they say it is unfinished and how to resume or restart."""
    import inlaid.quant.driver as driver
    from inlaid.cli import main

    model_dir, alpha, _, _ = tiny
    out = tmp_path / "ckpt"
    # a fresh run, stopped in layer 1 (stopped before its first layer is kept, it leaves no --out)
    _interrupt_after_state_of(monkeypatch, driver, 1)
    assert _quantize(model_dir, alpha, out, "--group-size", "32") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert (out / UNFINISHED_FILE).is_file() and not (out / "config.json").exists()
    resume = "rerun the same command to resume it, or add --restart to start over"
    assert main(["generate", "--model", str(model_dir), "--quantized", str(out), "--prompt", "Hi",
                 "--max-tokens", "2"]) == 2
    err = _one_line_error(capsys, "--quantized", str(out), "unfinished checkpoint", resume)
    assert "not a checkpoint" not in err
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\nquantized_dir = "{out}"\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = _one_line_error(capsys, "model.quantized_dir", str(out), "unfinished checkpoint", resume)
    assert "not a checkpoint" not in err


# ---------------------------------------------------------------- 2: quantize-add, interrupted

def test_interrupted_quantize_add_resumes_to_the_same_checkpoint(tiny, tmp_path, capsys, monkeypatch) -> None:
    import inlaid.quant.incremental as incremental

    model_dir, _, beta, base = tiny
    assert _add(base, beta, tmp_path / "reference") == 0
    out = tmp_path / "plus"
    _interrupt_after_state_of(monkeypatch, incremental, 1)
    assert _add(base, beta, out) == 130
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="unfinished"):
        load_gptq_checkpoint(out)

    assert _add(base, beta, out) == 0  # the same command resumes
    printed = capsys.readouterr().out
    assert "after 1 finished layers" in printed
    # its total is this run's, its parts every layer's (the total read as less than the parts)
    assert "s in this run (the parts include the 1 layer the interrupted run finished)" in printed
    assert not (out / UNFINISHED_FILE).exists() and not (out / PARTIAL_DIR).exists()
    reference, resumed = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "reference", out))
    assert set(resumed) == set(reference)
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    for layer in range(2):
        name = f"{HESSIAN_STATE_DIR}/layer_{layer:03d}.safetensors"
        ref_state, state = load_file(str(tmp_path / "reference" / name)), load_file(str(out / name))
        assert set(state) == set(ref_state) and all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    decisions = [json.loads((d / METADATA_FILE).read_text())["incremental"][-1]["layers"]
                 for d in (tmp_path / "reference", out)]
    assert decisions[0] == decisions[1]
    assert [task["name"] for task in load_gptq_checkpoint(out).metadata["tasks"]] == ["alpha", "beta"]

    # finished: a rerun is refused (one line naming --restart), --restart overwrites it
    assert _add(base, beta, out) == 2
    _one_line_error(capsys, "finished checkpoint", "--restart")
    assert _add(base, beta, out, "--restart") == 0


def test_quantize_add_with_other_settings_needs_restart(tiny, tmp_path, capsys, monkeypatch) -> None:
    import inlaid.quant.incremental as incremental

    model_dir, _, beta, base = tiny
    out = tmp_path / "plus"
    _interrupt_after_state_of(monkeypatch, incremental, 1)  # layer 0 kept (before it, no --out is left)
    assert _add(base, beta, out, "--tolerance", "none") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert _add(base, beta, out) == 2
    _one_line_error(capsys, f"--out {out}", "unfinished run with other", "--restart")
    assert _add(base, beta, out, "--restart") == 0
    assert load_gptq_checkpoint(out).metadata["incremental"][-1]["quality_tolerance"] == 1.0
    capsys.readouterr()
    # the source checkpoint itself is never an --out, --restart or not
    assert _add(base, beta, base, "--restart") == 2
    _one_line_error(capsys, "overlaps the checkpoint")


# ---------------------------------------------------------------- 3: corrupt checkpoints

def _copy(base: Path, out: Path) -> Path:
    shutil.copytree(base, out, ignore=shutil.ignore_patterns(HESSIAN_STATE_DIR, PARTIAL_DIR))
    return out


def _set_quant_config(checkpoint: Path, **values) -> None:
    for name, key in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        config = json.loads((checkpoint / name).read_text())
        (config[key] if key else config).update(values)
        (checkpoint / name).write_text(json.dumps(config))


def test_config_bits_other_than_the_tensors_name_the_tensor(tiny, tmp_path, capsys) -> None:
    from inlaid.cli import main

    model_dir, _, _, base = tiny
    checkpoint = _copy(base, tmp_path / "bits")
    _set_quant_config(checkpoint, bits=8)
    weights = checkpoint / "model.safetensors"
    tensor = "model.layers.0.mlp.down_proj.qweight"  # the first quantized linear, by name
    with pytest.raises(CheckpointError) as raised:
        load_gptq_checkpoint(checkpoint)
    message = str(raised.value)
    assert "\n" not in message
    for needle in (str(weights), tensor, "expected int32 (32, 64)", "found int32 (16, 64)", "look 4-bit"):
        assert needle in message, message
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--quantized", str(checkpoint), "--prompt", "Hi",
                 "--max-tokens", "2"]) != 0
    _one_line_error(capsys, str(weights), tensor, "8-bit")


def test_config_group_size_other_than_the_tensors_names_the_tensor(tiny, tmp_path) -> None:
    _, _, _, base = tiny
    checkpoint = _copy(base, tmp_path / "group")
    _set_quant_config(checkpoint, group_size=64)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.qzeros: expected int32 \(2, 8\).*"
                                              r"group size 64.*found int32 \(4, 8\)"):
        load_gptq_checkpoint(checkpoint)


def test_non_finite_scales_are_refused_at_load(tiny, tmp_path) -> None:
    _, _, _, base = tiny
    checkpoint = _copy(base, tmp_path / "nan")
    weights = checkpoint / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.self_attn.o_proj.scales"
    tensors[name][0, 3] = float("nan")
    tensors[name][1, 0] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{weights}: tensor {name}: expected finite values, found 2 NaN/inf"):
        load_gptq_checkpoint(checkpoint)


# ---------------------------------------------------------------- 4: group sizes

@pytest.fixture
def no_model_load(monkeypatch):
    import inlaid.quant.driver as driver

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(driver, "_prepare", loaded)


@pytest.mark.parametrize("group_size", ["7", "16", "48", "100", "-2"])
def test_group_sizes_without_a_fast_kernel_are_refused(tiny, tmp_path, capsys, no_model_load, group_size) -> None:
    model_dir, alpha, _, _ = tiny
    assert _quantize(model_dir, alpha, tmp_path / "o", "--group-size", group_size) == 2
    _one_line_error(capsys, "--group-size", "power of two", "32, 64, 128", f"got {group_size}")
    assert not (tmp_path / "o").exists()


def test_supported_group_sizes() -> None:
    from inlaid.quant.cli import group_size_supported

    assert all(group_size_supported(g) for g in (-1, 32, 64, 128, 256, 1024))
    assert not any(group_size_supported(g) for g in (0, 1, 7, 16, 48, 96, 127, -2))
