"""`inlaid eval`, `inlaid generate` and `inlaid models` on an outside probe's inputs. Every case
but the last is decided before a model loads (a model directory holding only config.json
shows the order: a check that ran after the load would fail on the missing weights instead);
the last interrupts a real, short `eval` with SIGINT and with SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from inlaid.engine.cli import _note_context_caps
from inlaid.protocol import SamplingParams
from inlaid.tasks.checks import base_model_warnings
from inlaid.tasks.eval_plan import planned_runs
from inlaid.tasks.evaluate import add_arguments, markdown_table
from test_tasks_cli_inputs import _refused  # one wording check for the CLIs' refusals

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "adapters"


def _inlaid(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inlaid.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


@pytest.fixture
def config_only_model(model_dir: Path, tmp_path: Path) -> Path:
    """The model without its weights: shapes and tokenizer are known, loading the model fails
    (the tokenizer is there so that `eval` gets that far without looking for it elsewhere)."""
    out = tmp_path / model_dir.name
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def _eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------ eval

def test_eval_names_each_adapter_apart(tmp_path: Path) -> None:
    """`/a/math` and `/b/math` shared the name 'math': the engine served both tasks' requests
    with one of them, and the results kept one row."""
    for folder in ("a", "b"):
        shutil.copytree(ADAPTERS / "math", tmp_path / folder / "math")
    args = _eval_args(["--task", "math", "--adapter", str(tmp_path / "a/math"),
                       "--task", "sentiment", "--adapter", str(tmp_path / "b/math"),
                       "--task", "sentiment", "--adapter", str(tmp_path / "a/math")])
    runs = planned_runs(args, args.task)
    served = {run.adapter_name: run.adapter_dir for run in runs}   # what the engine registers
    assert [(r.task, r.adapter_name) for r in runs] == [("math", "math"), ("sentiment", "math-2"),
                                                        ("sentiment", "math")]
    assert served == {"math": tmp_path / "a/math", "math-2": tmp_path / "b/math"}


def test_eval_markdown_keeps_a_row_per_adapter() -> None:
    def entry(score: float) -> dict:
        return {"primary_metric": "accuracy", "scores": {"accuracy": score}, "examples": 2, "dtype": "float32",
                "output_tokens": {"p50": 1.0, "p90": 2.0, "max": 2}}

    results = {"tasks": {"sentiment": {"base": entry(50.0), "sentiment": entry(75.0), "sentiment-2": entry(100.0)}}}
    rows = markdown_table(results).splitlines()[2:]
    assert len(rows) == 2, rows
    assert rows[0].startswith("| sentiment (sentiment) | accuracy | 2 | 50.0 | 75.0 | +25.0 |"), rows
    assert rows[1].startswith("| sentiment (sentiment-2) | accuracy | 2 | 50.0 | 100.0 | +50.0 |"), rows


def test_eval_usage_errors_exit_2(tmp_path: Path) -> None:
    _refused(_inlaid(["eval"]), "eval", "--task")  # exited 1
    same = str(tmp_path / "r.json")
    _refused(_inlaid(["eval", "--task", "math", "--out", same, "--markdown", same]), "eval",
             "--out and --markdown are the same file")


def test_adapter_for_another_base_name_warns_in_eval_and_generate(config_only_model: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "other"
    shutil.copytree(ADAPTERS / "math", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    # the committed adapter names another machine's cache path of this same model: no warning
    assert base_model_warnings(config_only_model, {"math": ADAPTERS / "math"}) == []
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    done = _inlaid(["generate", "--model", str(config_only_model), "--adapter", f"o={adapter}", "--prompt", "Hi"])
    assert "inlaid generate: warning: adapter 'o' was trained for base model 'meta-llama/Llama-3.2-1B'" in done.stderr
    done = _inlaid(["eval", "--model", str(config_only_model), "--task", "math", "--adapter", str(adapter),
                    "--limit", "1"])
    assert "inlaid eval: warning: adapter 'other' was trained for base model 'meta-llama/Llama-3.2-1B'" in done.stderr


def test_an_adapter_of_another_base_whose_shapes_do_not_fit_is_refused_without_the_served_warning(
        config_only_model: Path, tmp_path: Path) -> None:
    """The warning says "served because its shapes fit"; it was printed before the shape check
    that then refused the adapter (an outside adapter probe)."""
    from adapter_corruptions import copy_adapter, rewrite_tensors

    adapter = copy_adapter(ADAPTERS / "math", tmp_path, "other")
    rewrite_tensors(adapter, lambda tensors: tensors.update({key: value[:, :64].contiguous() for key, value
                                                             in tensors.items() if "lora_A" in key}))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/Other-1B"}))
    for command, adapter_arg in (("generate", f"o={adapter}"), ("eval", str(adapter))):
        extra = ["--prompt", "Hi"] if command == "generate" else ["--task", "math", "--limit", "1"]
        done = _inlaid([command, "--model", str(config_only_model), "--adapter", adapter_arg, *extra])
        assert done.returncode == 2, done.stderr
        assert "another base model" in done.stderr or "this base has" in done.stderr, done.stderr
        assert "warning" not in done.stderr, done.stderr


# ------------------------------------------------------------------------ generate

def test_generate_refuses_a_prompt_that_is_not_utf8(config_only_model: Path) -> None:
    # argv bytes that are not UTF-8 arrive as surrogate escapes: a TypeError after the load.
    done = subprocess.run([sys.executable, "-m", "inlaid.cli", "generate", "--model", str(config_only_model),
                           b"--prompt", b"caf\xe9 \xff"], capture_output=True, text=True, timeout=300)
    _refused(done, "generate", "--prompt", "not valid UTF-8", "0xe9")


@pytest.mark.parametrize("content, named", [
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', [":2", "not valid UTF-8"]),   # the whole file, unnamed
    (b'{"prompt": "ok"}\n{"prompt": [1, 49152]}\n', [":2", "token ids", "[0, 49152)"]),  # after the load
    (b'{"prompt": [-1]}\n', [":1", "token ids"]),
    (b"\n\n", ["is empty"]),                                       # "give --prompt or --batch"
])
def test_generate_names_the_batch_file_line(config_only_model: Path, tmp_path: Path, content: bytes,
                                            named: list[str]) -> None:
    batch = tmp_path / "b.jsonl"
    batch.write_bytes(content)
    _refused(_inlaid(["generate", "--model", str(config_only_model), "--batch", str(batch)]), "generate",
             str(batch), *named)


def test_generate_refuses_use_it_cannot_apply(config_only_model: Path, tmp_path: Path) -> None:
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"prompt": "ok"}\n')
    model = ["generate", "--model", str(config_only_model)]
    # with --batch alone, --use was ignored and the base ran
    _refused(_inlaid([*model, "--batch", str(batch), "--use", "s"]), "generate", "--use", "'adapter'")
    # one --use per --prompt: the second was dropped
    _refused(_inlaid([*model, "--adapter", f"s={ADAPTERS / 'math'}", "--adapter", f"t={ADAPTERS / 'code'}",
                      "--prompt", "Hi", "--use", "s", "--use", "t"]), "generate", "2 --use for 1 --prompt")


def test_generate_checks_adapter_weights_before_the_load(config_only_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "nan"
    shutil.copytree(ADAPTERS / "math", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = next(k for k in tensors if ".lora_B." in k)
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    # was found by the load (here: a model without weights fails first)
    _refused(_inlaid(["generate", "--model", str(config_only_model), "--adapter", f"n={adapter}", "--prompt", "Hi"]),
             "generate", "--adapter", "'n'", "NaN")


def test_no_context_note_for_a_prompt_the_engine_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    request = {"sampling": SamplingParams(max_tokens=4), "max_tokens_from": "--max-tokens"}
    _note_context_caps(8, [request], [list(range(8))])  # the prompt fills the context: refused next
    assert capsys.readouterr().err == ""
    _note_context_caps(8, [request], [list(range(6))])
    assert "--max-tokens 4 is more than the context leaves (2)" in capsys.readouterr().err


# ------------------------------------------------------------------------ models

def test_models_path_and_prepare_on_a_cache_without_the_model(tmp_path: Path) -> None:
    done = _inlaid(["models", "path"], env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    _refused(done, "models", "not prepared", code=1)
    assert done.stdout == ""
    blocker = tmp_path / "file"
    blocker.write_text("")
    _refused(_inlaid(["models", "prepare"], env={"XDG_CACHE_HOME": str(blocker)}), "models", "model cache")


# ------------------------------------------------------------------------ eval, interrupted (real model)

@pytest.mark.parametrize("stop, code, words", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_eval_interrupted_writes_what_finished(model_dir: Path, tmp_path: Path, stop, code, words) -> None:
    """sentiment (8 new tokens) finishes long before a 48-token math answer: SIGINT once the
    progress bar shows one request done. The finished prediction was thrown away. SIGTERM (a
    service manager, `timeout`) ended it with no word and nothing written; now as SIGINT."""
    out, table = tmp_path / "r.json", tmp_path / "r.md"
    process = subprocess.Popen(
        [sys.executable, "-m", "inlaid.cli", "eval", "--model", str(model_dir), "--task", "sentiment",
         "--task", "math", "--limit", "1", "--out", str(out), "--markdown", str(table)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = bytearray()

    def read_stderr() -> None:
        assert process.stderr is not None
        sent = False
        while chunk := process.stderr.read1(256):
            seen.extend(chunk)
            if b"1/2 [" in seen and not sent and process.poll() is None:
                process.send_signal(stop)  # once: a second Ctrl-C means "stop writing too"
                sent = True

    def read_stdout() -> None:
        assert process.stdout is not None
        printed.extend(process.stdout.read())

    printed = bytearray()
    # Each pipe has one reader: `communicate` beside the stderr thread read stderr too, and
    # took the "interrupted" line from it now and then.
    readers = [threading.Thread(target=read_stderr), threading.Thread(target=read_stdout)]
    for reader in readers:
        reader.start()
    process.wait(timeout=300)
    for reader in readers:
        reader.join()
    stdout = bytes(printed)
    err = seen.decode(errors="replace")
    assert process.returncode == code, err
    assert f"inlaid eval: {words}: 1 of 2 predictions finished; wrote them (partial)" in err, err
    results = json.loads(out.read_text())
    assert results["partial"] == {"finished": 1, "requests": 2, "stopped_by": stop.name}
    assert list(results["tasks"]) == ["sentiment"]
    assert len(results["tasks"]["sentiment"]["base"]["predictions"]) == 1
    assert "| sentiment |" in table.read_text()
    assert b"sentiment" in stdout
    assert b"(of the finished predictions)" in stdout  # its tokens= count: not those cut off


def test_a_quantized_checkpoint_is_scored_as_its_float_base(tmp_path: Path) -> None:
    """`inlaid eval --model CHECKPOINT`: each adapter of the checkpoint's own base was warned
    about ("trained for ... not this model 'mlgptq3'"), and `--backend peft` ended in
    optimum's ImportError traceback. The checkpoint's recorded base decides the name; peft is
    refused in one line before anything loads."""
    checkpoint = tmp_path / "mlgptq3"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"bits": 3}}))
    (checkpoint / "inlaid_quant.json").write_text(json.dumps({"base_model": "/elsewhere/SmolLM2-135M-Instruct"}))
    assert base_model_warnings(checkpoint, {"math": ADAPTERS / "math"}) == []
    (checkpoint / "inlaid_quant.json").unlink()  # a checkpoint of others: no record, its folder's name is all
    [warning] = base_model_warnings(checkpoint, {"math": ADAPTERS / "math"})
    assert warning.endswith("not this model 'mlgptq3'; served because its shapes fit"), warning
    done = _inlaid(["eval", "--model", str(checkpoint), "--task", "math", "--adapter", str(ADAPTERS / "math"),
                    "--backend", "peft"])
    _refused(done, "eval", "--backend peft loads --model with transformers, which reads a GPTQ checkpoint")


def test_eval_names_a_missing_adapter_directory_as_the_other_commands_do(config_only_model: Path,
                                                                          tmp_path: Path) -> None:
    """`eval --adapter my-adapters/sentiment` (a path that does not exist) said "no
    adapter_config.json in ..." where generate, quantize and serve say "directory not found"
    (a first-user walkthrough)."""
    from inlaid.tasks.checks import adapter_problem

    missing = tmp_path / "my-adapters" / "sentiment"
    assert adapter_problem(config_only_model, {"sentiment": missing}) == (
        f"adapter 'sentiment': directory not found: {missing}")
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json in" in adapter_problem(config_only_model, {"e": tmp_path / "empty"})


def test_python_dash_m_inlaid_is_the_inlaid_command() -> None:
    """`python -m inlaid` said "No module named inlaid.__main__" (a first-user walkthrough)."""
    done = subprocess.run([sys.executable, "-m", "inlaid", "tasks", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage: inlaid tasks" in done.stdout, done.stderr


def test_eval_warns_when_an_adapter_is_scored_on_another_task_than_it_was_trained_for() -> None:
    """`eval --task sentiment --adapter adapters/math` scored 100 % unparsed without a word (a
    first-user walkthrough); the adapter's training.json names its task."""
    from inlaid.tasks.checks import task_mismatch_warnings

    warnings = task_mismatch_warnings([("sentiment", ADAPTERS / "math"), ("math", ADAPTERS / "math"),
                                       ("mine=mine.jsonl", ADAPTERS / "sentiment")])
    assert warnings == [f"adapter '{ADAPTERS / 'math'}' was trained for task 'math' (its training.json), scored "
                        "here on 'sentiment'",
                        f"adapter '{ADAPTERS / 'sentiment'}' was trained for task 'sentiment' (its training.json), "
                        "scored here on 'mine=mine.jsonl'"]
    assert task_mismatch_warnings([("math", Path("/nonexistent"))]) == []
