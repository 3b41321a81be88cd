"""`make bench`: the end-to-end suite (bench/e2e.py, ~14 minutes on a quiet 2-core machine).

    .venv/bin/python bench/run_all.py            # make bench:        bench/e2e.py, report in bench/results/e2e/
    .venv/bin/python bench/run_all.py --quick    # make bench QUICK=1: its ~1-minute smoke run (a temp dir)
    .venv/bin/python bench/run_all.py --full     # make bench FULL=1:  Zipf and uniform popularity, bench/results/e2e-full/
    .venv/bin/python bench/run_all.py --all      # make bench ALL=1:   every bench/*.py with a main(), e2e included
                                                 #                     (hours: each script's docstring says how long)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SKIP = {"run_all.py", "quality.py", "soak.py"}  # quality.py is `make eval`; soak.py runs for an hour


def _load(path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run_every_script(bench_dir: Path = BENCH, skip: frozenset[str] | set[str] = SKIP) -> int:
    """Each script's main() with its own defaults: sys.argv is the script's alone while it runs
    (an argparse main() read run_all's `--all`, refused it and ended the whole run at the first
    script), and a SystemExit counts as that script's failure, not everyone's."""
    failures = []
    saved_argv = sys.argv
    for path in sorted(bench_dir.glob("*.py")):
        if path.name in skip:
            continue
        started = time.perf_counter()
        sys.argv = [str(path)]  # before the import too: a module may read it there
        try:
            module = _load(path)  # inside: a script that fails at import is its own failure
            if not hasattr(module, "main"):
                continue
            print(f"\n===== bench/{path.name} =====", flush=True)
            code = module.main()
            if isinstance(code, int) and code:  # an exit status (some main()s return their report)
                failures.append(path.name)
        except SystemExit as stop:  # argparse's refusal, or sys.exit() inside a script
            if stop.code not in (None, 0):
                failures.append(path.name)
                print(f"bench/{path.name} exited with {stop.code}", file=sys.stderr)
        except Exception as error:  # report every benchmark, then fail at the end
            failures.append(path.name)
            print(f"bench/{path.name} failed: {error!r}", file=sys.stderr)
        finally:
            sys.argv = saved_argv
        print(f"({time.perf_counter() - started:.0f}s)")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the end-to-end smoke run only")
    parser.add_argument("--full", action="store_true", help="the end-to-end suite with both popularities")
    parser.add_argument("--all", action="store_true", help="every bench/*.py with a main()")
    args = parser.parse_args(argv)
    if args.all:
        return run_every_script()
    return int(_load(BENCH / "e2e.py").main(["--quick"] * args.quick + ["--full"] * args.full))


if __name__ == "__main__":
    sys.exit(main())
