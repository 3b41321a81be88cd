"""Replay a trace against a running `inlaid serve`, open loop, and save per-request timings:
`python -m inlaid.scheduling.replay` (inlaid/scheduling/replay_cli.py, where `--help` says
all) with its progress bar on.

    .venv/bin/python bench/replay.py --address tcp://127.0.0.1:5555 --trace bench/results/sched_trace_real.jsonl \
        --out timings.jsonl
"""

from __future__ import annotations

import sys

from inlaid.scheduling.replay_cli import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "--progress"]))
