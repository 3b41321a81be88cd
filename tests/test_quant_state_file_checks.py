"""A corrupt inlaid_quant.json or Hessian state file is named, at the start (an outside
quantization probe, 2026-12-06): `quantize-add` and `generate --quantized` printed the JSON
parser's bare "Expecting property name ..." / "Expecting value: line 1 column 993" with no
file named, and a state file cut past its header failed only when the job reached it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inlaid.quant.aggregate import TaskHessian
from inlaid.quant.checkpoint import load_gptq_checkpoint
from inlaid.quant.checkpoint_files import quantized_dir_problem
from inlaid.quant.errors import CheckpointError
from inlaid.quant.incremental_tasks import consistent_stored_tasks
from inlaid.quant.state import save_layer_state
from inlaid.quant.state_files import StateFileError, layer_state_path, read_state_groups
from test_quant_checkpoint_checks import MATH_CALIB, _checkpoint, _one_line_error


def test_a_corrupt_inlaid_quant_json_is_named_by_every_reader(tmp_path, capsys, model_dir) -> None:
    from inlaid.cli import main

    checkpoint = _checkpoint(tmp_path)
    assert quantized_dir_problem(checkpoint) is None
    (checkpoint / "inlaid_quant.json").write_text("{bad")
    expected = f"{checkpoint / 'inlaid_quant.json'} is not readable JSON ("
    assert quantized_dir_problem(checkpoint).startswith(expected)
    with pytest.raises(CheckpointError, match="the checkpoint is corrupt; rebuild it"):
        load_gptq_checkpoint(checkpoint)
    assert main(["generate", "--model", str(model_dir), "--quantized", str(checkpoint), "--prompt", "hi"]) == 2
    _one_line_error(capsys, "inlaid generate: --quantized: " + expected, "rebuild it")
    out = tmp_path / "extended"
    assert main(["quantize-add", "--checkpoint", str(checkpoint), "--task", f"beta=:{MATH_CALIB}",
                 "--max-samples", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, "inlaid quantize-add: " + expected)
    (checkpoint / "inlaid_quant.json").write_bytes(b'{"method": "\xff"}')  # not UTF-8: named too
    assert quantized_dir_problem(checkpoint).startswith(expected)
    (checkpoint / "inlaid_quant.json").write_text("[1, 2]")
    assert quantized_dir_problem(checkpoint).endswith("inlaid_quant.json is not a JSON object: the checkpoint is "
                                                      "corrupt; rebuild it")


def _state_dir(root: Path, layers: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    for layer in range(layers):
        x = torch.randn(16, 8, generator=generator)
        state = {"attn_in": {"alpha": TaskHessian(x.T @ x, 16), "beta": TaskHessian(2 * x.T @ x, 16)}}
        save_layer_state(root, layer, state, "adapter")
    return root


def _cut(keep: int):  # type: ignore[no-untyped-def]
    return lambda data: data[:keep]


def _cut_past_the_header(data: bytes) -> bytes:
    return data[:-10]


def _garble_the_header(data: bytes) -> bytes:
    return data[:8] + data[8:].replace(b'"entries"', b'"entries', 1)


@pytest.mark.parametrize("damage, words", [
    (_cut(5), "shorter than a safetensors header"),
    (_cut(60), "truncated: a header of"),
    (_cut_past_the_header, "bytes where its header describes"),
    (_garble_the_header, "its header does not read as Hessian state (JSONDecodeError"),
])  # fmt: skip
def test_a_damaged_state_file_is_named_when_the_job_starts(tmp_path, damage, words) -> None:
    state = _state_dir(tmp_path / "state", layers=3)
    assert read_state_groups(layer_state_path(state, 1)) == {"attn_in": {"alpha", "beta"}}
    assert consistent_stored_tasks([state], 3, set(), None).kept == {"alpha", "beta"}
    path = layer_state_path(state, 1)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StateFileError) as refusal:
        consistent_stored_tasks([state], 3, set(), None)
    message = str(refusal.value)
    assert message.startswith(f"{path}: ") and words in message, message
    assert message.endswith("the Hessian state file is corrupt; delete it if it is a server's state (the "
                            "checkpoint's copy of the layer is then read, without the tasks added live: later jobs "
                            "leave each out, a WARNING names it, until it is added again with its calibration), "
                            "else re-quantize the checkpoint fully")
    assert isinstance(refusal.value, ValueError)  # the server's state GC catches ValueError


def test_a_missing_state_layer_is_named_when_the_job_starts(tmp_path) -> None:
    state = _state_dir(tmp_path / "state", layers=6)
    for layer in (2, 3, 5):
        layer_state_path(state, layer).unlink()
    with pytest.raises(CheckpointError, match=r"no Hessian state for layer\(s\) 2-3, 5 in "):
        consistent_stored_tasks([state], 6, set(), None)
    # a second directory holding them (a server's state, then the checkpoint's) completes it
    other = _state_dir(tmp_path / "other", layers=6)
    assert consistent_stored_tasks([state, other], 6, set(), None).kept == {"alpha", "beta"}


def test_a_hessian_state_that_cannot_be_written_names_its_layer_and_directory(tmp_path) -> None:
    """A full disk failed a server's job with safetensors' words alone ("Error while
    serializing: I/O error: No space left on device"), naming no directory (an outside probe).
    Here the file cannot take its place (a directory stands at its temporary's name), and a
    write past RLIMIT_FSIZE fails as a full disk does."""
    import subprocess
    import sys

    from inlaid.quant.errors import QuantizationError

    state = {"q": {"a": TaskHessian(torch.eye(8), 5)}}
    (tmp_path / "layer_003.tmp").mkdir()
    with pytest.raises(QuantizationError, match=rf"the Hessian state of layer 3 cannot be written in {tmp_path}: "):
        save_layer_state(tmp_path, 3, state, "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_003.tmp"]  # nothing else left

    script = (
        "import resource, signal, sys, torch\n"
        "from inlaid.quant.aggregate import TaskHessian\n"
        "from inlaid.quant.state import save_layer_state\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "save_layer_state(sys.argv[1], 7, {'q': {'a': TaskHessian(torch.eye(256), 5)}}, 'adapter')\n"
    )
    full = tmp_path / "full"
    run = subprocess.run([sys.executable, "-c", script, str(full)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"QuantizationError: the Hessian state of layer 7 cannot be written in {full}: " in run.stderr
    assert not (full / "layer_007.safetensors").exists() and not (full / "layer_007.tmp").exists()
