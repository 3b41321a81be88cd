"""`make run` (python -m inlaid.demo) ends in one line where a user's machine stops it: a
cache it cannot write the 4-bit base into ended in a traceback from deep in the build, and
Ctrl-C in a 19-frame traceback with no word of the finished layers kept (an outside probe).
Each runs the real demo in a child process on a cache of its own, the model linked in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from inlaid.models.prepare import DEFAULT_MODEL_NAME


def _cache(tmp_path: Path, model_dir: Path) -> Path:
    cache = tmp_path / "cache"
    (cache / "inlaid" / "models").mkdir(parents=True)
    (cache / "inlaid" / "models" / DEFAULT_MODEL_NAME).symlink_to(model_dir)
    return cache


def _demo(cache: Path, script: str = "import sys, inlaid.demo as demo; sys.exit(demo.run_main())"):
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache)})


def test_a_cache_where_the_base_cannot_be_written_is_one_line(tmp_path, model_dir) -> None:
    cache = _cache(tmp_path, model_dir)
    (cache / "inlaid" / "quantized").write_text("a file where the base's folder goes")
    done = _demo(cache)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"make run: the 4-bit base cannot be built in {cache / 'inlaid' / 'quantized'}: "), done.stderr
    assert lines[0].endswith("(set XDG_CACHE_HOME to a writable directory with ~2.5 GB free)")


# The build interrupted (Ctrl-C raises KeyboardInterrupt in the main thread) after two layers.
INTERRUPTED = """
import sys
import inlaid.demo as demo
import inlaid.quant.suite as suite
from inlaid.models.prepare import default_model_dir
from inlaid.quant.partial import PARTIAL_DIR

def interrupted(model_dir, progress):
    partial = suite.suite_checkpoint_dir(model_dir) / PARTIAL_DIR
    partial.mkdir(parents=True)
    for layer in range(2):
        (partial / f"layer_{layer:03d}.safetensors").write_bytes(b"a finished layer")
    raise KeyboardInterrupt

suite.ensure_suite_checkpoint = interrupted
sys.exit(demo.run_main())
"""


def test_an_interrupt_is_one_line_that_says_what_was_kept(tmp_path, model_dir) -> None:
    cache = _cache(tmp_path, model_dir)
    done = _demo(cache, INTERRUPTED)
    assert done.returncode == 130, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("make run: interrupted; 2 finished layers of the 4-bit base kept in ")
    assert lines[0].endswith(": `make run` again resumes")
    resumed = INTERRUPTED.replace("partial.mkdir(parents=True)", "partial.mkdir(parents=True, exist_ok=True)")
    again = _demo(cache, resumed)
    assert "resuming the interrupted build: 2 finished layers kept in " in again.stdout
