"""Fixes from an outside probe of `inlaid quantize` / `quantize-add` (docs/quantization.md):

1. a calibration line over MAX_CALIBRATION_LINE_BYTES is refused before the model loads, and
   mlgptq's cost probe sees at most --max-tokens tokens of a sample (it ran samples whole);
2. a quantized checkpoint given as --model is refused in one line, nothing written;
3. a quantize-add refused before its first layer leaves no --out (a later correct command there
   was told to "resume" it);
4. an --out inside --model (or around it) is refused;
5. a finished `quantize` checkpoint without `.partial/` still refuses other settings (its fingerprint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inlaid.quant.calibration import MAX_CALIBRATION_LINE_BYTES, CalibrationTask
from inlaid.quant.checkpoint import METADATA_FILE, WEIGHTS_FILE
from inlaid.quant.partial import PARTIAL_DIR
from inlaid.quant.unfinished import UNFINISHED_FILE

from test_quant_cli_inputs import _quantize, no_model_load, tiny  # noqa: F401 (the same fixtures)
from tiny_llama import quantize_full

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_checkpoint(tiny):
    """A full mlgptq checkpoint of the tiny model, with its Hessian state (quantize-add's input)."""
    root, model_dir, adapter, calib = tiny
    return quantize_full(model_dir, [CalibrationTask("alpha", adapter, calib)], root / "base")


def _add(checkpoint: Path, task: str, out: Path, *extra: str) -> int:
    from inlaid.cli import main

    return main(["quantize-add", "--checkpoint", str(checkpoint), "--task", task, "--out", str(out),
                 "--max-samples", "2", "--threads", "1", *extra])


def _one_line_error(capsys, *needles: str) -> str:
    # transformers' "Loading weights" bar (where a refusal comes after the model loads) aside
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line)
    assert "\n" not in err and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    return err


def _long_sample(words: int) -> str:
    return json.dumps({"id": "long", "messages": [{"role": "user", "content": "Summarise this."}],
                       "reference": " ".join(f"word{index % 50}" for index in range(words))})


# ---------------------------------------------------------------- 1: a long sample

