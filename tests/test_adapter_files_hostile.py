"""An admin call naming hostile adapter files is refused before they are read whole: a FIFO
as adapter_model.safetensors hung the call (and, eight of them, every later add), a link to
/dev/zero was hashed for ever at 100 % CPU, a 20 GB sparse file took 28 s to hash (and
would have been copied into the state directory); the refusal of a file that is not
safetensors echoed its first 8 bytes as a number ("root:x:0" of /etc/passwd). An outside
probe's findings; each check runs in a child process with a time limit, so that the code
before the fix fails the test instead of hanging it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"

_CHECK = """
import sys
from inlaid.serve.config import config_from_dict
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.task_registry import TaskError, TaskRegistry
config = config_from_dict({"model": {"dir": sys.argv[1]}, "executor": {"max_num_seqs": 2, "num_kv_blocks": 16,
                                                                     "max_lora_rank": 16}})
registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "token")
try:
    registry.check_adapter("hostile", sys.argv[2])
    print("ACCEPTED")
except TaskError as error:
    print("REFUSED", error.code, error.message)
"""


def _check(model_dir: Path, adapter: Path) -> str:
    run = subprocess.run([sys.executable, "-c", _CHECK, str(model_dir), str(adapter)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.fixture
def adapter(tmp_path) -> Path:
    return Path(shutil.copytree(ADAPTERS / "qa", tmp_path / "qa"))


def test_a_fifo_as_the_weights_is_refused_without_reading_it(model_dir, adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    answer = _check(model_dir, adapter)
    assert answer.startswith("REFUSED invalid_request") and "not a regular file" in answer, answer


def test_a_link_to_a_device_is_refused_without_reading_it(model_dir, adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    answer = _check(model_dir, adapter)
    assert answer.startswith("REFUSED invalid_request") and "not a regular file" in answer, answer


def test_weights_larger_than_any_lora_of_the_base_are_refused_by_their_size(model_dir, adapter):
    weights = adapter / "adapter_model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(20 << 30)  # sparse: no disk used
    answer = _check(model_dir, adapter)
    assert answer.startswith(f"REFUSED invalid_request adapter 'hostile': adapter_model.safetensors: {20 << 30} "
                             "bytes, over the "), answer
    assert answer.endswith("bytes allowed (a LoRA of rank <= 16 on this base is no larger)"), answer


def test_a_file_that_is_not_safetensors_is_refused_without_echoing_its_bytes(model_dir, adapter, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 30)
    weights = adapter / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(secret)
    answer = _check(model_dir, adapter)
    assert answer.startswith("REFUSED invalid_request") and "is not a safetensors file" in answer, answer
    assert str(int.from_bytes(b"root:x:0", "little")) not in answer


def test_an_integer_of_thousands_of_digits_is_a_named_refusal_not_an_internal_error(model_dir, adapter):
    """Python refuses to read an integer of over 4,300 digits (ValueError, not a JSON error):
    it escaped the checks as "internal server error" with a traceback (an outside probe)."""
    config = adapter / "adapter_config.json"
    text = config.read_text()
    config.write_text(text.replace('"r": 8', '"r": ' + "9" * 5000, 1))
    assert '"r": 999' in config.read_text()
    answer = _check(model_dir, adapter)
    assert answer.startswith("REFUSED invalid_request adapter 'hostile': adapter_config.json is not valid JSON: "
                             "Exceeds the limit (4300 digits)"), answer
    config.write_text(text)
    weights = adapter / "adapter_model.safetensors"
    raw = weights.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + length].replace(b'"shape":[', b'"shape":[' + b"9" * 5000 + b",", 1)
    weights.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length:])
    answer = _check(model_dir, adapter)
    assert answer.startswith("REFUSED invalid_request adapter 'hostile': adapter_model.safetensors has a corrupt "
                             "header: Exceeds the limit (4300 digits)"), answer


def test_an_oversized_config_is_refused_once_by_its_size(model_dir, adapter):
    """Its refusal was wrapped in another ("is not valid JSON: adapter 'hostile': ... is over ...
    bytes"), after the whole file was hashed (a reviewer: 12.7 s for a 3 GB sparse one)."""
    with open(adapter / "adapter_config.json", "r+b") as file:
        file.truncate(3 << 30)
    answer = _check(model_dir, adapter)
    assert answer == "REFUSED invalid_request adapter 'hostile': adapter_config.json is over 1048576 bytes", answer


def test_the_state_directory_copy_reads_no_more_than_the_bounds(tmp_path, adapter):
    """The copy into the state directory reads the descriptor it checked, bounded: a path
    re-pointed at /dev/zero, or a huge file, after the add's checks was copied without end (a
    reviewer filled a disk so)."""
    from inlaid.serve.task_store import TaskStore

    store = TaskStore(tmp_path / "state", {"model_dir": "/m", "quantized_dir": "/q"})
    zero = tmp_path / "calib.jsonl"
    zero.symlink_to("/dev/zero")
    with pytest.raises(OSError, match="not a regular file"):
        store.copy_inputs("qa", str(adapter), str(zero))
    with open(adapter / "adapter_model.safetensors", "r+b") as file:
        file.truncate(5 << 30)
    with pytest.raises(OSError, match=r"5368709120 bytes, over the 1000000 bytes allowed"):
        store.copy_inputs("qa", str(adapter), None, weights_limit=1_000_000)
    assert not list((tmp_path / "state" / "adapters").iterdir())
    assert not list((tmp_path / "state" / "calibration").iterdir())
