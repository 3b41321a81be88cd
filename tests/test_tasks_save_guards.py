"""What `train-adapter`, `eval` and `tasks report` write, from an outside probe of 2026-12-07: a
kill between a checkpoint's three files resumed one step's weights with another's step
count; a finished run's damaged adapter was kept ("nothing rewritten"); `tasks report` took
an interrupted eval's partial scores as whole ones; a lone surrogate in a custom task's `id`
emptied the earlier `--out` when the results could not be encoded; `--out=~/...` wrote into
a folder named `~`. The training runs are real, on a 2-layer random Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inlaid.cli import main
from inlaid.tasks import TaskError
from inlaid.tasks.base import write_text_atomic
from inlaid.tasks.custom import read_task_file
from inlaid.tasks.train import train
from inlaid.tasks.train_files import CHECKPOINT_DIR, REPLACED_DIR, STAGING_DIR, settle_checkpoint

from test_tasks_train import _config, tiny_model_dir  # noqa: F401 (the module's fixture)

torch = pytest.importorskip("torch")


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    # copied out of the file's mapping: a test below truncates the file (SIGBUS on a mapped read)
    return {name: tensor.clone() for name, tensor in load_file(str(out / "adapter_model.safetensors")).items()}


def test_a_save_cut_short_resumes_from_the_checkpoint_before_it(tiny_model_dir, tmp_path, monkeypatch) -> None:
    straight = _adapter(train(_config(tiny_model_dir, tmp_path / "straight", steps=6)))
    out = tmp_path / "killed"
    real_save, calls = torch.save, [0]

    def save_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the step-4 save: its adapter written, its optimizer not
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_model_dir, out, steps=6))
    monkeypatch.undo()
    assert json.loads((out / CHECKPOINT_DIR / "state.json").read_text())["step"] == 2
    resumed = _adapter(train(_config(tiny_model_dir, out, steps=6)))  # from step 2, with step 2's weights
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [CHECKPOINT_DIR]  # no staging left


def test_a_checkpoint_renamed_aside_comes_back(tmp_path) -> None:
    out = tmp_path / "adapter"
    (out / REPLACED_DIR).mkdir(parents=True)
    (out / REPLACED_DIR / "state.json").write_text('{"step": 2}')
    (out / STAGING_DIR).mkdir()
    (out / STAGING_DIR / "adapter_config.json").write_text("{}")  # the save after it, cut short
    settle_checkpoint(out)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_DIR]
    assert json.loads((out / CHECKPOINT_DIR / "state.json").read_text()) == {"step": 2}
    foreign = tmp_path / "foreign"
    (foreign / STAGING_DIR / "photos").mkdir(parents=True)  # not a checkpoint's: left alone
    settle_checkpoint(foreign)
    assert (foreign / STAGING_DIR / "photos").is_dir()


def test_a_first_save_killed_before_its_config_leaves_a_usable_out(tiny_model_dir, tmp_path) -> None:
    """PEFT writes README.md and the weights before adapter_config.json: a kill there left a
    staging directory the next run took for a foreign folder's ("--out is not empty")."""
    from inlaid.tasks.train import out_problem

    out = tmp_path / "adapter"
    (out / STAGING_DIR).mkdir(parents=True)
    (out / STAGING_DIR / "README.md").write_text("model card")
    (out / STAGING_DIR / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # cut short
    assert out_problem(_config(tiny_model_dir, out, steps=2)) is None  # not a foreign folder
    settle_checkpoint(out)
    assert list(out.iterdir()) == []
    assert _adapter(train(_config(tiny_model_dir, out, steps=2)))


def test_the_record_goes_in_last(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """The finished adapter's files are renamed into place with training.json last: a kill
    between the renames must not leave a new record beside the old weights."""
    out = tmp_path / "adapter"
    train(_config(tiny_model_dir, out, steps=2))
    renamed: list[tuple[str, bool]] = []  # (file, whether a training.json was there as it went in)
    real_replace = Path.replace

    def replace(path: Path, target):
        if Path(target).parent == out:
            renamed.append((Path(target).name, (out / "training.json").exists()))
        return real_replace(path, target)

    monkeypatch.setattr(Path, "replace", replace)
    train(_config(tiny_model_dir, out, steps=4))  # continues: a new adapter and record
    assert renamed[-1][0] == "training.json", renamed
    assert ("adapter_model.safetensors", False) in renamed, renamed  # the old record gone first


def test_a_finished_runs_damaged_adapter_is_written_again(tiny_model_dir, tmp_path) -> None:
    config = _config(tiny_model_dir, tmp_path / "adapter", steps=2)
    out = train(config)
    good = _adapter(out)
    with open(out / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(100)
    train(config)  # "already trained ... nothing rewritten" kept it damaged
    again = _adapter(out)
    assert again.keys() == good.keys() and all(torch.equal(again[key], good[key]) for key in good)


def test_a_custom_tasks_lone_surrogate_id_is_refused_by_line(tmp_path) -> None:
    good = {"messages": [{"role": "user", "content": "Say hi."}], "reference": "hi"}
    for field, value, where in (("id", "a\udc80", "id"), ("answers", ["ok", "b\ud800"], r"answers\[1\]")):
        path = tmp_path / f"{field}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
        with pytest.raises(TaskError, match=rf"{path}:2: {where} holds a lone UTF-16 surrogate"):
            read_task_file(path, "mine")


def test_an_output_that_cannot_be_written_leaves_the_earlier_file(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"previous": 1}')
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, '{"id": "a\udc80"}')
    assert path.read_text() == '{"previous": 1}' and sorted(os.listdir(tmp_path)) == ["results.json"]
    # a link: its target is replaced (not the link by a file), with the target's mode
    os.chmod(path, 0o640)
    (tmp_path / "link.json").symlink_to(path)
    write_text_atomic(tmp_path / "link.json", '{"new": 2}')
    assert (tmp_path / "link.json").is_symlink() and path.read_text() == '{"new": 2}'
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.json", "results.json"]


def test_tasks_report_refuses_an_interrupted_evals_results(tmp_path, capsys) -> None:
    results = tmp_path / "part.json"
    results.write_text(json.dumps({"model": "m", "split": "eval", "tasks": {"math": {}},
                                   "partial": {"finished": 1, "requests": 24, "stopped_by": "SIGTERM"}}))
    (tmp_path / "adapters").mkdir()
    code = main(["tasks", "report", "--results", str(results), "--adapters-dir", str(tmp_path / "adapters"),
                 "--out", str(tmp_path / "report.json")])
    err = capsys.readouterr().err
    assert code == 2 and "interrupted eval (1 of 24 predictions finished)" in err, err
    assert not (tmp_path / "report.json").exists()


def test_train_adapter_out_with_a_tilde_is_the_home_folder(tiny_model_dir, tmp_path, monkeypatch) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    code = main(["train-adapter", "--task", "sentiment", "--split", "calib", "--model", str(tiny_model_dir),
                 "--out=~/mine", "--steps", "1", "--rank", "2", "--batch-size", "1", "--max-length", "64",
                 "--threads", "1", "--precision", "fp32"])
    assert code == 0
    assert (home / "mine" / "adapter_model.safetensors").is_file() and list(cwd.iterdir()) == []
