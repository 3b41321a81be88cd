"""`inlaid tune-scheduler`, the tuning's inputs and `python -m inlaid.predictor`: each case
an outside probe found (2026-12). The tuning itself is replaced by a stub that fails the
test, so a check that comes too late fails in a second instead of simulating for minutes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inlaid.scheduling.cost_model import FEATURE_NAMES, StepCostModel, UnusableCostModelError
from inlaid.scheduling.simulator import EngineShape
from inlaid.scheduling.suite import SuiteRecord, load_suite_lengths, write_suite_lengths

ROOT = Path(__file__).resolve().parents[1]
COST_MODEL = ROOT / "bench" / "results" / "sched_cost_model.json"


def _no_tuning(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the tuning ran: the input should have been refused before it")


def _tune(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`inlaid tune-scheduler ARGS` in this process with the tuning stubbed: (rc, stderr)."""
    import inlaid.scheduling.autotune as autotune
    from inlaid.cli import main

    monkeypatch.setattr(autotune, "tune_inlaid_options", _no_tuning)
    code = main(["tune-scheduler", "--cost-model", str(COST_MODEL), *args])
    return code, capsys.readouterr().err


def _record(task: str, split: str, number: int, prompt: int, output: int = 5) -> SuiteRecord:
    return SuiteRecord(f"{task}/{split}/{number}", task, split, prompt, output, output, 16, "stop")


def _lengths(path: Path, prompt: int, eval_prompts: tuple[int, ...] = ()) -> Path:
    records = [_record("qa", "calib", 0, 10)]
    records += [_record("qa", "eval", index, value) for index, value in enumerate(eval_prompts or (prompt,))]
    write_suite_lengths(records, path)
    return path


# --- 1. lengths records: token counts bounded as traces' are -----------------------------------

def test_lengths_records_beyond_2_24_tokens_are_refused_naming_file_line_and_field(tmp_path: Path) -> None:
    """10^12 prompt tokens loaded; the tuning's simulation grew to 18 GB before the OOM kill."""
    from inlaid.scheduling.traces import MAX_REQUEST_TOKENS

    path = _lengths(tmp_path / "huge.jsonl", 10**12)
    with pytest.raises(ValueError, match=rf"huge.jsonl:2: prompt_tokens must be .*{MAX_REQUEST_TOKENS}"):
        load_suite_lengths(path)
    edge = tmp_path / "edge.jsonl"
    write_suite_lengths([SuiteRecord("qa/calib/0", "qa", "calib", MAX_REQUEST_TOKENS, 5, 5, MAX_REQUEST_TOKENS,
                                     "stop")], edge)
    assert load_suite_lengths(edge)[0].prompt_tokens == MAX_REQUEST_TOKENS  # the bound itself is a length
    write_suite_lengths([SuiteRecord("qa/calib/0", "qa", "calib", 3, 5, 5, MAX_REQUEST_TOKENS + 1, "stop")], edge)
    with pytest.raises(ValueError, match="edge.jsonl:1: max_tokens must be"):
        load_suite_lengths(edge)


def test_a_server_start_refuses_huge_autotune_lengths(tmp_path: Path) -> None:
    from inlaid.serve.config import ConfigError, config_from_dict

    (tmp_path / "cost.json").write_text(COST_MODEL.read_text())
    _lengths(tmp_path / "huge.jsonl", 10**12)
    with pytest.raises(ConfigError, match="huge.jsonl:2: prompt_tokens"):
        config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {
            "autotune_cost_model": "cost.json", "autotune_lengths": "huge.jsonl"}}, base_dir=tmp_path)


# --- 2. predictor = "exact" refused as the server refuses it -------------------------------------

