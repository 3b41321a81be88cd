"""bench/quality.py's caches and reports never stand for other inputs (an outside review,
2026-12-07): the unquantized rows were keyed by the adapters' weights alone, so a re-prepared
eval split, a retrained adapter's config or changed scoring code reused stale rows; a report
measured on other adapters or budgets merged into this one; an interrupted generation was scored
on the examples that finished and stored as a whole row; a checkpoint killed before its end was
taken as finished."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
import quality_checkpoints  # noqa: E402
import quality_inputs  # noqa: E402
from quality_merge import previous_report  # noqa: E402


def _args(adapters_dir: Path, **changes) -> argparse.Namespace:
    settings = dict(adapters_dir=adapters_dir, calib_samples=32, limit=50, nll_limit=None, weight_dtype="auto",
                    max_tokens=512, backend="auto", serve="dequantized", variants={}, work_dir=None)
    return argparse.Namespace(**{**settings, **changes})


@pytest.fixture
def inputs_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A model directory, one task's adapter and its eval split, all small files of their own."""
    from inlaid.tasks.base import Task

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"weights")
    adapters = tmp_path / "adapters"
    shutil.copytree(ROOT / "adapters" / "sentiment", adapters / "sentiment")
    splits = tmp_path / "splits"
    splits.mkdir()
    for split in ("eval", "calib"):
        (splits / f"{split}.jsonl").write_text('{"id": "a"}\n')
    monkeypatch.setattr(Task, "split_path", lambda task, split: splits / f"{split}.jsonl")
    return {"model": model, "adapters": adapters, "splits": splits}


