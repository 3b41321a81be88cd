"""The scheduling benchmarks' inputs and interrupts (an outside probe, 2026-12-07): bad values
of bench/sched_tune.py and bench/sched_burst.py were tracebacks minutes in, or ran (`--load 2`);
Ctrl-C printed the tracebacks of the script and of every worker; a non-UTF-8 lengths file was
named by the codec alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import sched_burst  # noqa: E402  (bench/ is no package)
import sched_predictor  # noqa: E402
import sched_tune  # noqa: E402


@pytest.mark.parametrize("script, arguments, words", [
    (sched_tune, ["--load", "0"], "argument --load: must be a number in (0, 1], got 0"),
    (sched_tune, ["--load", "2"], "argument --load: must be a number in (0, 1], got 2"),
    (sched_tune, ["--requests", "0"], "argument --requests: must be an integer in 1..2592000, got 0"),
    (sched_tune, ["--slots", "-1"], "argument --slots: must be an integer in 1..4096, got -1"),
    (sched_tune, ["--workers", "0"], "argument --workers: must be an integer in 1..256, got 0"),
    (sched_burst, ["--requests", "-1"], "argument --requests: must be an integer in 1..2592000, got -1"),
    (sched_burst, ["--tag", "nosuch"], "--tag: cost model file not found"),
    (sched_predictor, ["--out-dir", "/proc/no/such"], "--out-dir /proc/no/such cannot be written"),
])  # fmt: skip
def test_bad_arguments_are_one_line_exit_2_before_any_run(script, arguments, words, tmp_path, capsys) -> None:
    extra = [] if "--out-dir" in arguments or script is sched_predictor else ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as ended:
        script.main(arguments + extra)
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and not any("Traceback" in line for line in err), err


def test_a_bad_lengths_file_is_one_line_naming_it(tmp_path, capsys) -> None:
    from inlaid.scheduling.suite import load_suite_lengths

    bad = tmp_path / "lengths.jsonl"
    bad.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(ValueError, match=rf"{bad} is not UTF-8 text \(invalid start byte at byte 0\)"):
        load_suite_lengths(bad)
    with pytest.raises(SystemExit) as ended:
        sched_burst.main(["--suite-lengths", str(bad), "--out-dir", str(tmp_path)])
    assert ended.value.code == 2 and f"cannot use {bad}" in capsys.readouterr().err


def test_ctrl_c_during_a_sweep_is_one_line_and_exit_130(tmp_path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the workers too."""
    sweep = subprocess.Popen([sys.executable, str(BENCH / "sched_sim.py"), "--quick", "--workers", "2", "--requests",
                              "2000", "--out-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sweep.poll() is None:  # until its pool's two workers exist
        if sum(1 for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == sweep.pid) >= 2:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # into the saturation runs
    try:
        os.killpg(sweep.pid, signal.SIGINT)
        _, err = sweep.communicate(timeout=60)
    finally:  # one that did not end (the old code's hung workers) must not outlive the test
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert sweep.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "sched_sim.py: interrupted; the sweep in progress wrote nothing (each sweep writes its files as it ends)")
    assert not list(tmp_path.glob("sched_sim*"))


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_the_report_library_run_as_a_script_says_what_to_run() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "sched_report.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 1 and "run bench/sched_sim.py --render" in done.stderr


def test_the_simulator_report_states_the_fair_variants_bound(tmp_path) -> None:
    """`inlaid+fair` was labelled with no bound: beside its meter's gap it read as the least fair."""
    import json

    import sched_report

    from inlaid.scheduling.experiment import MAIN_VARIANTS

    report = json.loads((BENCH / "results" / "sched_sim.json").read_text())
    sched_report.write_sim_markdown(report, tmp_path / "sim.md")
    [fair] = [v for v in MAIN_VARIANTS if v.label == "inlaid+fair"]
    assert (f"inlaid+fair: inlaid with `fairness_bound = {fair.options['fairness_bound']:g}` (tokens of VTC's cost"
            in (tmp_path / "sim.md").read_text())
    report["variant_options"] = {"inlaid+fair": {"fairness_bound": 2000.0}}  # a sweep's own record first
    sched_report.write_sim_markdown(report, tmp_path / "sim.md")
    assert "inlaid+fair: inlaid with `fairness_bound = 2000`" in (tmp_path / "sim.md").read_text()
