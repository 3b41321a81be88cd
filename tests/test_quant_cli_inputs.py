"""`inlaid quantize` / `quantize-add` inputs: an act-order checkpoint is written and served,
and every bad input is one line (exit 2) naming the flag or file, found before the model
loads (the model-loading entry points are replaced by ones that fail the test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inlaid.quant.calibration import CalibrationTask
from inlaid.quant.checkpoint import METADATA_FILE, load_gptq_checkpoint, pack_linear
from inlaid.quant.errors import CheckpointError
from inlaid.quant.gptq import gptq_quantize_many
from inlaid.quant.partial import PARTIAL_DIR, prepare_partial_dir
from inlaid.quant.spec import QuantSpec

from tiny_llama import make_adapter, quantize_full, two_layer_model_or_skip, write_calibration

pytest.importorskip("transformers")
pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_inputs")
    model_dir = two_layer_model_or_skip(root)
    adapter = make_adapter(model_dir, root / "adapter", seed=1, scale=0.3)
    calib = write_calibration(root / "alpha.jsonl", "alpha", 3)
    return root, model_dir, adapter, calib


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model (either command) fails the test: the checks must come first."""
    import inlaid.quant.driver as driver
    import inlaid.quant.incremental_cli as incremental_cli

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(driver, "_prepare", loaded)
    monkeypatch.setattr(incremental_cli, "IncrementalQuantizer", loaded)


def _quantize(model_dir: Path, task: str, out: Path, *extra: str) -> int:
    from inlaid.cli import main

    return main(["quantize", "--model", str(model_dir), "--task", task, "--max-samples", "2", "--max-tokens", "48",
                 "--group-size", "32", "--threads", "1", "--out", str(out), *extra])


def _fake_checkpoint(root: Path, model_dir: Path, tasks: list[str]) -> Path:
    """What quantize-add reads before the model loads: the metadata."""
    checkpoint = root / "fake_checkpoint"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / METADATA_FILE).write_text(json.dumps({"base_model": str(model_dir), "method": "mlgptq", "spec": {},
                                                        "tasks": [{"name": n} for n in tasks]}))
    return checkpoint


def _add(checkpoint: Path, task: str, out: Path, *extra: str) -> int:
    from inlaid.cli import main

    return main(["quantize-add", "--checkpoint", str(checkpoint), "--task", task, "--out", str(out),
                 "--max-samples", "2", "--threads", "1", *extra])


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    return err


# ---------------------------------------------------------------- 1: act-order with static groups

