"""A task of one's own (`NAME=PATH.jsonl`, inlaid/tasks/custom.py): its file is read and checked
as a calibration file is, and its score is the generic one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.tasks import TaskError, get_task

INLAID = str(Path(sys.executable).parent / "inlaid")


def _line(content: str = "Say hi", reference: str = "hi", **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": content}], "reference": reference, **extra}) + "\n"


def test_every_split_is_the_file_in_the_suites_example_form(tmp_path):
    data = tmp_path / "greet.jsonl"
    data.write_text(_line() + "\n" + _line("Say bye", "bye", id="b", answers=["bye", "goodbye"]) +
                    _line("Write it", "x" * 300))
    task = get_task(f"greet={data}")
    assert task.name == "greet" and task.split_path("eval") == data == task.split_path("train")
    examples = task.load_split("calib")
    assert [e["id"] for e in examples] == ["greet-1", "b", "greet-4"]  # a blank line keeps the numbering
    assert examples[0]["answers"] == ["hi"] and examples[1]["answers"] == ["bye", "goodbye"]
    assert all(e["task"] == "greet" for e in examples)
    assert task.max_new_tokens == 150  # room for the longest reference (300 characters / 2)
    scores = task.metric(["hi there\nmore", "goodbye", "y"], examples)
    assert scores["exact_match"] == pytest.approx(100 / 3)  # "goodbye" is an accepted answer
    assert scores["rougeL"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)  # "hi there" vs "hi": P 1/2, R 1
    with pytest.raises(TaskError, match="unknown split"):
        task.load_split("test")


@pytest.mark.parametrize("spec, text, named", [
    ("math={}", _line(), "'math' is a task of the suite"),
    ("a/b={}", _line(), "no '/'"),
    ("={}", _line(), "expected NAME=PATH"),
    ("t={}", "", "holds no examples"),
    ("t={}", _line() + "{not json\n", ":2: not JSON"),
    ("t={}", _line(reference="  "), ":1: 'reference' is blank"),
    ("t={}", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                         "reference": "r"}), "last message must be the user's"),
    ("t={}", _line(answers="hi"), "'answers', when given"),
    ("t={}", _line(id=3), "'id', when given"),
    ("t={}", json.dumps({"messages": [{"role": "robot", "content": "q"}], "reference": "r"}), "messages[0]"),
])
def test_a_bad_task_file_is_refused_naming_the_file_and_line(tmp_path, spec, text, named):
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    with pytest.raises(TaskError) as refused:
        get_task(spec.format(data))
    assert named in str(refused.value)


def test_a_missing_file_or_a_directory_is_refused(tmp_path):
    with pytest.raises(TaskError, match="cannot be read"):
        get_task(f"t={tmp_path / 'none.jsonl'}")
    with pytest.raises(TaskError, match="is a directory"):
        get_task(f"t={tmp_path}")
    with pytest.raises(TaskError, match="or a task of your own as NAME=PATH.jsonl"):
        get_task("nope")


@pytest.mark.parametrize("command", ["train-adapter", "eval"])
def test_the_commands_refuse_a_bad_task_file_before_the_model_loads(tmp_path, command):
    data = tmp_path / "data.jsonl"
    data.write_text(_line() + "[1]\n")
    out = tmp_path / "out"
    args = ["--out", str(out)] + (["--steps", "1"] if command == "train-adapter" else [])
    done = subprocess.run([INLAID, command, "--task", f"mine={data}", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"inlaid {command}: task file {data}:2: "), done.stderr
    assert not out.exists()
