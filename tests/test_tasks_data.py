"""The committed task splits: format, sizes, disjointness, and deterministic rebuilding."""

from __future__ import annotations

import sys

import pytest

from inlaid.tasks import TASK_NAMES, TaskError, get_task
from inlaid.tasks.base import PACKAGED_DATA_DIR, read_jsonl, seeded_split, validate_example, write_jsonl


def test_registry_lists_the_suite():
    assert set(TASK_NAMES) == {
        "trans-fr", "trans-de", "trans-es", "summarize", "table-to-text", "math", "qa", "code", "sentiment",
    }
    with pytest.raises(TaskError, match="unknown task"):
        get_task("no-such-task")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_committed_splits_are_well_formed(name):
    task = get_task(name)
    eval_split, calib_split = task.load_split("eval"), task.load_split("calib")
    assert task.split_path("eval").is_relative_to(PACKAGED_DATA_DIR)
    assert len(eval_split) >= 100 and len(calib_split) == 128
    for example in eval_split + calib_split:
        validate_example(example)
        assert example["task"] == name
        assert example["messages"][0]["role"] == "user" and example["messages"][0]["content"].strip()
        assert example["reference"].strip()
    eval_ids = [e["id"] for e in eval_split]
    calib_ids = [e["id"] for e in calib_split]
    assert len(set(eval_ids)) == len(eval_ids) and len(set(calib_ids)) == len(calib_ids)
    # held out: no eval prompt appears in calibration (E2E ids differ per reference, so compare prompts)
    eval_prompts = {e["messages"][0]["content"] for e in eval_split}
    assert not eval_prompts & {e["messages"][0]["content"] for e in calib_split}


def test_translations_share_one_verse_split():
    verse_sets = [{e["id"].split("-", 2)[2] for e in get_task(n).load_split("eval")} for n in ("trans-fr", "trans-de", "trans-es")]
    assert verse_sets[0] == verse_sets[1] == verse_sets[2]


def test_seeded_split_is_deterministic_and_disjoint():
    items = list(range(1000))
    first = seeded_split(items, 7, (128, 128))
    assert first == seeded_split(items, 7, (128, 128))
    assert first != seeded_split(items, 8, (128, 128))
    eval_part, calib_part, train_part = first
    assert len(eval_part) == len(calib_part) == 128 and len(train_part) == 744
    assert sorted(eval_part + calib_part + train_part) == items
    with pytest.raises(TaskError):
        seeded_split(list(range(200)), 7, (128, 128))


def test_unknown_split_is_refused():
    with pytest.raises(TaskError, match="unknown split"):
        get_task("math").load_split("dev")


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the committed code splits were mined from CPython 3.11")
def test_code_task_rebuilds_the_committed_splits():
    """The one task built without a download (the stdlib): rebuild and compare exactly."""
    from inlaid.tasks import code

    rebuilt = code.build()
    for split in ("eval", "calib"):
        assert rebuilt[split] == get_task("code").load_split(split)


def test_two_writers_of_one_split_each_write_their_own_temporary(tmp_path):
    """A second writer of the same file starts while the first is mid-way (two `inlaid tasks
    prepare` at once): both finish, and the file holds one whole copy. With one shared
    temporary name the second truncated the first's file and its rename then failed."""
    examples = get_task("qa").load_split("calib")[:20]
    target = tmp_path / "qa" / "calib.jsonl"

    def first_writer():
        for index, example in enumerate(examples):
            if index == 10:
                assert write_jsonl(target, examples) == len(examples)  # the other writer, start to end
            yield example

    assert write_jsonl(target, first_writer()) == len(examples)
    assert read_jsonl(target) == examples
    assert [p.name for p in target.parent.iterdir()] == ["calib.jsonl"]
    with pytest.raises(TaskError):
        write_jsonl(target, [{"not": "an example"}])
    assert [p.name for p in target.parent.iterdir()] == ["calib.jsonl"] and read_jsonl(target) == examples
