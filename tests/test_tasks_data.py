"""The committed task splits: format, sizes, disjointness, and deterministic rebuilding."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _offline_wheel(links: Path, name: str) -> bytes:
    """A minimal wheel pip can `download` from a local --find-links folder (no network)."""
    wheel = links / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr(f"{name}/data.txt", "the data\n")
        zipped.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zipped.writestr(f"{name}-1.0.dist-info/WHEEL",
                        "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zipped.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return wheel.read_bytes()


def test_a_package_archive_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip downloads into a folder of its own, and the archive is renamed into place: pip wrote
    it straight into the cache, where a second first-time preparer could take the half-written
    file for the package. Real pip, from a local folder."""
    from inlaid.tasks import sources

    name = "inlaidfakedata"
    (tmp_path / "links").mkdir()
    expected = _offline_wheel(tmp_path / "links", name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    monkeypatch.setitem(sources.PACKAGES, name, sources.PackageSource(f"{name}==1.0", f"{name}-1.0-py3-none-any.whl"))
    archive = sources.packages_dir() / f"{name}-1.0-py3-none-any.whl"
    pip_writes_to = []
    real_run = subprocess.run

    def pip_run(command, *args, **kwargs):  # type: ignore[no-untyped-def]
        pip_writes_to.append(Path(command[command.index("-d") + 1]) / archive.name)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(sources.subprocess, "run", pip_run)
    with ThreadPoolExecutor(2) as pool:  # two first-time preparers at once
        paths = list(pool.map(lambda _: sources.fetch_package(name), range(2)))
    assert paths == [archive, archive] and archive.read_bytes() == expected
    # pip's file, while it grows, is never where a preparer looks for the archive (or another pip writes)
    assert pip_writes_to and archive not in pip_writes_to and len(set(pip_writes_to)) == len(pip_writes_to)
    assert sources.read_member(archive, f"{name}/data.txt") == b"the data\n"
    assert sorted(p.name for p in sources.packages_dir().iterdir()) == [archive.name]  # no download folder left
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setitem(sources.PACKAGES, "gone", sources.PackageSource("inlaidgone==1.0", "inlaidgone-1.0.whl"))
    with pytest.raises(sources.SourceError, match="failed"):
        sources.fetch_package("gone")
    assert sorted(p.name for p in sources.packages_dir().iterdir()) == [archive.name]
