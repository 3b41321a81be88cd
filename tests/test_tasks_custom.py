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
    # no reference holds two words: ROUGE-2 is undefined, left out (0.00 beside 100 % exact match: a probe)
    assert "rouge2" not in scores
    two_words = [{**examples[0], "reference": "hi there", "answers": ["hi there"]}]
    assert task.metric(["hi there", "hi"], two_words + examples[:1])["rouge2"] == pytest.approx(100 / 2)
    # any script: rouge-score's default tokenizer kept [a-z0-9] alone, and this scored 0 (a reviewer)
    cyrillic = [{**examples[0], "reference": "Москва", "answers": ["Москва"]}]
    assert task.metric(["Москва столица"], cyrillic)["rougeL"] == pytest.approx(100 * 2 / 3)
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


def test_a_bom_is_read_past_and_a_repeated_id_is_refused(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + _line().encode() + _line("Say bye", "bye").encode())
    assert [e["reference"] for e in get_task(f"b={data}").load_split("eval")] == ["hi", "bye"]
    data.write_text(_line(id="x") + _line("Say bye", "bye", id="x"))
    with pytest.raises(TaskError, match=r":2: id 'x' again \(first at line 1\)"):
        get_task(f"b={data}")


def test_two_tasks_of_one_name_and_results_with_ones_own_task_are_refused(tmp_path):
    """`eval --task up=a --task up=b` generated both and kept one row (the second file's);
    `tasks report` on results with a task of one's own wrote MANIFEST.json and the tables, then
    failed on it (an outside probe)."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(_line())
    second.write_text(_line("Say bye", "bye"))
    done = subprocess.run([INLAID, "eval", "--task", f"up={first}", "--task", f"up={second}"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "inlaid eval: two tasks named 'up'"), done.stderr
    same = subprocess.run([INLAID, "eval", "--task", f"up={first}", "--task", f"up={tmp_path}/./a.jsonl",
                           "--model", str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert "two tasks named" not in same.stderr and "model directory not found" in same.stderr  # one file, twice
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"model": "m", "split": "eval", "tasks": {"up": {"base": {}}}}))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    done = subprocess.run([INLAID, "tasks", "report", "--results", str(results), "--adapters-dir", str(adapters),
                           "--markdown", str(tmp_path / "t.md")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "inlaid tasks report: --results" in done.stderr and "'up'" in done.stderr
    assert not list(adapters.iterdir()) and not (tmp_path / "t.md").exists()  # nothing written


def test_suite_eval_finds_the_adapter_of_ones_own_task_by_its_name(tmp_path):
    import argparse

    from inlaid.tasks.eval_plan import planned_runs

    data = tmp_path / "up.jsonl"
    data.write_text(_line())
    (tmp_path / "adapters" / "up").mkdir(parents=True)
    (tmp_path / "adapters" / "up" / "adapter_config.json").write_text("{}")
    args = argparse.Namespace(suite=True, adapters_dir=str(tmp_path / "adapters"), with_base=False, adapter=None)
    runs = planned_runs(args, [f"up={data}"])
    assert [(run.task, run.adapter_dir) for run in runs] == [(f"up={data}", tmp_path / "adapters" / "up")]


def test_markdown_table_has_a_row_for_a_task_of_ones_own():
    from inlaid.tasks.evaluate import markdown_table

    entry = {"primary_metric": "rougeL", "scores": {"rougeL": 50.0}, "examples": 2, "dtype": "float32",
             "output_tokens": {"p50": 1, "p90": 2, "max": 2}}
    table = markdown_table({"tasks": {"up": {"base": entry, "ad": {**entry, "scores": {"rougeL": 75.0}}},
                                      "sentiment": {"base": {**entry, "primary_metric": "accuracy",
                                                             "scores": {"accuracy": 90.0}}}}})
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["sentiment", "up"], table