def test_tune_scheduler_refuses_the_exact_predictor_as_the_server_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\npolicy = "inlaid"\n[scheduler]\npredictor = "exact"\n')
    code, err = _tune(monkeypatch, capsys, "--config", str(config))
    assert code == 2 and err.strip().splitlines() == [
        "inlaid tune-scheduler: [scheduler]: predictor 'exact' is the simulator's clairvoyant oracle: "
        "a server cannot know output lengths"], err
    config.write_text('[server]\npolicy = "inlaid"\n[scheduler]\npredictor = "task-mean"\n')
    with pytest.raises(AssertionError, match="the tuning ran"):  # a predictor a server runs is tuned
        _tune(monkeypatch, capsys, "--config", str(config))


# --- 3. a cost model lacking a coefficient ------------------------------------------------------

def test_a_cost_model_missing_a_coefficient_is_refused_naming_it(tmp_path: Path) -> None:
    fitted = json.loads(COST_MODEL.read_text())
    del fitted["coefficients"]["tokens"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(fitted))
    with pytest.raises(UnusableCostModelError, match=r"missing.json' lacks the coefficients \['tokens'\]"):
        StepCostModel.load(path)
    fitted["coefficients"]["tokens"] = 0.0  # present as 0: a feature that costs nothing is fine
    path.write_text(json.dumps(fitted))
    assert set(StepCostModel.load(path).coefficients) == set(FEATURE_NAMES)


# --- 4. prompts with no room in the context ------------------------------------------------------

