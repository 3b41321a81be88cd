"""What a start of the server deletes in its state directory: only what it wrote. An outside
probe's restart deleted a user's folders and files there, a `[tasks]` adapter kept inside it,
and files wherever a symbolic-linked `adapters/` pointed; a requantizer killed mid-write left
Hessian temporaries no start collected."""

from __future__ import annotations

import logging
import shutil

import pytest

from inlaid.serve.task_store import StateDirError, TaskStore
from test_state_dir_integrity import ADAPTERS, BASE, _stored_state


def test_a_start_deletes_the_hessian_temporaries_a_killed_job_left_and_nothing_else(tmp_path, caplog):
    """A requantizer killed while it wrote a layer's Hessians left safetensors' temporary
    (`.tmp` + 6 characters, 67 MB; an outside probe) or the state's own (`layer_007.tmp`);
    no start collected either. The state's layer files and any other name stay."""
    root = tmp_path / "state"
    store, kept_files = _stored_state(root)
    hessians = store.hessian_dir
    left = [hessians / ".tmpRFXc7J", hessians / "layer_007.tmp"]
    for file in left:
        file.write_bytes(b"\0" * 1000)
    stay = [hessians / "layer_007.safetensors", hessians / ".tmpnotes", hessians / "notes.tmp"]
    for file in stay:
        file.write_bytes(b"kept")
    with caplog.at_level(logging.INFO, logger="inlaid.dynamic_tasks"):
        TaskStore(root, BASE)  # a restart
    assert not any(file.exists() for file in left)
    assert all(file.read_bytes() == b"kept" for file in stay)
    assert all(file.exists() for file in kept_files)
    collected = [r for r in caplog.records if r.getMessage().startswith("Hessian state temporaries")]
    assert len(collected) == 1 and (collected[0].files, collected[0].bytes) == (2, 2000)


def test_a_start_collects_only_the_names_the_server_writes(tmp_path, caplog):
    """An outside probe's restart deleted a user's folders and files put in the state
    directory (adapters/userdata, calibration/user.jsonl, quant/layers/mynotes.txt): only the
    server's copies (`<task>.<10 hex>`), job layer files and safetensors' temporaries go."""
    root = tmp_path / "state"
    _, kept_files = _stored_state(root)
    foreign = [root / "adapters" / "userdata" / "file", root / "adapters" / "useradapter" / "adapter_config.json",
               root / "calibration" / "user.jsonl", root / "quant" / "layers" / "mynotes.txt",
               root / "adapters" / "qa.notes" / "x"]
    for file in foreign:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("mine")
    unused = [root / "adapters" / "old.0123456789" / "adapter_config.json",
              root / "calibration" / "old.0123456789.jsonl",
              root / "quant" / "layers" / "layer_004.v1.safetensors", root / "quant" / "layers" / ".tmpAb12Cd"]
    for file in unused:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("the server's")
    with caplog.at_level(logging.INFO, logger="inlaid.dynamic_tasks"):
        store = TaskStore(root, BASE)
    assert all(file.read_text() == "mine" for file in foreign)
    assert not any(file.exists() for file in unused) and not (root / "adapters" / "old.0123456789").exists()
    assert all(file.exists() for file in kept_files)
    assert any(r.getMessage() == "adapter copies nothing uses any more deleted" and r.copies == 1
               for r in caplog.records)
    # a removal's deletion of a copy checks the name too: a folder of another form is never a copy
    assert not store.discard_copy(str(root / "adapters" / "useradapter"))
    assert (root / "adapters" / "useradapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("linked", ["adapters", "quant/layers", "quant"])
def test_a_state_directory_whose_stored_folders_are_links_is_refused(tmp_path, linked):
    """Collection followed a symbolic-linked adapters/ or quant/layers/ and deleted files in
    its target, outside the state directory (an outside probe)."""
    root = tmp_path / "state"
    _stored_state(root)
    victim = tmp_path / "victim"
    shutil.move(str(root / linked), str(victim))
    (victim / "sub").mkdir()
    (victim / "sub" / "precious").write_text("x")
    (root / linked).symlink_to(victim)
    with pytest.raises(StateDirError, match=rf"{root / linked} is a symbolic link: the server deletes"):
        TaskStore(root, BASE)
    assert (victim / "sub" / "precious").read_text() == "x"


def test_a_config_task_inside_the_state_directory_is_refused(model_dir, tmp_path):
    from inlaid.serve.config import ConfigError, config_from_dict

    state = tmp_path / "state"
    (state / "adapters" / "cfgin").mkdir(parents=True)
    shutil.copytree(ADAPTERS / "qa", state / "adapters" / "qa-copy")
    raw = {"model": {"dir": str(model_dir)}, "server": {"state_dir": str(state)}}
    with pytest.raises(ConfigError, match=r"tasks.cfgin: .* is inside server.state_dir, whose files the server "):
        config_from_dict({**raw, "tasks": {"cfgin": str(state / "adapters" / "qa-copy")}})
    link = tmp_path / "elsewhere"
    link.symlink_to(state / "adapters" / "qa-copy")  # through a link too
    with pytest.raises(ConfigError, match="is inside server.state_dir"):
        config_from_dict({**raw, "tasks": {"cfgin": str(link)}})
    assert config_from_dict({**raw, "tasks": {"qa": str(ADAPTERS / "qa")}}).tasks  # elsewhere: served
