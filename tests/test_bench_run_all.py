"""`make bench ALL=1` (bench/run_all.py --all) runs every bench script's main() in turn."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "a_argparse.py": '''
import argparse
from pathlib import Path
def main(argv=None):
    args = argparse.ArgumentParser().parse_args(argv)
    (Path(__file__).parent / "a.ran").write_text("")
    return {"report": 1}
''',
    "b_exits.py": "import sys\ndef main():\n    sys.exit(3)\n",
    "c_raises.py": "def main():\n    raise RuntimeError('broken bench')\n",
    "d_plain.py": "from pathlib import Path\n"
                  "def main():\n    (Path(__file__).parent / 'd.ran').write_text('')\n    return 0\n",
    "e_helper.py": "VALUE = 1  # a module without main(): not a benchmark\n",
    "f_import_fails.py": "raise ImportError('a library this benchmark needs')\ndef main():\n    return 0\n",
}


def _run_all_module():
    spec = importlib.util.spec_from_file_location("bench_run_all_under_test", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_runs_with_its_own_arguments_and_a_failure_is_that_scripts_alone(tmp_path, monkeypatch,
                                                                                          capsys):
    """Each argparse main() read run_all's own `--all` from sys.argv, refused it (SystemExit 2,
    which the loop did not catch) and ended `make bench ALL=1` at its first script."""
    for name, text in SCRIPTS.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys, "argv", ["bench/run_all.py", "--all"])
    code = _run_all_module().run_every_script(tmp_path, skip=set())
    assert code == 1
    assert (tmp_path / "a.ran").exists() and (tmp_path / "d.ran").exists()
    err = capsys.readouterr().err
    assert "failed: b_exits.py, c_raises.py, f_import_fails.py" in err  # each its own failure, the rest ran
    assert "bench/b_exits.py exited with 3" in err and "broken bench" in err
    assert sys.argv == ["bench/run_all.py", "--all"]  # given back after each script


def test_every_bench_script_answers_help_without_running(monkeypatch, capsys):
    """`bench/sched_predictor.py --help` ignored its arguments, ran the whole benchmark and
    rewrote the committed bench/results/sched_predictor.* (an outside probe)."""
    import inspect

    results = REPO / "bench" / "results"
    before = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    checked = []
    for path in sorted((REPO / "bench").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"bench_help_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        if not hasattr(module, "main"):
            continue
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])  # the main()s that read sys.argv
        try:
            module.main(["--help"]) if inspect.signature(module.main).parameters else module.main()
        except SystemExit as stop:
            assert stop.code in (None, 0), path.name
        else:
            raise AssertionError(f"bench/{path.name} --help ran instead of printing its usage")
        assert "usage:" in capsys.readouterr().out, path.name
        checked.append(path.name)
    assert {"sched_predictor.py", "requantizer_contention.py", "e2e.py", "run_all.py"} <= set(checked)
    assert {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()} == before