def test_calibration_line_over_the_bound_is_refused_before_the_model_loads(tiny, tmp_path, capsys,
                                                                          no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    huge = tmp_path / "huge.jsonl"
    huge.write_text(calib.read_text() + _long_sample(MAX_CALIBRATION_LINE_BYTES // 5) + "\n")  # line 4
    out = tmp_path / "o"
    assert _quantize(model_dir, f"alpha={adapter}:{huge}", out) == 2
    _one_line_error(capsys, f"{huge}:4: a sample over {MAX_CALIBRATION_LINE_BYTES} bytes")
    assert not out.exists()


def test_server_and_cli_share_the_line_bound() -> None:
    from inlaid.serve import task_inputs

    assert task_inputs.MAX_CALIBRATION_LINE_BYTES == MAX_CALIBRATION_LINE_BYTES


def test_cost_probe_sees_at_most_max_tokens(tiny, tmp_path, capsys, monkeypatch) -> None:
    """A 3,000-word sample (under the line bound) with --max-tokens 48: every forward of the
    mlgptq cost probe holds at most 48 tokens (it ran the whole sample: thousands)."""
    import inlaid.quant.nll as nll

    root, model_dir, adapter, calib = tiny
    long = tmp_path / "long.jsonl"
    long.write_text(_long_sample(3000) + "\n" + calib.read_text())
    probed_lengths: list[int] = []
    real_decoder_of = nll._decoder_of

    def recording_decoder_of(forward_model):
        decoder = real_decoder_of(forward_model)

        def run(input_ids):
            probed_lengths.append(input_ids.shape[1])
            return decoder(input_ids=input_ids)
        return run

    monkeypatch.setattr(nll, "_decoder_of", recording_decoder_of)
    out = tmp_path / "o"
    assert _quantize(model_dir, f"alpha={adapter}:{long}", out, "--no-errors") == 0
    assert probed_lengths and max(probed_lengths) <= 48, probed_lengths


def test_answer_nll_within_the_limit_is_unchanged(tiny) -> None:
    """max_tokens cuts only what lies past it: a short example scores the same, a long one
    scores only its answer tokens inside the limit, and one whose prompt fills it none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.quant.nll import answer_nll, tokenize_example

    root, model_dir, adapter, calib = tiny
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    short = json.loads(calib.read_text().splitlines()[0])
    long = json.loads(_long_sample(400))
    prompt, answer = tokenize_example(short, tokenizer)
    whole = answer_nll(model, tokenizer, [short])
    assert answer_nll(model, tokenizer, [short], max_tokens=len(prompt) + len(answer)) == whole
    long_prompt, _ = tokenize_example(long, tokenizer)
    cut = answer_nll(model, tokenizer, [long, short], max_tokens=64)
    assert cut[0].tokens == 64 - len(long_prompt)
    # batched beside the long one (padding changes the matmul shapes): equal to rounding
    assert cut[1].tokens == whole[0].tokens and cut[1].nll == pytest.approx(whole[0].nll, rel=1e-6)
    assert answer_nll(model, tokenizer, [long], max_tokens=len(long_prompt))[0].tokens == 0


# ---------------------------------------------------------------- 2 and 4: --model and --out

def test_quantized_checkpoint_as_model_is_refused(tiny, base_checkpoint, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    out = tmp_path / "o"
    assert _quantize(base_checkpoint, f"alpha={adapter}:{calib}", out) == 2
    _one_line_error(capsys, f"--model {base_checkpoint} is a quantized checkpoint", "float model")
    assert not out.exists()


def test_out_inside_or_around_model_is_refused(tiny, tmp_path, capsys, no_model_load) -> None:
    root, model_dir, adapter, calib = tiny
    before = sorted(p.name for p in model_dir.iterdir())
    for out in (model_dir / "sub", model_dir / "a" / "b", model_dir.parent):
        assert _quantize(model_dir, f"alpha={adapter}:{calib}", out) == 2, out
        _one_line_error(capsys, "overlaps the model")
    assert sorted(p.name for p in model_dir.iterdir()) == before


# ---------------------------------------------------------------- 3: a refused quantize-add

def _variant(base: Path, where: Path, change) -> Path:
    """A copy of the checkpoint, its Hessian state shared (a link: nothing large copied)."""
    where.mkdir()
    for entry in base.iterdir():
        if entry.is_file():
            shutil.copyfile(entry, where / entry.name)
        else:
            (where / entry.name).symlink_to(entry)
    change(where)
    return where


def _without_state(checkpoint: Path) -> None:
    metadata = json.loads((checkpoint / METADATA_FILE).read_text())
    (checkpoint / METADATA_FILE).write_text(json.dumps({**metadata, "hessian_state": ""}))


def _truncated_weights(checkpoint: Path) -> None:
    data = (checkpoint / WEIGHTS_FILE).read_bytes()
    (checkpoint / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _qweight_row_cut_off(checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint / WEIGHTS_FILE))
    key = "model.layers.1.self_attn.q_proj.qweight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(checkpoint / WEIGHTS_FILE), metadata={"format": "pt"})


def test_refused_quantize_add_leaves_no_out(tiny, base_checkpoint, tmp_path, capsys) -> None:
    root, model_dir, adapter, calib = tiny
    beta = f"beta={adapter}:{calib}"
    rtn = quantize_full(model_dir, [CalibrationTask("alpha", adapter, calib)], tmp_path / "rtn", method="rtn")
    refused = [rtn, _variant(base_checkpoint, tmp_path / "stateless", _without_state),
               _variant(base_checkpoint, tmp_path / "truncated", _truncated_weights),
               _variant(base_checkpoint, tmp_path / "cut_row", _qweight_row_cut_off)]
    out = tmp_path / "new" / "plus"
    for checkpoint in refused:
        capsys.readouterr()
        assert _add(checkpoint, beta, out) == 2, checkpoint
        assert " error: " not in _one_line_error(capsys, "inlaid quantize-add: ")
        assert not (tmp_path / "new").exists(), checkpoint
    empty = tmp_path / "empty"  # made by the user: it stays, as empty as it was
    empty.mkdir()
    assert _add(refused[0], beta, empty) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []
    # the command the user meant, to the same --out, runs (it was sent to "resume" the refused one)
    capsys.readouterr()
    assert _add(base_checkpoint, beta, out) == 0, capsys.readouterr().err
    assert not (out / UNFINISHED_FILE).exists() and not (out / PARTIAL_DIR).exists()


def test_an_earlier_runs_out_is_not_removed(tiny, base_checkpoint, tmp_path, capsys) -> None:
    """What an earlier run left (here an interrupted one) stays when a later run is refused."""
    from inlaid.quant.unfinished import mark_unfinished

    root, model_dir, adapter, calib = tiny
    out = tmp_path / "earlier"
    mark_unfinished(out, "quantize-add")
    stateless = _variant(base_checkpoint, tmp_path / "stateless", _without_state)
    assert _add(stateless, f"beta={adapter}:{calib}", out, "--restart") == 2
    assert out.is_dir() and (out / UNFINISHED_FILE).is_file()


# ---------------------------------------------------------------- 5: a finished run's fingerprint

def test_a_finished_checkpoint_guards_itself_without_its_partial_dir(tiny, tmp_path, capsys, monkeypatch) -> None:
    """A finished run keeps `.partial/` (the same command again reloads every layer from it);
    without it (the suite build removes it, a user may) the fingerprint the metadata records
    still refuses other settings without --restart, and a failed write keeps `.partial/`."""
    import shutil

    import inlaid.quant.driver as driver

    root, model_dir, adapter, calib = tiny
    task = f"alpha={adapter}:{calib}"
    out = tmp_path / "o"
    assert _quantize(model_dir, task, out, "--no-errors") == 0
    assert (out / PARTIAL_DIR / "run.json").is_file() and (out / WEIGHTS_FILE).is_file()
    shutil.rmtree(out / PARTIAL_DIR)
    capsys.readouterr()
    assert _quantize(model_dir, task, out, "--no-errors", "--bits", "3") == 2
    _one_line_error(capsys, "finished checkpoint made with other settings", "--restart")
    assert _quantize(model_dir, task, out, "--no-errors") == 0  # the same command rewrites it
    assert not (out / UNFINISHED_FILE).exists()

    def failed_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(driver, "_write_model", failed_write)
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="disk full"):
        _quantize(model_dir, task, failed, "--no-errors")
    assert (failed / PARTIAL_DIR / "layer_001.safetensors").is_file() and (failed / UNFINISHED_FILE).is_file()


def test_an_early_failure_removes_only_its_own_output(tmp_path) -> None:
    """Two runs started together into runs/g32 and runs/g64 (runs/ missing): the one refused
    early removed runs/, the other's work with it."""
    from inlaid.quant.inputs import CreatedOutput

    runs = tmp_path / "runs"
    mine, other = runs / "g32", runs / "g64"
    created_mine, created_other = CreatedOutput.before_run(mine), CreatedOutput.before_run(other)
    mine.mkdir(parents=True)
    (mine / UNFINISHED_FILE).write_text("refused before its first layer")
    other.mkdir(parents=True)
    (other / "layer_000.safetensors").write_text("the other run's work")
    created_mine.remove()
    assert not mine.exists() and (other / "layer_000.safetensors").read_text() == "the other run's work"
    created_other.remove()
    assert not runs.exists()  # the last one out removes the parent both created


def test_a_task_whose_prompts_fill_max_tokens_weighs_as_the_mean_not_zero(tiny, tmp_path) -> None:
    """The probe takes each sample's first max_tokens tokens: a task whose every probed prompt
    fills them scored 0 answer tokens, a raw cost of 0, and its Hessians weighed 0 in the
    aggregate without a word."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.quant.calibration import CalibrationTask
    from inlaid.quant.task_costs import probe_impurity

    root, model_dir, adapter, calib = tiny
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    long = tmp_path / "long.jsonl"
    long_prompt = json.loads(calib.read_text().splitlines()[0])
    long_prompt["messages"] = [{"role": "user", "content": "word " * 400}]
    long.write_text(json.dumps(long_prompt) + "\n")
    tasks = [CalibrationTask("short", None, calib), CalibrationTask("long", None, long)]
    raw = probe_impurity(model, tokenizer, None, tasks, probe_samples=2, max_tokens=64)
    assert raw["short"] > 0 and raw["long"] == raw["short"], raw
