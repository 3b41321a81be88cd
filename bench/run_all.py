"""`make bench`: run every benchmark script under bench/ that defines main()."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

SKIP = {"run_all.py", "quality.py", "soak.py"}  # quality.py is `make eval`; soak.py runs for an hour


def main() -> int:
    failures = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in SKIP:
            continue
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        if not hasattr(module, "main"):
            continue
        print(f"\n===== bench/{path.name} =====", flush=True)
        started = time.perf_counter()
        try:
            module.main()
        except Exception as error:  # report every benchmark, then fail at the end
            failures.append(path.name)
            print(f"bench/{path.name} failed: {error!r}", file=sys.stderr)
        print(f"({time.perf_counter() - started:.0f}s)")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
