"""`inlaid tasks report` beside adapters of one's own tasks (docs/tasks.md trains them into
adapters/NAME): the manifest keeps the suite's tasks only, so `quantize --suite` still reads
it, and a report with nothing new rewrites no file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from inlaid.cli import main
from inlaid.quant.suite import read_manifest

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _custom_copy(source: Path, target: Path, name: str) -> None:
    """What `train-adapter --task NAME=PATH` leaves: the same files, its task and data recorded."""
    shutil.copytree(source, target)
    training = json.loads((target / "training.json").read_text())
    training["task"] = name
    training["config"] = {**training["config"], "task": f"{name}=/data/{name}.jsonl", "data": f"/data/{name}.jsonl"}
    (target / "training.json").write_text(json.dumps(training))


def test_adapters_of_ones_own_tasks_stay_out_of_the_manifest(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    shutil.copytree(ADAPTERS / "math", adapters / "math")
    _custom_copy(ADAPTERS / "sentiment", adapters / "colours", "colours")
    # An entry an older report wrote for it goes too: quantize --suite failed on it.
    manifest = adapters / "MANIFEST.json"
    manifest.write_text(json.dumps({"base_model": "SmolLM2-135M-Instruct",
                                    "adapters": {"colours": {"task": "colours"}}}))
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 0
    err = capsys.readouterr().err
    assert "left out colours: trained on a task of your own" in err
    assert list(json.loads(manifest.read_text())["adapters"]) == ["math"]
    assert [task.name for task in read_manifest(adapters)] == ["math"]  # what quantize --suite reads


def test_a_report_with_nothing_new_rewrites_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    shutil.copytree(ADAPTERS / "math", adapters / "math")
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 0
    manifest = adapters / "MANIFEST.json"
    written = manifest.read_text()
    os.utime(manifest, ns=(10**18, 10**18))  # any write would move the modification time
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 0
    capsys.readouterr()
    assert manifest.stat().st_mtime_ns == 10**18 and manifest.read_text() == written