def test_static_act_order_linears_have_their_own_g_idx() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    hessian = 2 * x.T @ x / 256
    spec = QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True)
    results = gptq_quantize_many([torch.randn(16, 64), torch.randn(8, 64), torch.randn(8, 64)], [hessian] * 3, spec)
    tensors = {}
    for name, result in zip("qkv", results):
        assert torch.equal(result.g_idx, (torch.arange(64) // 32).to(torch.int32))
        tensors.update(pack_linear(f"layer.{name}_proj", result))
    pointers = {tensors[f"layer.{n}_proj.g_idx"].untyped_storage().data_ptr() for n in "qkv"}
    assert len(pointers) == 3
    save_file(tensors, "/dev/null")  # safetensors refused tensors that share memory


def test_act_order_checkpoint_is_written_and_served(tiny, tmp_path, capsys) -> None:
    from inlaid.cli import main

    root, model_dir, adapter, calib = tiny
    out = tmp_path / "act"
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", out, "--act-order", "--no-errors") == 0
    checkpoint = load_gptq_checkpoint(out)
    assert checkpoint.config["quantization_config"]["desc_act"] is True
    q_proj = checkpoint.linears["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q_proj.g_idx, (torch.arange(64) // 32).to(torch.int32))
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--quantized", str(out), "--prompt", "Hello",
                 "--max-tokens", "3", "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["finish_reason"] in ("length", "stop")


# ---------------------------------------------------------------- 2-7: refused up front, one line

def test_task_name_peft_refuses_is_refused(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    assert _quantize(model_dir, f"math.v2={adapter}:{calib}", tmp_path / "o") == 2
    _one_line_error(capsys, "'math.v2'", "'-' or '_'")
    checkpoint = _fake_checkpoint(root, model_dir, ["alpha"])
    assert _add(checkpoint, f"math.v2={adapter}:{calib}", tmp_path / "o2") == 2
    _one_line_error(capsys, "'math.v2'")
    # a name of torch's ModuleDict attributes: PEFT's KeyError once the model was loaded (a reviewer)
    assert _quantize(model_dir, f"train={adapter}:{calib}", tmp_path / "o3") == 2
    _one_line_error(capsys, "'train'", "PEFT cannot load an adapter named 'train'")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_uncreatable_out_is_refused(tiny, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", Path("/proc/inlaid-x")) == 2
    _one_line_error(capsys, "--out /proc/inlaid-x")
    checkpoint = _fake_checkpoint(root, model_dir, ["alpha"])
    assert _add(checkpoint, f"beta={adapter}:{calib}", Path("/proc/inlaid-x")) == 2
    _one_line_error(capsys, "--out /proc/inlaid-x")


def test_out_probe_leaves_nothing_behind(tmp_path) -> None:
    from inlaid.cli_args import writable_dir_problem

    assert writable_dir_problem(tmp_path / "a" / "b" / "c", "--out") is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, needles", [
    (["--dynamic-groups"], ["--dynamic-groups", "--act-order"]),
    (["--damp", "-1"], ["--damp", "[0, 10)"]),
    (["--damp", "nan"], ["--damp"]),
    (["--group-size", "0"], ["--group-size", "got 0"]),
])
def test_bad_flags_name_the_flag(tiny, tmp_path, capsys, no_model_load, flags, needles) -> None:
    root, model_dir, adapter, calib = tiny
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", tmp_path / "o", *flags) == 2
    err = _one_line_error(capsys, *needles)
    assert "damp_percent" not in err and "group_size" not in err


def test_every_calibration_line_is_checked(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text(calib.read_text() + "{not json\n")  # line 4, past --max-samples 2
    assert _quantize(model_dir, f"alpha={adapter}:{bad}", tmp_path / "o") == 2
    _one_line_error(capsys, f"{bad}:4: not JSON")
    checkpoint = _fake_checkpoint(root, model_dir, ["alpha"])
    assert _add(checkpoint, f"beta={adapter}:{bad}", tmp_path / "o2") == 2
    _one_line_error(capsys, f"{bad}:4: not JSON")


@pytest.mark.parametrize("user, reference, served", [("", "", False), ("  ", "\n", False), ("2+2?", "", True),
                                                     ("", "4", True)])
def test_a_calibration_sample_without_any_text_is_refused(tiny, tmp_path, capsys, no_model_load, user, reference,
                                                           served) -> None:
    """An outside probe: a sample whose message contents and reference were all empty was
    accepted, and calibrated on the chat template alone."""
    from inlaid.quant.calibration import parse_sample

    line = json.dumps({"messages": [{"role": "user", "content": user}], "reference": reference})
    if served:
        assert parse_sample(line)["reference"] == reference
        return
    root, model_dir, adapter, calib = tiny
    blank = tmp_path / "blank.jsonl"
    blank.write_text(calib.read_text() + line + "\n")
    assert _quantize(model_dir, f"alpha={adapter}:{blank}", tmp_path / "o") == 2
    _one_line_error(capsys, f"{blank}:4: the sample holds no text")


def _copy_adapter(adapter: Path, out: Path) -> Path:
    out.mkdir()
    for path in adapter.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def test_broken_adapters_are_refused(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    nan = _copy_adapter(adapter, tmp_path / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    name = sorted(tensors)[3]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    assert _quantize(model_dir, f"alpha={nan}:{calib}", tmp_path / "o") == 2
    _one_line_error(capsys, "--task alpha", name, "NaN")
    rank = _copy_adapter(adapter, tmp_path / "rank")
    config = json.loads((rank / "adapter_config.json").read_text())
    config["r"] = 2 * config["r"]
    (rank / "adapter_config.json").write_text(json.dumps(config))
    assert _quantize(model_dir, f"alpha={rank}:{calib}", tmp_path / "o") == 2
    _one_line_error(capsys, "--task alpha", "rank mismatch")
    checkpoint = _fake_checkpoint(root, model_dir, ["alpha"])
    assert _add(checkpoint, f"beta={nan}:{calib}", tmp_path / "o2") == 2
    _one_line_error(capsys, name, "NaN")


# ---------------------------------------------------------------- 8: what the messages say

def test_finished_checkpoint_with_other_settings_says_so(tmp_path) -> None:
    out = tmp_path / "done"
    (out / PARTIAL_DIR).mkdir(parents=True)
    (out / PARTIAL_DIR / "run.json").write_text(json.dumps({"fingerprint": "old"}))
    with pytest.raises(CheckpointError, match="partial run"):
        prepare_partial_dir(out, "new", resume=True)
    (out / METADATA_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="finished checkpoint"):
        prepare_partial_dir(out, "new", resume=True)


def test_quantize_add_says_replaced(tiny, tmp_path, capsys) -> None:
    root, model_dir, adapter, calib = tiny
    base = quantize_full(model_dir, [CalibrationTask("alpha", adapter, calib)], tmp_path / "base")
    other = make_adapter(model_dir, tmp_path / "other", seed=2, scale=0.3)
    capsys.readouterr()
    assert _add(base, f"alpha={other}:{calib}", tmp_path / "plus") == 0
    said = capsys.readouterr()
    assert f"alpha replaced (its earlier adapter and Hessians are gone) in a copy of {base} -> " in said.out
    # and before the run, not only at its end (an outside probe)
    note = f"note: {base} already holds a task 'alpha': in {tmp_path / 'plus'}, this adapter replaces it"
    assert note in said.err and said.err.index(note) < said.err.index("add alpha:"), said.err


def _terminate_after(monkeypatch, module, name: str, calls: int = 1) -> None:
    """`module.name` sends this process SIGTERM on its `calls`-th call (then returns as usual)."""
    import os
    import signal

    real, seen = getattr(module, name), []

    def terminating(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            # else SIGTERM would end the test process itself, not fail this test
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "no SIGTERM handler installed"
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, terminating)


def test_sigterm_stops_a_quantization_as_ctrl_c_does(tiny, tmp_path, capsys, monkeypatch) -> None:
    """An outside probe: SIGTERM (a service manager, `timeout`) ended `inlaid quantize` with
    143 and no word, leaving an UNFINISHED --out that Ctrl-C's clean-up would have removed
    (before the first layer) or named for a resume (after it)."""
    import signal

    import inlaid.quant.driver as driver

    root, model_dir, adapter, calib = tiny
    _terminate_after(monkeypatch, driver, "probe_impurity")  # the cost probe, before any layer
    out = tmp_path / "early"
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", out) == 143
    assert capsys.readouterr().err.strip().endswith("inlaid quantize: terminated (SIGTERM)")
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back once main() returned
    monkeypatch.undo()
    _terminate_after(monkeypatch, driver, "save_layer_state", calls=2)  # in layer 1, layer 0 kept
    out = tmp_path / "late"
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", out) == 143
    err = capsys.readouterr().err
    assert "1 finished layer kept" in err and err.strip().endswith("terminated (SIGTERM)"), err
    monkeypatch.undo()
    assert _quantize(model_dir, f"alpha={adapter}:{calib}", out) == 0  # the rerun resumes and finishes
    assert "resum" in capsys.readouterr().out.lower()


def test_quantize_add_says_what_it_did_to_every_task(tiny, tmp_path, capsys) -> None:
    """The summary said how many linears were re-quantized, not how far the aggregate moved nor
    what the job did to the tasks already in. The aggregate's moves read as the record's own
    per-linear `change`; everything kept (a threshold above every move) changes no task's error."""
    import re
    import statistics

    root, model_dir, adapter, calib = tiny
    base = quantize_full(model_dir, [CalibrationTask("alpha", adapter, calib)], tmp_path / "base")
    other = make_adapter(model_dir, tmp_path / "other", seed=2, scale=0.3)
    for threshold, out in (("0", tmp_path / "moved"), ("10", tmp_path / "kept")):
        capsys.readouterr()
        assert _add(base, f"beta={other}:{calib}", out, "--threshold", threshold) == 0
        printed = capsys.readouterr().out
        record = json.loads((out / METADATA_FILE).read_text())["incremental"]
        record = record[-1] if isinstance(record, list) else record
        changes = sorted(linear["change"] for layer in record["layers"] for linear in layer["linears"])
        moved = re.search(r"aggregate moved: median ([\d.]+) %, at most ([\d.]+) %", printed)
        assert moved, printed
        assert float(moved.group(1)) == pytest.approx(100 * changes[len(changes) // 2], abs=0.006)
        assert float(moved.group(2)) == pytest.approx(100 * changes[-1], abs=0.006)
        assert statistics.median(changes) > 0
        effect = r"^  (alpha|beta): mean relative error \S+ -> \S+ \(([+-][\d.]+) %\)$"
        effects = dict(re.findall(effect, printed, re.M))
        assert set(effects) == {"alpha", "beta"}, printed
        if threshold == "10":
            assert effects == {"alpha": "+0.0", "beta": "+0.0"}, printed
        else:  # the new task's own error falls where the base is re-quantized for it
            assert float(effects["beta"]) < 0, printed