def test_tuning_refuses_workloads_whose_prompts_the_server_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Prompts of 9000 tokens at context 8192: 3 minutes, every option 1.00x, no word why.
    None fitting is refused; some fitting, the others are left out, said once (the packaged
    lengths hold a 405-token prompt: a 384-token context must still tune)."""
    import logging

    import inlaid.scheduling.simulator as simulator
    from inlaid.scheduling.autotune import tune_inlaid_options

    monkeypatch.setattr(simulator, "simulate", _no_tuning)
    cost, path = StepCostModel.load(COST_MODEL), _lengths(tmp_path / "long.jsonl", 0, (9000, 9500))
    with pytest.raises(ValueError, match=r"long.jsonl: 2 of 2 'eval' records .* context length 8192.*'qa/eval/0', "
                                         r"9000 prompt tokens"):
        tune_inlaid_options(cost, EngineShape(), 2, requests=10, lengths_file=path)
    # The context as the engine caps it: 64 KV blocks of 16 hold 1024 tokens.
    small = _lengths(tmp_path / "small.jsonl", 1024)
    with pytest.raises(ValueError, match="1 of 1 'eval' records .* context length 1024"):
        tune_inlaid_options(cost, EngineShape(num_kv_blocks=64), 2, requests=10, lengths_file=small)
    mixed = _lengths(tmp_path / "mixed.jsonl", 0, (100, 9000, 9500))
    with caplog.at_level(logging.WARNING, logger="inlaid.scheduling"), \
            pytest.raises(AssertionError, match="the tuning ran"):  # on the one record that fits
        tune_inlaid_options(cost, EngineShape(), 2, requests=10, lengths_file=mixed)
    assert "mixed.jsonl: 2 of 3 'eval' records have a prompt with no room" in caplog.text
    assert "the tuning leaves them out" in caplog.text


# --- 5. predictor state of another hash width, reservoir lengths out of range ------------------

def _saved_state(tmp_path: Path) -> dict[str, np.ndarray]:
    from inlaid.predictor import OnlineLengthPredictor

    predictor = OnlineLengthPredictor(refit_every=0, background=False)
    for index in range(40):
        predictor.remember("qa" if index % 2 else "math", list(range(index % 7 + 2)), 3 + index % 5)
    predictor.refit(wait=True)
    predictor.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("change, words", [
    (lambda s: s["config"].__setitem__(0, 20.0), "hashed into 20 bits; this predictor uses 18"),
    (lambda s: s["config"].__setitem__(3, 0.5), "fitted flag is 0.5"),
    (lambda s: s["reservoir_targets"].__setitem__(0, 1e308), r"reservoir output lengths outside \[0, 16777216\]"),
    (lambda s: s["reservoir_targets"].__setitem__(0, -1.0), "reservoir output lengths outside"),
])
def test_predictor_states_it_cannot_continue_are_refused_naming_the_file(tmp_path: Path, change: Any,
                                                                         words: str) -> None:
    """A 20-bit state loaded and predicted 1 token for everything, refits included; reservoir
    targets of 1e308 loaded and, refitted, predicted 1e9 tokens."""
    from inlaid.predictor import OnlineLengthPredictor, PredictorStateError

    state = _saved_state(tmp_path)
    assert OnlineLengthPredictor.load(tmp_path / "good.npz").size == 40  # the untouched state loads
    change(state)
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(PredictorStateError, match=rf"bad.npz .*{words}"):
        OnlineLengthPredictor.load(tmp_path / "bad.npz")


def test_a_predictor_state_behind_a_symbolic_link_is_checked_and_saved_where_it_leads(tmp_path: Path) -> None:
    """A link into a missing folder read as "starts untrained" and the first save replaced the
    link with a file of its own; a link loop read the same."""
    from inlaid.predictor import OnlineLengthPredictor
    from inlaid.serve.config import ConfigError, config_from_dict

    def refusal(path: Path) -> str:
        with pytest.raises(ConfigError) as caught:
            config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"predictor_state": str(path)}},
                             base_dir=tmp_path)
        return str(caught.value)

    (tmp_path / "dangling.npz").symlink_to(tmp_path / "missing" / "state.npz")
    assert f"(it links to {tmp_path / 'missing' / 'state.npz'}): its directory" in refusal(tmp_path / "dangling.npz")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert "a loop" in refusal(tmp_path / "loop_a")
    (tmp_path / "kept").mkdir()
    link = tmp_path / "state.npz"
    link.symlink_to(tmp_path / "kept" / "state.npz")  # its target not there yet: a fresh state
    config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"predictor_state": str(link)}}, base_dir=tmp_path)
    _saved_state(tmp_path)  # a trained predictor saved as good.npz
    OnlineLengthPredictor.load(tmp_path / "good.npz").save(link)
    assert link.is_symlink() and (tmp_path / "kept" / "state.npz").is_file()
    assert OnlineLengthPredictor.load(link).size == 40


# --- 6. `evaluate`: no key collisions; it scores what `train` writes ----------------------------

def test_a_task_named_all_or_base_keeps_its_own_scores() -> None:
    from inlaid.predictor import evaluate_predictions, evaluate_report

    tasks = ["all", "all", "b", None, "<base>"]
    actual = [1.0, 3.0, 8.0, 20.0, 70.0]
    report = evaluate_report(tasks, actual, {"exact": actual})
    assert report["all"]["exact"]["requests"] == 5 and report["tasks"]["all"]["exact"]["requests"] == 2
    assert report["base"]["exact"]["requests"] == 1 and report["tasks"]["<base>"]["exact"]["requests"] == 1
    with pytest.raises(ValueError, match=r"\['<base>', 'all'\] collide"):
        evaluate_predictions(tasks, actual, {"exact": actual})  # refused, not silently overwritten
    flat = evaluate_predictions(["a", None, "a"], [1.0, 2.0, 3.0], {"exact": [1.0, 2.0, 3.0]})
    assert list(flat) == ["<base>", "a", "all"] and flat["all"]["exact"]["requests"] == 3  # the shape bench reads


def _rows(path: Path, rows: list[tuple[str | None, list[int], int]]) -> Path:
    path.write_text("".join(json.dumps({"task": t, "prompt_token_ids": p, "output_tokens": o}) + "\n"
                            for t, p, o in rows))
    return path


def test_evaluate_scores_the_model_train_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate` fitted every row; `train` keeps 512 a task: the scores were another model's."""
    from inlaid.predictor import OnlineLengthPredictor
    from inlaid.predictor.cli import main

    # 600 rows of "all": the first 88 (length 2, output 40) leave train's reservoir.
    rows = [("all", [5, 6], 40)] * 88 + [("all", [5, 6, 7, 8][: 1 + i % 4], 2 + i % 4) for i in range(512)]
    train = _rows(tmp_path / "train.jsonl", rows + [(None, [9], 7)] * 3)
    test = _rows(tmp_path / "test.jsonl", [("all", [5, 6], 40), ("all", [5], 3), (None, [9], 7)])
    assert main(["evaluate", "--train", str(train), "--test", str(test)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"] == {"requests": 603, "kept": 515}
    assert report["all"]["model"]["requests"] == 3 and report["tasks"]["all"]["model"]["requests"] == 2
    assert report["base"]["model"]["requests"] == 1
    assert main(["train", "--data", str(train), "--out", str(tmp_path / "p.npz")]) == 0
    written = OnlineLengthPredictor.load(tmp_path / "p.npz")
    truth = [40, 3, 7]
    predicted = [written.predict(t, p) for t, p in (("all", [5, 6]), ("all", [5]), (None, [9]))]
    assert report["all"]["model"]["mae"] == pytest.approx(np.mean(np.abs(np.subtract(predicted, truth))))


# --- 7. deep JSON, Ctrl-C, --tasks ---------------------------------------------------------------

def test_predictor_data_nested_too_deeply_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inlaid.predictor.cli import main

    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"task": "a", "prompt_token_ids": [1], "output_tokens": 2}) + "\n" + "[" * 100_000)
    assert main(["train", "--data", str(deep), "--out", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"python -m inlaid.predictor: {deep}:2: JSON nested too deeply to be a "
                                        "finished request"], err


def test_ctrl_c_during_predictor_train_is_one_line_rc_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from inlaid.predictor import OnlineLengthPredictor
    from inlaid.predictor.cli import main

    def interrupted(self: Any, wait: bool = True) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(OnlineLengthPredictor, "refit", interrupted)
    data = _rows(tmp_path / "d.jsonl", [("a", [1, 2], 3)])
    try:
        code = main(["train", "--data", str(data), "--out", str(tmp_path / "p.npz")])
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped `python -m inlaid.predictor train`")
    assert code == 130 and capsys.readouterr().err == "python -m inlaid.predictor: interrupted\n"
    assert not (tmp_path / "p.npz").exists()


def test_ctrl_c_during_tune_scheduler_is_said_below_the_progress_bar(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar, left open, was redrawn after the message: its last line was the bar."""
    import inlaid.scheduling.autotune as autotune
    from inlaid.cli import main

    def interrupted(*args: Any, progress: Any = None, **kwargs: Any) -> Any:
        progress(1, 44)
        raise KeyboardInterrupt

    monkeypatch.setattr(autotune, "tune_inlaid_options", interrupted)
    assert main(["tune-scheduler", "--cost-model", str(COST_MODEL), "--requests", "10"]) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "inlaid tune-scheduler: interrupted" and "simulate" in err, err


def test_tune_scheduler_bounds_the_task_count(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from inlaid.scheduling.autotune import MAX_TUNING_TASKS, tuning_input_problem

    code, err = _tune(monkeypatch, capsys, "--tasks", "99999999")
    assert code == 2 and err.strip().splitlines() == [
        f"inlaid tune-scheduler: --tasks must be <= {MAX_TUNING_TASKS} (tasks of the simulated server), "
        "got 99999999"], err
    assert MAX_TUNING_TASKS == 100_000  # as docs/scheduling.md states
    assert "num_tasks <= 100000" in str(tuning_input_problem(MAX_TUNING_TASKS + 1, 200, 0.8))  # the server's too
    assert tuning_input_problem(MAX_TUNING_TASKS, 200, 0.8) is None
