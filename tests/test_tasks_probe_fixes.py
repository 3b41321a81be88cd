"""An outside probe's findings on the records `inlaid tasks report` writes and on where
`inlaid train-adapter` writes:

- `tasks report --results R` rebuilt MANIFEST.json's scores and output_lengths.json from R
  alone: a report of one task's --limit 4 run wiped the other tasks' lengths (which the
  scheduler's length predictor trains on) and scores, and replaced 128-example records with
  4-example ones. Now the records are merged, a smaller record replaces a larger one only
  with --replace-smaller, and a score whose adapter changed is dropped, said on stderr.
- `train-adapter` overwrote a finished (checkpoint-less, committed) adapter of other
  settings, and wrote into a directory of unrelated files, both with exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.cli import main
from inlaid.tasks import report
from inlaid.tasks.train import TrainConfig, out_problem

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "adapters"
INLAID = str(Path(sys.executable).parent / "inlaid")
TINY_TRAIN = ["--task", "sentiment", "--split", "calib", "--steps", "1", "--batch-size", "1",
              "--max-length", "64", "--threads", "1"]


# ---------------------------------------------------------------------- tasks report

def _entry(examples: int, accuracy: float) -> dict:
    return {"primary_metric": "accuracy", "examples": examples, "scores": {"accuracy": accuracy},
            "backend": "engine", "dtype": "float32",
            "output_tokens": {"count": examples, "mean": 1.0, "min": 1, "p25": 1.0, "p50": 1.0, "p75": 1.0,
                              "p90": 1.0, "max": 1}}


@pytest.fixture
def report_setup(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Two committed adapters with their committed MANIFEST entries, a copy of the committed
    length record standing in for the packaged one, and results of a 4-example sentiment run."""
    adapters = tmp_path / "adapters"
    committed = json.loads((ADAPTERS / "MANIFEST.json").read_text())
    for name in ("sentiment", "qa"):
        shutil.copytree(ADAPTERS / name, adapters / name)
    manifest = {**committed, "adapters": {n: committed["adapters"][n] for n in ("sentiment", "qa")}}
    (adapters / "MANIFEST.json").write_text(json.dumps(manifest))
    lengths = tmp_path / "output_lengths.json"
    shutil.copyfile(report.OUTPUT_LENGTHS_FILE, lengths)
    monkeypatch.setattr(report, "OUTPUT_LENGTHS_FILE", lengths)  # never the packaged record
    results = tmp_path / "sentiment-limit4.json"
    results.write_text(json.dumps({"model": str(model_dir), "split": "eval", "tasks": {
        "sentiment": {"base": _entry(4, 50.0), "sentiment": _entry(4, 100.0)}}}))
    return {"adapters": adapters, "lengths": lengths, "results": results, "committed": committed,
            "committed_lengths": json.loads(lengths.read_text())}


