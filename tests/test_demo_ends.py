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


def test_a_quantizer_error_in_the_build_is_one_line(tmp_path, model_dir) -> None:
    """A disk filling up mid-build raised the quantizer's QuantizationError (not an OSError):
    a 35-line traceback (an outside probe, 2026-12-07)."""
    raising = '''    from inlaid.quant.errors import QuantizationError
    raise QuantizationError("the Hessian state of layer 0 cannot be written: No space left on device")'''
    failing = INTERRUPTED.replace("    raise KeyboardInterrupt", raising)
    done = _demo(_cache(tmp_path, model_dir), failing)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make run: the 4-bit base could not be built in "), done.stderr
    assert "No space left on device" in lines[0] and "Traceback" not in done.stderr
    # Another failure of the quantizer's keeps its traceback: it is what a report needs
    other = failing.replace("the Hessian state of layer 0 cannot be written: No space left on device",
                            "the Cholesky factorization failed")
    done = _demo(_cache(tmp_path / "other", model_dir), other)
    assert done.returncode == 1 and "Traceback" in done.stderr and "Cholesky" in done.stderr, done.stderr[-2000:]


SERVING = """
import asyncio
import sys
import inlaid.demo as demo
import inlaid.serve.demo as serve_demo
from inlaid.serve.demo import BASE_TASK, run_server_demo

async def replay(*args):  # the requests' replay, still running when the signal comes
    print("replaying", flush=True)
    await asyncio.sleep(3600)

serve_demo._replay = replay

def main():
    run_server_demo(sys.argv[1], {}, {BASE_TASK: ["Hi"]}, max_tokens=4, chat=False)
    return 0

demo.main = main
sys.exit(demo.run_main([]))
"""


def test_sigterm_to_the_demo_stops_its_server_and_leaves_nothing(tmp_path, model_dir) -> None:
    """SIGTERM to `python -m inlaid.demo` alone ended it at once: its `inlaid serve` and the
    executor (2 GB) ran on, adopted by init, and the server's folder (its config holds the
    admin token) stayed in /tmp. Now it stops as on Ctrl-C: exit 143, one line, nothing left.
    A real server; the replay is a stand-in that never ends, so the signal lands while it runs."""
    import signal

    temp = tmp_path / "tmp"
    temp.mkdir()
    child = subprocess.Popen([sys.executable, "-c", SERVING, str(model_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(temp)})
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            if line.startswith("replaying"):
                break
        servers = list(temp.glob("inlaid-server-*"))
        assert len(servers) == 1, (servers, child.stderr.read())  # type: ignore[union-attr]
        child.send_signal(signal.SIGTERM)
        code = child.wait(120)
    finally:
        child.kill()
    err = child.stderr.read()  # type: ignore[union-attr]
    assert code == 143 and err.strip().splitlines()[-1] == "make run: terminated (SIGTERM)", err[-3000:]
    assert not list(temp.glob("inlaid-server-*"))
    running = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_mentions(int(pid), str(temp))]
    assert not running, running


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return text.encode() in cmdline.read()
    except OSError:
        return False


def test_the_memory_table_names_the_dtype_the_adapters_are_stored_in(tmp_path) -> None:
    """The table said "fp32 on disk" of the committed adapters, which are float16."""
    import torch
    from safetensors.torch import save_file

    from inlaid.demo import _stored_dtypes, committed_adapters

    for name, dtype in (("half", torch.float16), ("full", torch.float32)):
        (tmp_path / name).mkdir()
        save_file({"lora_A.weight": torch.zeros(2, 3, dtype=dtype)}, str(tmp_path / name / "adapter_model.safetensors"))
    assert _stored_dtypes({"half": tmp_path / "half"}) == "float16"
    assert _stored_dtypes({"half": tmp_path / "half", "full": tmp_path / "full"}) == "float16/float32"
    assert _stored_dtypes(committed_adapters()) == "float16"
