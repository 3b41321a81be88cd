"""`inlaid quantize` / `quantize-add` outputs guarded, from an outside probe of 2026-12-07: two
runs on one --out each deleted and wrote the other's layers and both ended "finished" with a
mix of two methods' weights; `quantize` rewrote a `quantize-add` checkpoint without --restart
(the added task lost); one torn `.partial` layer failed every resume; a lone UTF-16 surrogate in
a calibration line, a damaged run.json or checkpoint metadata ended in tracebacks or errors
naming no file; `quantize-add --out` inside an adapter was written into."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inlaid.build_lock import exclusive_run
from inlaid.quant.calibration import parse_sample
from inlaid.quant.checkpoint import HESSIAN_STATE_DIR, METADATA_FILE
from inlaid.quant.errors import CheckpointError
from inlaid.quant.incremental import IncrementalError, read_checkpoint_metadata
from inlaid.quant.inputs import finished_checkpoint_problem
from inlaid.quant.partial import PARTIAL_DIR, load_partial_layer, partial_path
from inlaid.quant.unfinished import UNFINISHED_FILE, mark_finished

from test_quant_resilience import _add, _one_line_error, _quantize, tiny  # noqa: F401 (tiny: its fixture)

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_a_second_run_on_an_out_being_written_is_refused_at_once(tiny, tmp_path, capsys) -> None:
    """The lock is an flock on a file named by --out's real path (build_lock.run_lock_dir): a
    second open of it, in this process as in another, cannot take it while the first holds it."""
    model_dir, alpha, beta, base = tiny
    out, added = tmp_path / "nested" / "out", tmp_path / "added"
    with exclusive_run(out, RuntimeError):
        assert _quantize(model_dir, alpha, out, "--method", "rtn", "--restart") == 2
        _one_line_error(capsys, f"another run (pid {os.getpid()}) is writing --out {out}", "choose another --out")
        assert not out.exists()  # nothing of it touched
    with exclusive_run(added, RuntimeError):
        assert _add(base, beta, added) == 2
        _one_line_error(capsys, "another run", f"is writing --out {added}")
        assert not added.exists()
    # released: the runs go ahead, and leave no lock file beside their output
    assert _quantize(model_dir, alpha, out, "--method", "rtn") == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with pytest.raises(RuntimeError, match="another run"):
        with exclusive_run(base, RuntimeError), exclusive_run(base, RuntimeError):
            pass


def test_one_directory_under_two_names_is_one_lock_and_nothing_is_written_beside_it(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with exclusive_run(real, RuntimeError):
        with pytest.raises(RuntimeError, match="another run"):
            with exclusive_run(tmp_path / "link", RuntimeError):
                pass
        with pytest.raises(RuntimeError, match="another run"):
            with exclusive_run(tmp_path / "link" / ".." / "real", RuntimeError):
                pass
        with exclusive_run(tmp_path / "a" / "b" / "out", RuntimeError):  # another directory: its own lock
            pass
    # the lock lives in the temporary directory (a read-only parent of --out took none), and goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_lock_directory_others_may_write_is_refused(tmp_path, monkeypatch) -> None:
    """Another user's (or a world-writable) lock directory could take links planted at a lock's
    name, or block the runs: refused in one line, never written through."""
    import inlaid.build_lock as build_lock

    monkeypatch.setattr(build_lock, "RUN_LOCK_BASE", tmp_path)
    with exclusive_run(tmp_path / "out", RuntimeError):  # made mode 0700: taken
        pass
    directory = build_lock.run_lock_dir(RuntimeError)
    assert directory.parent == tmp_path and directory.stat().st_mode & 0o777 == 0o700
    os.chmod(directory, 0o777)
    with pytest.raises(RuntimeError, match="not a directory of this user's that only it may write"):
        with exclusive_run(tmp_path / "out", RuntimeError):
            pass
    os.chmod(directory, 0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    with exclusive_run(tmp_path / "out", RuntimeError):
        pass
    lock_name = next(iter(build_lock.run_lock_dir(RuntimeError).iterdir()), None)
    assert lock_name is None  # removed at the end
    import hashlib

    planted = directory / (hashlib.sha256(os.path.realpath(tmp_path / "out").encode()).hexdigest()[:32] + ".lock")
    planted.symlink_to(victim)
    with pytest.raises(RuntimeError, match="cannot open the run lock"):
        with exclusive_run(tmp_path / "out", RuntimeError):
            pass
    assert victim.read_text() == "keep me"


def test_quantize_does_not_rewrite_a_quantize_add_checkpoint(tiny, tmp_path, capsys) -> None:
    model_dir, alpha, beta, _ = tiny
    base, plus = tmp_path / "base", tmp_path / "plus"
    assert _quantize(model_dir, alpha, base) == 0
    assert _add(base, beta, plus) == 0
    metadata = json.loads((plus / METADATA_FILE).read_text())
    assert "fingerprint" not in metadata["calibration"]
    capsys.readouterr()
    assert _quantize(model_dir, alpha, plus) == 2  # the inputs that made the base
    _one_line_error(capsys, "finished checkpoint made with other settings", "--restart")
    assert [task["name"] for task in json.loads((plus / METADATA_FILE).read_text())["tasks"]] == ["alpha", "beta"]
    # a quantize-add checkpoint written before the fix kept its base's fingerprint: refused too
    base_fingerprint = json.loads((base / METADATA_FILE).read_text())["calibration"]["fingerprint"]
    metadata["calibration"]["fingerprint"] = base_fingerprint
    (plus / METADATA_FILE).write_text(json.dumps(metadata))
    assert "other settings" in finished_checkpoint_problem(plus, base_fingerprint)
    assert finished_checkpoint_problem(base, base_fingerprint) is None


def test_a_torn_partial_layer_is_computed_again(tiny, tmp_path) -> None:
    model_dir, alpha, _, _ = tiny
    out = tmp_path / "out"
    assert _quantize(model_dir, alpha, out) == 0
    weights = load_file(str(out / "model.safetensors"))
    partial_path(out, 1).write_bytes(b"")  # what a crash between the write and its sync can leave
    with pytest.raises(CheckpointError, match=r"layer_001\.safetensors, a finished layer .* cannot be read"):
        load_partial_layer(out, 1)
    assert _quantize(model_dir, alpha, out) == 0  # resumes at layer 1
    again = load_file(str(out / "model.safetensors"))
    assert set(again) == set(weights) and all(torch.equal(again[name], weights[name]) for name in weights)
    assert load_partial_layer(out, 1)[0]


def test_a_damaged_run_record_is_named(tiny, tmp_path, capsys) -> None:
    model_dir, alpha, beta, base = tiny
    out = tmp_path / "out"
    assert _quantize(model_dir, alpha, out) == 0
    (out / PARTIAL_DIR / "run.json").write_text("{")
    capsys.readouterr()
    assert _quantize(model_dir, alpha, out) == 2
    _one_line_error(capsys, f"{out / PARTIAL_DIR / 'run.json'} is damaged", "--restart")
    assert _quantize(model_dir, alpha, out, "--restart") == 0

    added = tmp_path / "added"
    (added / PARTIAL_DIR).mkdir(parents=True)
    (added / UNFINISHED_FILE).write_text("interrupted\n")
    (added / PARTIAL_DIR / "run.json").write_bytes(b"\xff\xfe")
    capsys.readouterr()
    assert _add(base, beta, added) == 2
    _one_line_error(capsys, f"{added / PARTIAL_DIR / 'run.json'} is damaged", "--restart")


def test_damaged_checkpoint_metadata_is_named_before_any_work(tiny, tmp_path, capsys) -> None:
    _, _, beta, base = tiny
    for field, change, needle in (("spec", lambda m: m.pop("spec"), "'spec' is missing"),
                                  ("method", lambda m: m.pop("method"), "'method' is missing"),
                                  ("spec", lambda m: m["spec"].update(foo=1), "'spec' is not valid"),
                                  ("tasks", lambda m: m.update(tasks=[{"nom": "alpha"}]), "'tasks' must be")):
        checkpoint = tmp_path / f"copy-{field}"
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.copytree(base, checkpoint, ignore=shutil.ignore_patterns(HESSIAN_STATE_DIR, PARTIAL_DIR))
        metadata = json.loads((checkpoint / METADATA_FILE).read_text())
        change(metadata)
        (checkpoint / METADATA_FILE).write_text(json.dumps(metadata))
        with pytest.raises(IncrementalError, match=needle):
            read_checkpoint_metadata(checkpoint)
        assert _add(checkpoint, beta, tmp_path / "out") == 2
        _one_line_error(capsys, str(checkpoint / METADATA_FILE), needle, "rebuild it")
        assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_in_a_calibration_line_is_refused_by_line(tiny, tmp_path, capsys) -> None:
    model_dir, alpha, _, _ = tiny
    with pytest.raises(ValueError, match=r"messages\[0\]\.content holds a lone UTF-16 surrogate"):
        parse_sample(r'{"messages": [{"role": "user", "content": "hi \udc80"}], "reference": "x"}')
    with pytest.raises(ValueError, match="reference holds a lone UTF-16 surrogate"):
        parse_sample(r'{"messages": [{"role": "user", "content": "hi"}], "reference": "x \ud800"}')
    # a pair of them is one character, taken
    assert parse_sample(r'{"messages": [{"role": "user", "content": "\ud83d\ude00"}], "reference": "x"}')
    calib = tmp_path / "surrogate.jsonl"
    calib.write_text('{"messages": [{"role": "user", "content": "fine"}], "reference": "x"}\n'
                     r'{"messages": [{"role": "user", "content": "hi \udc80"}], "reference": "x"}' + "\n")
    adapter = alpha.split("=", 1)[1].split(":", 1)[0]
    assert _quantize(model_dir, f"t={adapter}:{calib}", tmp_path / "out") == 2
    _one_line_error(capsys, f"{calib}:2", "lone UTF-16 surrogate")
    assert not (tmp_path / "out").exists()


def test_quantize_add_out_inside_an_adapter_is_refused(tiny, tmp_path, capsys) -> None:
    _, _, beta, base = tiny
    adapter, calib = beta.split("=", 1)[1].split(":", 1)
    copy = Path(shutil.copytree(adapter, tmp_path / "gamma"))
    before = sorted(p.name for p in copy.iterdir())
    assert _add(base, f"gamma={copy}:{calib}", copy / "checkpoint") == 2
    _one_line_error(capsys, "overlaps the adapter", "'gamma'")
    assert sorted(p.name for p in copy.iterdir()) == before


def test_finished_files_reach_the_disk_before_the_mark_goes(tmp_path, monkeypatch) -> None:
    out = tmp_path / "checkpoint"
    (out / HESSIAN_STATE_DIR).mkdir(parents=True)
    for name in ("model.safetensors", METADATA_FILE, UNFINISHED_FILE, f"{HESSIAN_STATE_DIR}/layer_000.safetensors"):
        (out / name).write_text(name)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        synced.append(f"unlink {path.name}")
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    mark_finished(out)
    removal = synced.index(f"unlink {UNFINISHED_FILE}")
    assert {"model.safetensors", METADATA_FILE, "layer_000.safetensors", HESSIAN_STATE_DIR,
            "checkpoint"} <= set(synced[:removal])
    assert synced[removal + 1:] == ["checkpoint"] and not (out / UNFINISHED_FILE).exists()