def test_the_unquantized_key_changes_with_every_input(inputs_tree: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    args = _args(inputs_tree["adapters"])

    def key(kind: str = "generate") -> str:
        inputs = quality_inputs.data_inputs(args, inputs_tree["model"], ["sentiment"])
        return quality_inputs.unquantized_key(args, kind, ["sentiment"], inputs)

    keys = [key()]
    assert key() == keys[0]  # the same inputs, the same key
    adapter_config = inputs_tree["adapters"] / "sentiment" / "adapter_config.json"
    adapter_config.write_text(adapter_config.read_text().replace('"lora_alpha"', '"lora_alpha" ', 1))
    keys.append(key())  # a retrained adapter's config (weights unchanged)
    (inputs_tree["splits"] / "eval.jsonl").write_text('{"id": "b"}\n')
    keys.append(key())  # a re-prepared eval split
    (inputs_tree["model"] / "model.safetensors").write_bytes(b"other weights")
    keys.append(key())  # another base model
    code = tmp_path / "repo"
    (code / "inlaid" / "tasks").mkdir(parents=True)
    (code / "inlaid" / "tasks" / "metrics.py").write_text("def score(): return 1\n")
    monkeypatch.setattr(quality_inputs, "REPO", code)
    keys.append(key())
    (code / "inlaid" / "tasks" / "metrics.py").write_text("def score(): return 2\n")
    keys.append(key())  # the scoring code
    keys.append(key("nll"))
    args.limit = 10
    keys.append(key())
    assert len(set(keys)) == len(keys), keys


def test_a_report_on_other_inputs_or_budgets_is_not_merged(inputs_tree: dict[str, Path], tmp_path: Path) -> None:
    import json

    args = _args(inputs_tree["adapters"])
    inputs = quality_inputs.data_inputs(args, inputs_tree["model"], ["sentiment"])
    terms = quality_inputs.report_terms(args, ["sentiment"], ["sentiment"], inputs)
    out = tmp_path / "quality.json"
    out.write_text(json.dumps({**terms, "methods": ["rtn"], "configs": {}}))
    assert previous_report(out, True, terms)["methods"] == ["rtn"]
    for changed in ({"max_tokens": 256}, {"backend": "peft"}, {"serve": "kernels"}):
        with pytest.raises(SystemExit, match="measured with other settings"):
            previous_report(out, True, quality_inputs.report_terms(_args(inputs_tree["adapters"], **changed),
                                                                   ["sentiment"], ["sentiment"], inputs))
    (inputs_tree["splits"] / "eval.jsonl").write_text('{"id": "b"}\n')
    other = quality_inputs.data_inputs(args, inputs_tree["model"], ["sentiment"])
    with pytest.raises(SystemExit, match="inputs"):
        previous_report(out, True, quality_inputs.report_terms(args, ["sentiment"], ["sentiment"], other))


def test_a_damaged_report_to_merge_is_named_in_one_line(tmp_path: Path) -> None:
    """A truncated report at --out ended a --merge run in a JSONDecodeError traceback (an outside probe)."""
    out = tmp_path / "quality.json"
    for damaged in ('{"tasks": ["sentiment"]', "[1, 2]", '{"methods": "rtn"}', b"\xff\xfe"):
        out.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
        with pytest.raises(SystemExit, match=f"--merge: {out} is not (a readable report|a report of bench/quality.py)"):
            previous_report(out, True, {})


def test_an_interrupted_generation_is_no_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """evaluate_runs returns what finished on Ctrl-C; those scores are no task's row."""
    import inlaid.tasks.evaluate as evaluate

    from inlaid.tasks import get_task

    examples = get_task("sentiment").load_split("eval")[:4]
    finished = [{"id": e["id"], "text": "positive", "tokens": 1} for e in examples]
    answer = {"backend": "engine", "tasks": {"sentiment": {"sentiment": {
        "scores": {"accuracy": 0.0}, "predictions": finished[:3]}}}}
    monkeypatch.setattr(evaluate, "evaluate_runs", lambda *a, **k: {**answer, "partial": {
        "finished": 3, "requests": 4, "stopped_by": "SIGINT"}})
    args = _args(ROOT / "adapters", limit=4)
    with pytest.raises(quality._Interrupted, match="3 of 4 generations finished") as interrupted:
        quality._generate(args, tmp_path, ["sentiment"])
    assert interrupted.value.exit_code == 130  # SIGINT's
    monkeypatch.setattr(evaluate, "evaluate_runs", lambda *a, **k: {**answer, "partial": {
        "finished": 3, "requests": 4, "stopped_by": "SIGTERM"}})
    with pytest.raises(quality._Interrupted) as interrupted:
        quality._generate(args, tmp_path, ["sentiment"])
    assert interrupted.value.exit_code == 143
    # Predictions not one per example in order: refused, not paired by position.
    shuffled = [finished[1], finished[0], *finished[2:]]
    monkeypatch.setattr(evaluate, "evaluate_runs", lambda *a, **k: {**answer, "tasks": {"sentiment": {"sentiment": {
        "scores": {"accuracy": 0.0}, "predictions": shuffled}}}})
    with pytest.raises(RuntimeError, match="not one per eval example"):
        quality._generate(args, tmp_path, ["sentiment"])


def test_a_checkpoint_marked_unfinished_is_quantized_again(inputs_tree: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed between its metadata and its end left inlaid_quant.json beside UNFINISHED:
    it was returned as finished (and every loader refused it). Now the driver is called on it
    (it resumes there); a finished one is reused without a call."""
    import inlaid.quant.driver as driver

    from inlaid.quant.unfinished import UNFINISHED_FILE

    calls: list[Path] = []

    class Report:
        seconds, peak_rss_mb, phases = 1.0, 1.0, {}

    def quantize_model(config):  # the driver's contract: a finished checkpoint, mark removed
        calls.append(config.out_dir)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        (config.out_dir / UNFINISHED_FILE).unlink(missing_ok=True)
        (config.out_dir / "inlaid_quant.json").write_text("{}")
        return Report()

    monkeypatch.setattr(driver, "quantize_model", quantize_model)
    args = _args(inputs_tree["adapters"], work_dir=tmp_path / "work")

    def checkpoint() -> Path:
        return quality_checkpoints.quantized_checkpoint(args, inputs_tree["model"], ["sentiment"], "rtn", 4, 128)

    first = checkpoint()
    assert calls == [first]
    (first / UNFINISHED_FILE).write_text("interrupted\n")  # killed after its metadata
    assert checkpoint() == first and calls == [first, first]
    assert checkpoint() == first and calls == [first, first]  # finished now: reused


def test_the_dequantized_copy_is_made_whole_and_killed_builds_are_swept(tmp_path: Path) -> None:
    """The float copy generation runs from: written into a temporary directory and renamed (a
    kill mid-write left a truncated model.safetensors that was reused forever); a killed
    build's temporary copy is removed by the next build; a finished copy is reused without
    taking the lock (a directory this run cannot write serves as well). Its weights are the
    checkpoint's dequantized ones."""
    import time

    import torch
    from safetensors.torch import load_file

    from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint
    from tiny_llama import calibration_tasks, quantize_full, two_layer_model_or_skip

    model = two_layer_model_or_skip(tmp_path / "model")
    checkpoint = quantize_full(model, calibration_tasks(model, tmp_path, {"alpha": 2}), tmp_path / "ckpt", "rtn")
    killed = checkpoint / "dequantized.99999999.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"truncat")
    served, why = quality_checkpoints.servable_dir(checkpoint, "dequantized")
    assert served == checkpoint / "dequantized" and "dequantized" in why and not killed.exists()
    expected = dequantized_state_dict(load_gptq_checkpoint(checkpoint))
    got = load_file(str(served / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    lock = checkpoint / "dequantized.lock"
    before = lock.stat().st_mtime_ns
    time.sleep(0.01)
    assert quality_checkpoints.servable_dir(checkpoint, "dequantized")[0] == served
    assert lock.stat().st_mtime_ns == before  # reused without opening the lock for writing


def test_variant_values_are_kept_as_the_options_read_them() -> None:
    """`mean_slack:1` and `mean_slack:1.0` are one option value: one checkpoint key, one
    report entry (the raw JSON values made two)."""
    variants = [quality._variants(argparse.Namespace(variant=[f"x=mean_slack:{value},rounds:2"], methods=["mlgptq[x]"]))
                for value in ("1", "1.0")]
    assert variants[0] == variants[1] == {"mlgptq[x]": {"mean_slack": 1.0, "rounds": 2}}
    assert isinstance(variants[0]["mlgptq[x]"]["mean_slack"], float)
