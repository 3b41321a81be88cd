"""stdout closed by its reader (`inlaid client metrics | head -5`, `inlaid client --json stats
| head -3`): the command ends quietly with the shell's SIGPIPE status (141), from the one
wrapper every subcommand runs in (`inlaid.cli.main`). It printed `inlaid client:
BrokenPipeError: [Errno 32] Broken pipe` (the broken pipe read as an input error), or, for
output still buffered at exit, Python's "Exception ignored ... BrokenPipeError" (exit 120).

The reader is gone before the command writes (the read end is closed at once), so the
outcome does not hang on a race with `head`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.cli import EXIT_STDOUT_CLOSED, main

ROOT = Path(__file__).resolve().parent.parent
# A client whose replies are long and need no server: the real `inlaid client` code prints them.
FAKE_CLIENT = """
import sys
from inlaid.client import Client
from inlaid.cli import main
Client.metrics = lambda self, *a, **k: "".join(f"inlaid_metric_{i} {i}\\n" for i in range(20000))
Client.stats = lambda self, *a, **k: {f"counter_{i}": i for i in range(20000)}
sys.exit(main(sys.argv[1:]))
"""


def _with_closed_stdout(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone (`head` has read its lines and exited)
    try:
        return subprocess.run([sys.executable, *arguments], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, timeout=120, env={**os.environ, "INLAID_ADDRESS": "tcp://127.0.0.1:9"})
    finally:
        os.close(write_end)


@pytest.mark.parametrize("arguments", [["metrics"], ["--json", "stats"], ["stats"]])
def test_client_output_into_a_closed_pipe_ends_quietly(arguments: list[str]) -> None:
    done = _with_closed_stdout(["-c", FAKE_CLIENT, "client", "--timeout", "5", *arguments])
    assert done.returncode == EXIT_STDOUT_CLOSED == 141, done.stderr
    assert done.stderr == ""


def test_buffered_output_into_a_closed_pipe_ends_quietly() -> None:
    """One short line (`inlaid models path`) sits in stdout's buffer until the exit flushes it."""
    done = _with_closed_stdout(["-m", "inlaid.cli", "models", "path"])
    assert done.returncode == EXIT_STDOUT_CLOSED, done.stderr
    assert done.stderr == ""


def test_a_broken_pipe_elsewhere_is_still_an_error(monkeypatch, capsys) -> None:
    """Only stdout's reader leaving is quiet: a BrokenPipeError while stdout is fine (a
    connection the command writes to) keeps its one-line error and exit 2."""
    import inlaid.models.cli

    def broken(args):  # type: ignore[no-untyped-def]
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inlaid.models.cli, "run", broken)
    assert main(["models", "path"]) == 2
    assert "inlaid models: BrokenPipeError: [Errno 32] Broken pipe" in capsys.readouterr().err


# `make run` (python -m inlaid.demo) prints its tables while it works; its real main takes
# minutes, so a stand-in prints as much as a table does and the real wrapper runs it.
FAKE_DEMO = """
import sys
import inlaid.demo as demo
def main():
    for row in range(20000):
        print(f"task-{row:<10} {row:>8} {row / 3:>10.3f}")
    return 0
demo.main = main
sys.exit(demo.run_main())
"""


def test_make_run_output_into_a_closed_pipe_ends_quietly() -> None:
    done = _with_closed_stdout(["-c", FAKE_DEMO])
    assert done.returncode == EXIT_STDOUT_CLOSED, done.stderr
    assert done.stderr == ""
