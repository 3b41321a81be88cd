"""`inlaid tasks report --out PATH`: the base-vs-adapter report as JSON (by the .json suffix)
or Markdown, and an unusable PATH refused in one line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.cli import main
from inlaid.tasks.report import write_report


def _entry(score: float) -> dict:
    return {"primary_metric": "bleu", "examples": 4, "scores": {"bleu": score, "chrf": 30.0}, "dtype": "float32",
            "output_tokens": {"p50": 5, "p90": 8, "max": 9}}


RESULTS = {"model": "m", "split": "eval", "tasks": {"trans-fr": {"base": _entry(0.3), "trans-fr": _entry(10.9)}}}


def test_report_out_writes_json_or_markdown_by_suffix(tmp_path: Path) -> None:
    as_json = json.loads(write_report(RESULTS, tmp_path / "sub" / "report.json").read_text())
    assert as_json["model"] == "m" and as_json["split"] == "eval" and as_json["scale"] == "0-100"
    [row] = as_json["rows"]
    assert row["task"] == "trans-fr" and row["adapter"] == "trans-fr" and row["metric"] == "bleu"
    assert row["base"] == 0.3 and row["with_adapter"] == 10.9 and row["gain"] == pytest.approx(10.6)
    markdown = write_report(RESULTS, tmp_path / "report.md").read_text()
    assert markdown.startswith("| task | metric |") and "| trans-fr | bleu | 4 | 0.3 | 10.9 | +10.6 |" in markdown


def test_report_refuses_a_bad_out_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    (tmp_path / "a-file").write_text("")
    cases = [(["--results", str(results), "--out", str(tmp_path)], "--out", "is a directory"),
             (["--results", str(results), "--out", str(tmp_path / "a-file" / "r.json")], "--out", "which is a file"),
             (["--out", str(tmp_path / "r.json")], "--out needs --results", ""),
             (["--results", str(results), "--out", str(tmp_path / "t.md"), "--markdown", str(tmp_path / "t.md")],
              "the same file", "")]
    for args, *named in cases:
        assert main(["tasks", "report", "--adapters-dir", str(adapters), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("inlaid tasks report: ") and " error: " not in err, err
        assert all(word in err for word in named), (named, err)
        assert not (adapters / "MANIFEST.json").exists()


def test_eval_prints_a_percent_sign_on_shares_only() -> None:
    # `bleu=10.90%` read as a share of the examples; BLEU, chrF, ROUGE and F1 are scores
    from inlaid.tasks.evaluate import _shown_score

    assert _shown_score("accuracy", 88.28) == "accuracy=88.28%"
    assert _shown_score("unparsed", 1.5) == "unparsed=1.50%"
    assert [_shown_score(metric, 10.9) for metric in ("bleu", "chrf", "rougeL", "f1")] == [
        "bleu=10.90", "chrf=10.90", "rougeL=10.90", "f1=10.90"]


def _trained_adapter(adapters: Path, name: str) -> Path:
    """A copy of a committed adapter with its training record, as train-adapter leaves it."""
    import shutil

    target = adapters / name
    shutil.copytree(Path(__file__).resolve().parents[1] / "adapters" / name, target)
    return target


def test_report_refuses_a_damaged_manifest_and_foreign_adapters_before_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated MANIFEST.json was read as empty and rewritten (exit 0), its recorded eval
    scores gone; an adapter without training.json was `FileNotFoundError: ...`, one missing a
    field a KeyError traceback. Each is now one line naming the file; nothing is rewritten."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    math = _trained_adapter(adapters, "math")
    manifest = adapters / "MANIFEST.json"
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 0
    capsys.readouterr()
    scored = json.loads(manifest.read_text())
    scored["adapters"]["math"]["eval"] = {"metric": "accuracy", "examples": 128, "adapter": 30.0, "base": 2.0}
    whole = json.dumps(scored)
    for damaged, words in ((whole[:60], "cannot be read as JSON"), ("[1, 2]", "has no 'adapters' object")):
        manifest.write_text(damaged)
        assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"inlaid tasks report: {manifest} {words}") and len(err.splitlines()) == 1, err
        assert manifest.read_text() == damaged  # not rewritten
    manifest.write_text("")  # an empty file holds nothing to lose: written afresh
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 0
    assert "math" in json.loads(manifest.read_text())["adapters"]
    capsys.readouterr()
    manifest.write_text(whole)
    (math / "training.json").unlink()
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 2
    assert capsys.readouterr().err.strip() == (f"inlaid tasks report: {math} has no training.json: the manifest "
                                               "records adapters `inlaid train-adapter` trained; keep other adapters "
                                               "out of --adapters-dir")
    (math / "training.json").write_text(json.dumps({"task": "math"}))
    assert main(["tasks", "report", "--adapters-dir", str(adapters)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"inlaid tasks report: {math / 'training.json'} is not a train-adapter record: it lacks "
                          "rank, lora_alpha,"), err
    assert manifest.read_text() == whole
