"""bench/sched_tune.py: its summary against hand-computed figures, and one real run of the
simulator at smoke size (the same scheduler and policy code as the server)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import sched_tune  # noqa: E402  (bench/ is no package)


def _run(tasks: int, label: str, jct: float, slo: float, ttft: float, wait: float) -> dict:
    return {"tasks": tasks, "cv": 1.0, "popularity": "zipf", "label": label, "mean_jct_s": jct, "slo": slo,
            "p99_ttft_s": ttft, "max_wait_s": wait}


def test_summary_against_hand_computed_figures() -> None:
    report = {"option_sets": {"a": {}}, "runs": [
        _run(10, "fifo", 10.0, 0.8, 2.0, 3.0), _run(10, "a", 5.0, 0.9, 3.0, 7.0),  # FIFO above 50 %: out of reach
        _run(100, "fifo", 20.0, 0.1, 9.0, 30.0), _run(100, "a", 40.0, 0.15, 9.0, 12.0),  # 1.5x FIFO's SLO: missed
    ]}
    (row,) = sched_tune.summary_rows(report)
    assert row.jct_geomean == pytest.approx(math.sqrt(0.5 * 2.0))
    assert (row.jct_best, row.jct_worst, row.jct_at_most_fifo) == (0.5, 2.0, 1)
    assert row.slo_2x_or_out_of_reach == 1 and row.p99_ttft_at_most_fifo == 1
    assert row.max_wait_s == 12.0 and row.workloads == 2


def test_one_configuration_simulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sched_sim

    monkeypatch.setattr(sched_sim, "TASK_COUNTS", (10,))
    monkeypatch.setattr(sched_sim, "CVS", (4.0,))
    monkeypatch.setattr(sched_sim, "POPULARITIES", ("zipf",))
    monkeypatch.setattr(sched_tune, "OPTION_SETS", {"defaults": {}, "beta 2": {"max_adapters_per_step": 2}})
    report = sched_tune.sweep("", requests=60, load=0.8, slots=8, workers=1)
    assert {r["label"] for r in report["runs"]} == {"fifo", "defaults", "beta 2"}
    assert all(r["mean_jct_s"] > 0 and 0 <= r["slo"] <= 1 for r in report["runs"])
    sched_tune.write_markdown(report, tmp_path / "tune.md")
    text = (tmp_path / "tune.md").read_text()
    assert "| beta 2" in text and "/ 1 |" in text and text.count("(start-up tuning's choice)") == 1
