"""The length predictor's tools: a killed save's temporary file is cleaned by the next save,
and `evaluate` says which test tasks it never trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inlaid.predictor import OnlineLengthPredictor
from inlaid.predictor.cli import main


def _rows(path: Path, rows: list[tuple[str | None, list[int], int]]) -> Path:
    path.write_text("".join(json.dumps({"task": t, "prompt_token_ids": p, "output_tokens": o}) + "\n"
                            for t, p, o in rows))
    return path


def _fitted() -> OnlineLengthPredictor:
    predictor = OnlineLengthPredictor()
    for index in range(40):
        predictor.remember("sum" if index % 2 else "chat", [3, 4, 5][: 1 + index % 3], 5 + index % 7)
    predictor.refit(wait=True)
    return predictor


def _dead_pid() -> int:
    """A pid that was a process and is no more (reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_saves_temporary_file_goes_at_the_next_save_and_a_live_ones_stays(tmp_path: Path) -> None:
    state = tmp_path / "predictor.npz"
    dead = tmp_path / f"predictor.npz.{_dead_pid()}.140000000000.tmp.npz"
    live = tmp_path / f"predictor.npz.{os.getppid()}.140000000001.tmp.npz"  # pytest's parent: alive
    others = [tmp_path / "predictor.npz.notes.tmp.npz", tmp_path / "other.npz.1.2.tmp.npz"]
    # a dead writer's file of a moment ago: perhaps a live save on another machine sharing the state
    recent = tmp_path / f"predictor.npz.{_dead_pid()}.140000000002.tmp.npz"
    for leftover in (dead, live, recent, *others):
        leftover.write_bytes(b"half a state")
        if leftover is not recent:
            os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    predictor = _fitted()
    predictor.save(state)
    assert not dead.exists()  # the killed writer's leftover is gone
    assert live.exists() and recent.exists()  # a save in progress here, or perhaps elsewhere
    assert all(path.exists() for path in others)  # names save() never gives
    restored = OnlineLengthPredictor.load(state)
    assert restored.predict("sum", [3, 4]) == predictor.predict("sum", [3, 4])
    assert sorted(p.name for p in tmp_path.glob("predictor.npz.*.tmp.npz")) == sorted(
        [live.name, recent.name, others[0].name])  # the save left none of its own


def test_evaluate_names_the_test_tasks_it_never_trained_on(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    train = _rows(tmp_path / "train.jsonl", [("chat", [1, 2], 9), ("sum", [3], 4)] * 10 + [(None, [5], 2)])
    test = _rows(tmp_path / "test.jsonl", [("chat", [1, 2], 9), ("new-task", [3], 30), ("also-new", [1], 2),
                                           (None, [5], 2)])
    assert main(["evaluate", "--train", str(train), "--test", str(test)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["unseen_tasks"] == ["also-new", "new-task"]
    assert "2 --test task(s) have no --train requests" in captured.err and "also-new, new-task" in captured.err
    assert report["tasks"]["new-task"]["model"]["requests"] == 1  # still scored, now with the note

    seen = _rows(tmp_path / "seen.jsonl", [("chat", [1, 2], 9), (None, [5], 2)])
    assert main(["evaluate", "--train", str(train), "--test", str(seen)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unseen_tasks"] == [] and captured.err == ""


def test_a_state_learned_on_another_tokenizer_is_refused_and_its_own_loads(model_dir: Path, tmp_path: Path,
                                                                            caplog) -> None:
    """A state named no model: one learned on another vocabulary's token ids loaded without a
    word and predicted from those n-grams (an outside probe). The server names its tokenizer
    by what decides the ids: a re-save (other padding, other indentation) is the same one."""
    import logging

    from inlaid.predictor import PredictorStateError, TokenizerIdentity
    from inlaid.serve.config import ConfigError, load_config
    from inlaid.serve.scheduler_config import load_policy, predictor_tokenizer

    ours = predictor_tokenizer(str(model_dir))
    from tokenizers import Tokenizer

    resaved = tmp_path / "resaved"
    resaved.mkdir()
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tokenizer.enable_padding(length=7)  # saved again by the library, another padding: the same ids
    tokenizer.save(str(resaved / "tokenizer.json"), pretty=False)
    assert predictor_tokenizer(str(resaved)).sha256 == ours.sha256
    merges = json.loads((resaved / "tokenizer.json").read_text())  # merges in the older "a b" form
    merges["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair
                                 for pair in merges["model"]["merges"]]
    (resaved / "tokenizer.json").write_text(json.dumps(merges))
    assert predictor_tokenizer(str(resaved)).sha256 == ours.sha256
    tokenizer.add_tokens(["zzz-new-token"])  # another vocabulary
    tokenizer.save(str(resaved / "tokenizer.json"))
    assert predictor_tokenizer(str(resaved)).sha256 != ours.sha256
    other = TokenizerIdentity(model="/models/Llama-2-7b-hf", sha256="0" * 64)
    state = tmp_path / "learned.npz"
    learned = _fitted()
    learned.tokenizer = other
    learned.save(state)
    refusal = (rf"{state} was learned on the token ids of /models/Llama-2-7b-hf \(tokenizer 000000000000\), not on "
               rf"this server's tokenizer \({Path(model_dir).resolve()}, tokenizer {ours.sha256[:12]}: ")
    with pytest.raises(PredictorStateError, match=refusal):
        OnlineLengthPredictor.load(state, tokenizer=ours)
    with pytest.raises(ConfigError, match=r"\[scheduler\]: .* was learned on the token ids of /models/Llama-2-7b-hf"):
        load_policy("inlaid", {"predictor_state": str(state)}, announce=False, tokenizer=ours)
    config = tmp_path / "server.toml"  # and where a server reads its config, before anything starts
    config.write_text(f'[model]\ndir = "{model_dir}"\n[server]\npolicy = "inlaid"\n'
                      f'[scheduler]\npredictor_state = "{state}"\n')
    with pytest.raises(ConfigError, match="scheduler.predictor_state: .* was learned on the token ids of"):
        load_config(config)
    restored = OnlineLengthPredictor.load(state, tokenizer=other)  # its own tokenizer: as saved
    assert restored.predict("sum", [3, 4]) == learned.predict("sum", [3, 4]) and not restored.adopted
    unnamed = tmp_path / "unnamed.npz"  # `python -m inlaid.predictor train` names none: taken, and said
    _fitted().save(unnamed)
    from inlaid.scheduling.registry import build_length_model, parse_options

    inlaid_log, propagated = logging.getLogger("inlaid"), logging.getLogger("inlaid").propagate
    inlaid_log.propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="inlaid"):
            adopted = build_length_model(parse_options("inlaid", {"predictor_state": str(unnamed)}), ours)
    finally:
        inlaid_log.propagate = propagated
    assert adopted.adopted and any("names no tokenizer" in r.getMessage() for r in caplog.records)
    adopted.save(unnamed)  # and saved with this server's from then on
    with pytest.raises(PredictorStateError, match="not on this server's tokenizer"):
        OnlineLengthPredictor.load(unnamed, tokenizer=other)
