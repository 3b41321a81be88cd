"""Bench and tuning tools refuse absurd inputs up front, in one line, and write where told
(each case found by an outside probe, 2026-12-05): a 368-year trace, e2e options checked
only after its servers started (or never), a tuning refusal that did not say which input,
and scheduling benchmarks that could only write into bench/results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.scheduling.autotune import tune_inlaid_options
from inlaid.scheduling.traces import MAX_ARRIVAL_S, Trace, TraceRequest, TraceSpec

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
COST_MODEL = BENCH / "results" / "sched_cost_model.json"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=120)


def _one_line(done: subprocess.CompletedProcess[str], prefix: str, words: str) -> None:
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, (done.returncode, err)
    assert err.startswith(prefix) and words in err and "Traceback" not in err, err


def test_traces_beyond_30_days_are_refused_in_generation_and_loading(tmp_path: Path) -> None:
    assert MAX_ARRIVAL_S == 30 * 24 * 3600
    with pytest.raises(ValueError, match="30 days"):
        TraceSpec(rate=1e-9, num_requests=1000).validate()
    _one_line(_run(str(BENCH / "traces.py"), "--tasks", "3", "--rate", "1e-9", "--out", "t.jsonl", cwd=tmp_path),
              "traces.py: rate 1e-09/s", "30 days")
    assert not (tmp_path / "t.jsonl").exists()
    path = tmp_path / "far.jsonl"
    Trace([TraceRequest(0.0, None, 5, 2, 2), TraceRequest(1e300, None, 5, 2, 2)], {}).save(path)
    with pytest.raises(ValueError, match=r"line 3: arrival_s must be >= 0 and <= 2592000 .*1e\+300"):
        Trace.load(path)


@pytest.mark.parametrize("args, words", [
    (("--quick", "--rates", "0"), "--rates must be >= 1, got 0"),
    (("--quick", "--requests", "0"), "--requests must be >= 1"),
    (("--quick", "--threads", "0"), "--threads must be >= 1"),
    (("--quick", "--popularities", "zipf,pareto"), "unknown 'pareto'"),
    (("--quick", "--task-counts", "9,x"), "--task-counts must be comma-separated positive integers"),
    (("--quick", "--task-counts", "0"), "--task-counts must be comma-separated positive integers"),
    (("--quick", "--device", "tpu"), "--device must be 'cpu', 'cuda' or 'cuda:N'"),
])
def test_e2e_checks_its_arguments_before_any_server_starts(args: tuple[str, ...], words: str) -> None:
    import e2e

    # main() in this process: a refusal returns before anything heavy is imported or started
    # (a run would take minutes: the test's budget is the proof nothing ran).
    from contextlib import redirect_stderr
    from io import StringIO

    err = StringIO()
    with redirect_stderr(err):
        assert e2e.main(list(args)) == 2
    line = err.getvalue().strip()
    assert line.startswith("e2e: ") and words in line and len(line.splitlines()) == 1, line


def test_e2e_out_and_render_are_checked(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    _one_line(_run(str(BENCH / "e2e.py"), "--quick", "--out", str(tmp_path / "file" / "dir")), "e2e: --out", "file")
    _one_line(_run(str(BENCH / "e2e.py"), "--render", "--out", str(tmp_path)), "e2e: --render: cannot read",
              "e2e.json")


def test_tuning_names_the_input_out_of_range(tmp_path: Path) -> None:
    from inlaid.scheduling.autotune import load_cost_model
    from inlaid.scheduling.simulator import EngineShape

    cost = load_cost_model(str(COST_MODEL))
    with pytest.raises(ValueError, match=r"^tuning needs 10 <= requests <= 100000 a workload, got 5$"):
        tune_inlaid_options(cost, EngineShape(), 9, requests=5)
    with pytest.raises(ValueError, match=r"^tuning needs 10 <= requests <= 100000 a workload, got 1000000000$"):
        tune_inlaid_options(cost, EngineShape(), 9, requests=10**9)
    with pytest.raises(ValueError, match=r"^tuning needs 0 < load <= 1, got 2"):
        tune_inlaid_options(cost, EngineShape(), 9, load=2.0)
    tune = ["-m", "inlaid.cli", "tune-scheduler", "--cost-model", str(COST_MODEL)]
    _one_line(_run(*tune, "--requests", "1"), "inlaid tune-scheduler: --requests must be from 10 to 100000", "got 1")
    _one_line(_run(*tune, "--requests", str(10**9)), "inlaid tune-scheduler: --requests must be from 10 to 100000",
              f"got {10**9}")
    config = tmp_path / "server.toml"
    config.write_text("[server]\n")
    _one_line(_run(*tune, "--config", str(config)), "inlaid tune-scheduler:",
              'the default is fifo: set policy = "inlaid"')
    # An input error found inside the tuning comes before any progress line ("simulate: 0run")
    _one_line(_run(*tune, "--lengths", str(config)), "inlaid tune-scheduler:", str(config))


def test_scheduling_benchmarks_write_into_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = BENCH / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.name.startswith("sched_")}
    _run(str(BENCH / "sched_cost.py"), "--refit", "--out-dir", str(tmp_path / "cost")).check_returncode()
    assert {p.name for p in (tmp_path / "cost").iterdir()} == {"sched_cost.md", "sched_cost.png",
                                                                  "sched_cost_model.json"}
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "sched_sim_xeon.json").write_bytes((results / "sched_sim_xeon.json").read_bytes())
    _run(str(BENCH / "sched_sim.py"), "--render", "--tag", "xeon", "--slots", "32", "--out-dir", str(sim)
         ).check_returncode()
    assert {p.name for p in sim.iterdir()} >= {"sched_sim_xeon.md", "sched_sim_xeon_jct.png"}
    import sched_sim
    import sched_tune

    # The tuning sweep shrunk to one configuration (as tests/test_bench_sched_tune.py does)
    monkeypatch.setattr(sched_sim, "TASK_COUNTS", (10,))
    monkeypatch.setattr(sched_sim, "CVS", (4.0,))
    monkeypatch.setattr(sched_sim, "POPULARITIES", ("zipf",))
    monkeypatch.setattr(sched_tune, "OPTION_SETS", {"defaults": {}})
    sched_tune.main(["--requests", "60", "--slots", "8", "--workers", "1", "--out-dir", str(tmp_path / "tune")])
    assert {p.name for p in (tmp_path / "tune").iterdir()} == {"sched_tune.json", "sched_tune.md"}
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.name.startswith("sched_")} == before
    (tmp_path / "file").write_text("")
    done = _run(str(BENCH / "sched_tune.py"), "--out-dir", str(tmp_path / "file"))
    assert done.returncode == 2 and "--out-dir" in done.stderr and "is a file" in done.stderr


@pytest.mark.parametrize("script, args, words", [
    # found by an outside probe, 2026-12-07: --limit -1 meant all but one example (16 h); the
    # others were tracebacks, some after the whole measurement
    ("quality.py", ("--limit", "-1"), "--limit must be a positive integer, got -1"),
    ("quality.py", ("--configs", "4:abc"), "--configs takes BITS:GROUP_SIZE"),
    ("quality.py", ("--configs", "5:128"), "bits must be one of (2, 3, 4, 8)"),
    ("quality.py", ("--out", "FILE/quality.json"), "--out"),
    # 2026-12-07, later: accepted, then refused by `inlaid quantize`'s rule or a traceback in
    # MlgptqOptions when the method's turn came, after the unquantized rows and earlier methods
    ("quality.py", ("--configs", "4:100"), "the group size must be -1 or a power of two >= 32"),
    ("quality.py", ("--variant", "x=bogus:1"), "unknown option bogus; the options are rounds"),
    ("quality.py", ("--variant", "x=rounds:abc"), "Expected `int`, got `str` - at `$.rounds`"),
    ("quality.py", ("--methods", "mlgptq[y]"), "--methods: unknown method 'mlgptq[y]'"),
    # the table was written over the results, and the next --merge run failed to read them
    ("quality.py", ("--out", "r.json", "--markdown", "./r.json"), "--out and --markdown are the same file"),
    ("prefill_stalls.py", ("--prompt-tokens", "9000"), "--prompt-tokens 1-8000"),
    ("int4_many_rows.py", ("--repeats", "0"), "--threads and --repeats must be positive integers"),
    ("int4_many_rows.py", ("--out", "FILE/dir"), "--out"),
    ("kernels_cpu.py", ("--threads", "-1"), "--threads must be 0 (torch's default) or more, got -1"),
    ("row_attention.py", ("--lengths", "20000"), "below the default model's context of 8192 tokens"),
    ("traces.py", ("--tasks", "3", "--out", ""), "--out is empty"),
])
def test_bench_scripts_refuse_bad_arguments_before_any_work(tmp_path: Path, script: str, args: tuple[str, ...],
                                                            words: str) -> None:
    (tmp_path / "FILE").write_text("")
    done = _run(str(BENCH / script), *(arg.replace("FILE", str(tmp_path / "FILE")) for arg in args), cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]  # argparse: the usage, then this line
    assert last.startswith(f"{script}: error: ") and words in last and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written


def test_a_quick_kernel_run_never_writes_over_the_full_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kernels_cpu.py --quick` wrote its fewer shapes over the committed full results, with
    nothing in the files saying so (an outside probe, 2026-12-07)."""
    import kernels_cpu

    monkeypatch.setattr(kernels_cpu, "RESULTS", tmp_path)
    monkeypatch.setattr(kernels_cpu, "PARTS", {"probe": ("a stand-in part", lambda quick: {"quick": quick})})
    assert kernels_cpu.main(["--quick", "--threads", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_cpu_1thread_quick.json",
                                                          "kernels_cpu_1thread_quick.md"]
