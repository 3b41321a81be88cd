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
