"""The suite checkpoint on a tiny random Llama with two PEFT adapters listed in a manifest:
built once and reused, rebuilt when an input changes, resumed after a crash (equal to an
uninterrupted build), and `inlaid quantize --suite` on the command line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import inlaid.quant.driver as driver
from inlaid.quant.checkpoint import load_gptq_checkpoint
from inlaid.quant.errors import CalibrationDataError
from inlaid.quant.suite import ensure_suite_checkpoint, is_complete, read_manifest, suite_checkpoint_dir

from test_quant_driver import _make_adapter, _make_tiny_model
from tiny_llama import write_calibration

pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def suite_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_suite")
    model_dir = _make_tiny_model(root / "model")
    adapters = root / "adapters"
    _make_adapter(model_dir, adapters / "alpha", seed=1)
    _make_adapter(model_dir, adapters / "beta-dir", seed=2)
    write_calibration(root / "alpha.jsonl", "alpha", 9)
    write_calibration(adapters / "beta.jsonl", "beta", 7)
    manifest = {"base_model": "tiny", "adapters": {
        "alpha": {"task": "alpha", "calib": str(root / "alpha.jsonl")},
        "beta-dir": {"task": "beta", "calib": "beta.jsonl"},  # relative to the manifest
    }}
    (adapters / "MANIFEST.json").write_text(json.dumps(manifest))
    return root, model_dir, adapters


def _options(adapters: Path, cache: Path, **extra) -> dict:
    return {"adapters_dir": adapters, "cache_dir": cache, "group_size": 32, "max_tokens": 48, "max_batch_tokens": 200,
            **extra}


def test_manifest_tasks_and_errors(suite_setup, tmp_path) -> None:
    _, _, adapters = suite_setup
    tasks = read_manifest(adapters)
    assert [(t.name, t.adapter_dir.name, t.calib_path.name) for t in tasks] == [
        ("alpha", "alpha", "alpha.jsonl"), ("beta", "beta-dir", "beta.jsonl")]
    assert [t.name for t in read_manifest(adapters, ["beta"])] == ["beta"]
    with pytest.raises(CalibrationDataError, match="not in"):
        read_manifest(adapters, ["gamma"])
    with pytest.raises(CalibrationDataError, match="does not exist"):
        read_manifest(tmp_path)
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"adapters": {"ghost": {"task": "ghost"}}}))
    with pytest.raises(CalibrationDataError, match="holds no adapter"):
        read_manifest(tmp_path)


def test_built_once_reused_and_rebuilt_when_an_input_changes(suite_setup, tmp_path) -> None:
    root, model_dir, adapters = suite_setup
    cache = tmp_path / "cache"
    first = ensure_suite_checkpoint(model_dir, **_options(adapters, cache), progress=False)
    assert is_complete(first) and first.parent == cache and not (first / ".partial").exists()
    checkpoint = load_gptq_checkpoint(first)
    assert [t["name"] for t in checkpoint.metadata["tasks"]] == ["alpha", "beta"]
    assert checkpoint.metadata["method"] == "mlgptq" and checkpoint.metadata["tasks"][1]["samples"] == 7
    assert (first / "hessian_state" / "layer_001.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_suite_checkpoint(model_dir, **_options(adapters, cache), progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    # every input moves the key: bits, method, samples, a task subset, the calibration text,
    # the adapter's weights
    keys = {first.name}
    for changed in ({"bits": 3}, {"method": "gptq-mean-lora"}, {"calib_samples": 5}, {"tasks": ["beta"]}):
        keys.add(suite_checkpoint_dir(model_dir, **_options(adapters, cache, **changed)).name)
    edited = tmp_path / "adapters"
    shutil.copytree(adapters, edited)
    calib = edited / "beta.jsonl"
    calib.write_text(calib.read_text().replace("beta answer 0", "beta answer zero"))
    keys.add(suite_checkpoint_dir(model_dir, **_options(edited, cache)).name)
    shutil.copytree(adapters, edited, dirs_exist_ok=True)
    _make_adapter(model_dir, edited / "alpha", seed=11)
    keys.add(suite_checkpoint_dir(model_dir, **_options(edited, cache)).name)
    assert len(keys) == 7
    # a copy of the same inputs elsewhere is the same checkpoint
    shutil.copytree(adapters, edited, dirs_exist_ok=True)
    (edited / "MANIFEST.json").write_text((adapters / "MANIFEST.json").read_text())
    assert suite_checkpoint_dir(model_dir, **_options(edited, cache)) == first


def test_interrupted_build_resumes_to_the_same_checkpoint(suite_setup, tmp_path, monkeypatch) -> None:
    root, model_dir, adapters = suite_setup
    options = _options(adapters, tmp_path / "cache", method="gptq-mean-lora", bits=3)
    original = driver._quantize_group

    def crash_in_layer_1(config, layer, prefix, *args):
        if prefix.endswith(".1"):
            raise KeyboardInterrupt("killed during layer 1")
        return original(config, layer, prefix, *args)

    monkeypatch.setattr(driver, "_quantize_group", crash_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        ensure_suite_checkpoint(model_dir, **options, progress=False)
    monkeypatch.setattr(driver, "_quantize_group", original)
    out = suite_checkpoint_dir(model_dir, **options)
    assert not is_complete(out) and (out / ".partial" / "layer_000.safetensors").is_file()
    assert ensure_suite_checkpoint(model_dir, **options, progress=False) == out
    assert json.loads((out / "suite.json").read_text())["layers_resumed"] == 1
    uninterrupted = ensure_suite_checkpoint(model_dir, **{**options, "cache_dir": tmp_path / "other"}, progress=False)
    resumed, fresh = load_file(str(out / "model.safetensors")), load_file(str(uninterrupted / "model.safetensors"))
    assert set(resumed) == set(fresh) and all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_cli_suite(suite_setup, tmp_path, capsys, monkeypatch) -> None:
    from inlaid.cli import main

    root, model_dir, adapters = suite_setup
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    arguments = ["quantize", "--suite", "--tasks", "beta", "--adapters-dir", str(adapters), "--model", str(model_dir),
                 "--method", "rtn", "--group-size", "32", "--max-tokens", "48"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "suite checkpoint (built" in printed and "beta:" in printed
    built = Path(printed.strip().rsplit(": ", 1)[1])
    assert built.parent == tmp_path / "xdg" / "inlaid" / "quantized" and is_complete(built)
    assert main(arguments) == 0
    assert f"suite checkpoint (cached): {built}" in capsys.readouterr().out
    assert main([*arguments, "--task", f"x={adapters / 'alpha'}:{root / 'alpha.jsonl'}"]) == 2
    assert "drop the --task flags" in capsys.readouterr().err
    assert main(["quantize", "--tasks", "beta", "--out", str(tmp_path / "o")]) == 2
    assert "go with --suite" in capsys.readouterr().err
    assert main([*arguments[:3], "gamma", *arguments[4:]]) == 2
    assert "not in" in capsys.readouterr().err
    assert os.listdir(tmp_path / "xdg" / "inlaid" / "quantized")


def test_a_second_process_says_once_that_it_waits_for_the_build_lock(suite_setup, tmp_path, capsys) -> None:
    """Another process building the same checkpoint holds `<key>.lock`: the waiter prints one
    line on stderr naming the checkpoint and the holder's pid (it sat silent 30 s+), then waits
    as before and reuses what the holder built."""
    import fcntl
    import threading
    import time

    _, model_dir, adapters = suite_setup
    options = _options(adapters, tmp_path / "cache", method="rtn")
    out = suite_checkpoint_dir(model_dir, **options)
    out.parent.mkdir(parents=True)
    result: list[Path] = []
    with open(out.parent / f"{out.name}.lock", "w") as held:  # the other builder (flock: per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        waiter = threading.Thread(target=lambda: result.append(
            ensure_suite_checkpoint(model_dir, **options, progress=False)), daemon=True)
        waiter.start()
        err = ""
        deadline = time.monotonic() + 20
        while "waiting for another process" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        waiting = not result and waiter.is_alive()
        out.mkdir()
        (out / "suite.json").write_text("{}")  # the holder finished the checkpoint
    waiter.join(timeout=30)
    err += capsys.readouterr().err
    assert waiting and result == [out]
    assert err.count("waiting for another process") == 1, err
    assert f"waiting for another process building {out} (pid 4242) ..." in err


def test_a_new_build_says_what_else_the_cache_holds(suite_setup, tmp_path, capsys) -> None:
    """Each change of an input is a new key and nothing is deleted (a server may serve an older
    build): an outside probe found 9 builds, 8.5 GB, never mentioned. A new build says so."""
    from inlaid.quant.suite import other_builds_note

    _, model_dir, adapters = suite_setup
    cache = tmp_path / "cache"
    first = ensure_suite_checkpoint(model_dir, **_options(adapters, cache), progress=True)
    assert other_builds_note(first) is None
    assert "also holds" not in capsys.readouterr().err
    second = ensure_suite_checkpoint(model_dir, **_options(adapters, cache, bits=3), progress=True)
    size = sum(file.stat().st_size for file in first.rglob("*") if file.is_file())
    note = f"the quantized-base cache {cache} also holds 1 other build ({size / 1e6:.1f} MB)"
    assert note in capsys.readouterr().err
    assert other_builds_note(first).startswith(f"the quantized-base cache {cache} also holds 1 other build (")
    ensure_suite_checkpoint(model_dir, **_options(adapters, cache, bits=3), progress=True)  # found: no note
    assert "also holds" not in capsys.readouterr().err
    assert second.is_dir() and first.is_dir()  # nothing deleted