def test_report_of_one_small_run_keeps_the_other_and_the_larger_records(
        report_setup: dict, capsys: pytest.CaptureFixture) -> None:
    adapters, lengths, results = report_setup["adapters"], report_setup["lengths"], report_setup["results"]
    committed, committed_lengths = report_setup["committed"], report_setup["committed_lengths"]
    assert committed_lengths["tasks"]["sentiment"]["generated"]["base"]["count"] == 128

    assert main(["tasks", "report", "--results", str(results), "--adapters-dir", str(adapters)]) == 0
    captured = capsys.readouterr()
    record = json.loads(lengths.read_text())
    # Every task's lengths are still there, and the 128-output ones were not replaced by 4.
    assert record["tasks"] == committed_lengths["tasks"]
    manifest = json.loads((adapters / "MANIFEST.json").read_text())["adapters"]
    assert manifest["qa"]["eval"] == committed["adapters"]["qa"]["eval"]  # no results for qa: kept
    assert manifest["sentiment"]["eval"] == committed["adapters"]["sentiment"]["eval"]  # 128 kept over 4
    for word in ("sentiment/base (128 outputs recorded, 4 here)", "sentiment (128 examples recorded, 4 here)",
                 "--replace-smaller"):
        assert word in captured.err, (word, captured.err)
    out_lines = captured.out.splitlines()
    assert any(line.startswith(f"{adapters / 'MANIFEST.json'}: ") and "kept for qa" in line for line in out_lines)
    assert any(line.startswith(f"{lengths}: ") and "kept for" in line for line in out_lines), captured.out

    # Asked for, the smaller run replaces its own records; the others stay.
    assert main(["tasks", "report", "--results", str(results), "--adapters-dir", str(adapters),
                 "--replace-smaller"]) == 0
    capsys.readouterr()
    record = json.loads(lengths.read_text())
    assert record["tasks"]["sentiment"]["generated"]["sentiment"]["count"] == 4
    assert set(record["tasks"]) == set(committed_lengths["tasks"])
    assert record["tasks"]["qa"] == committed_lengths["tasks"]["qa"]
    manifest = json.loads((adapters / "MANIFEST.json").read_text())["adapters"]
    assert manifest["sentiment"]["eval"]["examples"] == 4 and manifest["sentiment"]["eval"]["adapter"] == 100.0
    assert manifest["qa"]["eval"] == committed["adapters"]["qa"]["eval"]


def test_report_drops_the_score_of_a_retrained_adapter(report_setup: dict, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file, save_file

    adapters, committed = report_setup["adapters"], report_setup["committed"]
    weights = adapters / "qa" / "adapter_model.safetensors"  # other weights: as a retrained adapter
    save_file({k: (v * 2).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 0
    captured = capsys.readouterr()
    manifest = json.loads((adapters / "MANIFEST.json").read_text())["adapters"]
    assert "eval" not in manifest["qa"]
    assert manifest["sentiment"]["eval"] == committed["adapters"]["sentiment"]["eval"]  # unchanged adapter: kept
    assert "dropped the eval score of qa" in captured.err, captured.err
    assert len(captured.out.splitlines()) == 1 and "dropped for qa" in captured.out, captured.out


# ---------------------------------------------------------------------- train-adapter

def _train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # This tree's package, not whichever one the `inlaid` entry point was installed from.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([INLAID, "train-adapter", *args], capture_output=True, text=True, timeout=600, env=env)


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_adapter_refuses_to_overwrite_a_finished_adapter_of_other_settings(
        model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sentiment"
    shutil.copytree(ADAPTERS / "sentiment", out)  # finished, committed: no checkpoint/
    before = _snapshot(out)
    done = _train([*TINY_TRAIN, "--model", str(model_dir), "--out", str(out), "--rank", "8"], tmp_path)
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("inlaid train-adapter: --out "), err
    for word in ("finished adapter", "lr 0.001 there, 0.0005 here", "split train there, calib here",
                 "steps 80 there, 1 here", "--restart", "another --out"):
        assert word in last, (word, last)
    assert _snapshot(out) == before

    # The committed run's own settings find nothing to refuse, nor does --restart.
    same = TrainConfig(task="sentiment", model_dir=str(model_dir), out_dir=str(out), rank=8, steps=80, lr=1e-3)
    assert out_problem(same) is None and out_problem(TrainConfig("sentiment", str(model_dir), str(out)), True) is None

    restarted = _train([*TINY_TRAIN, "--model", str(model_dir), "--out", str(out), "--rank", "8", "--restart"],
                       tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 1 and training["train_split"] == "calib"


def test_train_adapter_refuses_a_foreign_non_empty_out(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    for extra in ([], ["--restart"]):
        done = _train([*TINY_TRAIN, "--model", str(model_dir), "--out", str(out), *extra], tmp_path)
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1, (done.returncode, err)
        assert err.startswith(f"inlaid train-adapter: --out {out} is not empty"), err
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
