"""Weights the project writes are readable as the umask allows, like every other file it
writes: safetensors creates its files 0600 whatever the umask, so a quantized checkpoint, a
converted model or a trained adapter could be read by its owner only (an outside probe: a
server running as another user could not load them)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inlaid.file_modes import as_umask_allows, current_umask


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert os.umask(umask) == umask  # unchanged by the read


def test_a_quantized_checkpoint_is_written_with_the_umask_mode(tmp_path: Path, umask: int) -> None:
    from test_quant_checkpoint_checks import _checkpoint

    checkpoint = _checkpoint(tmp_path)
    expected = 0o666 & ~umask
    assert _mode(checkpoint / "model.safetensors") == expected
    assert _mode(checkpoint / "config.json") == expected  # as an ordinary file


def test_a_trained_adapter_file_is_written_with_the_umask_mode(tmp_path: Path, umask: int) -> None:
    from inlaid.tasks.train_files import cast_adapter_file

    weights = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(2, 2)}, str(weights))
    assert _mode(weights) == 0o600  # what safetensors does on its own: the reason for the fix
    cast_adapter_file(weights, "bfloat16")
    assert _mode(weights) == 0o666 & ~umask


def test_as_umask_allows_sets_every_file_named(tmp_path: Path, umask: int) -> None:
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for file in files:
        save_file({"x": torch.zeros(1)}, str(file))
    as_umask_allows(*files)
    assert [_mode(file) for file in files] == [0o666 & ~umask] * 2
