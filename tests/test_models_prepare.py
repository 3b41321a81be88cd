"""The default model's preparation (inlaid/models/prepare.py): one converter at a time."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from inlaid.models.prepare import DEFAULT_MODEL_NAME

PREPARE = "from inlaid.models.prepare import prepare_default_model; print(prepare_default_model())"


def test_a_second_preparer_waits_for_the_first_and_uses_its_model(tmp_path):
    """Two processes preparing a fresh cache at once (two test workers, two servers starting):
    the second waits for the first, then finds the model finished and leaves it as it is. It
    converted again beside the first, removing the other's staging folder and then its model.
    The wait is said once on stderr, with the holder's pid (it was silent, as a hang)."""
    cache = tmp_path / "cache"
    model_dir = cache / "inlaid" / "models" / DEFAULT_MODEL_NAME
    model_dir.parent.mkdir(parents=True)
    with open(model_dir.with_name(model_dir.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first preparer, converting
        lock.write("4242\n")
        lock.flush()
        second = subprocess.Popen([sys.executable, "-c", PREPARE], env={**os.environ, "XDG_CACHE_HOME": str(cache)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert second.poll() is None, second.communicate()
        model_dir.mkdir()  # ... finishes: a stand-in for the converted model, with a file of its own
        for name in ("config.json", "model.safetensors", "tokenizer.json", ".inlaid-complete", "first-preparer"):
            (model_dir / name).write_text("{}")
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert stdout.strip() == str(model_dir) and (model_dir / "first-preparer").is_file()
    assert stderr.count("waiting for another process") == 1, stderr
    assert f"waiting for another process building {model_dir} (pid 4242) ..." in stderr
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME + ".lock"]
