"""The command line's refusals name the option, key or file at fault and say what is wrong,
before anything loads or starts (outside probes: a damaged weights file, messages naming no
option, options that changed nothing). Each runs the real command; `inlaid serve` in a process
of its own where a regression would start a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.cli import main


def test_a_damaged_model_weights_file_is_named_before_anything_loads(model_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A truncated model.safetensors in model.dir: `inlaid serve` logged "listening", then three
    executor tracebacks and a last line naming no file (exit 1); quantize and train-adapter said
    the library's "invalid header length". Now one line naming the file, exit 2, nothing started."""
    damaged = tmp_path / "model"
    damaged.mkdir()
    for item in model_dir.iterdir():
        (damaged / item.name).symlink_to(item)
    (damaged / "model.safetensors").unlink()
    (damaged / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:2000])
    named = f"{damaged / 'model.safetensors'} is truncated or not a safetensors file ("
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\ndir = "{damaged}"\n')
    # A process of its own, bounded: before the check, this server started (and never exited by itself).
    served = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert served.returncode == 2 and served.stderr.startswith("inlaid serve: model.dir: "), served.stderr
    assert named in served.stderr and len(served.stderr.strip().splitlines()) == 1, served.stderr
    commands = [(["quantize", "--model", str(damaged), "--task", f"s={model_dir}:calib.jsonl",
                  "--out", str(tmp_path / "q")], "inlaid quantize: "),
                (["train-adapter", "--model", str(damaged), "--task", "sentiment", "--out", str(tmp_path / "t")],
                 "inlaid train-adapter: ")]
    for command, prefix in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(prefix) and named in err and "the model's weights are damaged" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "q").exists() and not (tmp_path / "t").exists()
    from inlaid.cli_args import model_dir_problem

    assert model_dir_problem(damaged, weights=False) is None  # beside a quantized base its weights are not served


def test_an_unfinished_checkpoint_as_model_is_named_so_before_anything_loads(model_dir: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """`inlaid eval --model` of a quantize run stopped before its config.json read "not a
    Hugging Face model directory", and of one stopped after it loaded the model for seconds
    before refusing (an outside probe); `generate` named it an unfinished checkpoint."""
    from inlaid.quant.unfinished import UNFINISHED_FILE

    early, late = tmp_path / "early", tmp_path / "late"
    early.mkdir()
    late.mkdir()
    (late / "config.json").write_text((model_dir / "config.json").read_text())
    for checkpoint in (early, late):
        (checkpoint / UNFINISHED_FILE).write_text("quantize: a run writing this checkpoint has not finished\n")
        for command in (["eval", "--model", str(checkpoint), "--task", "sentiment"],
                        ["generate", "--model", str(checkpoint), "--prompt", "hi"]):
            assert main(command) == 2, command
            err = capsys.readouterr().err.strip()
            assert f"{checkpoint} is an unfinished checkpoint ({UNFINISHED_FILE})" in err, err
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_messages_name_the_option_and_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each was refused, but in words that named no option (`ValueError: device must be ...`,
    `the server address must be ...`), said the wrong thing (a token file that is a directory
    "not found"; a training.json that exists "no training.json"), or a class and a bare key
    (`SuiteRecord.__init__() got an unexpected keyword argument`, `'coefficients'`)."""
    (tmp_path / "tokens").mkdir()
    config = tmp_path / "server.toml"
    config.write_text('[server]\nadmin_token_file = "tokens"\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "training.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text('{"a": 1}')
    (tmp_path / "lengths.jsonl").write_text('{"prompt": "x", "task": "a"}\n')
    # A task of its own: a suite task's data exists only once prepared (on a fresh machine,
    # whether it was depended on the order the tests ran in).
    greet = tmp_path / "greet.jsonl"
    greet.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "reference": "hi"}) + "\n")
    cost_model = Path(__file__).resolve().parents[1] / "bench" / "results" / "sched_cost_model.json"
    cases = [
        (["serve", "--config", str(config)], f"inlaid serve: server.admin_token_file {tmp_path / 'tokens'}: is a "
                                             "directory, not a file"),
        (["train-adapter", "--task", f"greet={greet}", "--out", str(out)],
         f"inlaid train-adapter: --out {out} is not empty and holds no train-adapter run (its training.json is not "
         "a train-adapter record); choose a new or empty directory"),
        (["generate", "--device", "tpu", "--prompt", "hi"],
         "inlaid generate: --device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        (["http", "--address", "foo"], "inlaid http: --address must be tcp://HOST:PORT or ipc://PATH"),
        (["tune-scheduler", "--cost-model", str(tmp_path / "wrong.json")],
         f"inlaid tune-scheduler: {str(tmp_path / 'wrong.json')!r} is not a cost model written by "
         "bench/sched_cost.py: it has no field 'coefficients'"),
        (["tune-scheduler", "--cost-model", str(cost_model), "--lengths", str(tmp_path / "lengths.jsonl")],
         f"inlaid tune-scheduler: {tmp_path / 'lengths.jsonl'}:1: not a recorded request: a JSON object with exactly "
         "the fields record_id, task, split,"),
    ]
    for command, words in cases:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(words) and len(err.splitlines()) == 1 and "Error:" not in err, (words, err)


def test_serve_without_a_prepared_default_model_says_how_to_make_it(tmp_path: Path) -> None:
    # It said "model.dir: model directory not found": a key the config does not have.
    config = tmp_path / "server.toml"
    config.write_text("[server]\n")
    served = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert served.returncode == 2, served.stderr
    assert served.stderr.strip() == (f"inlaid serve: the default model (no model.dir): model directory not found: "
                                     f"{tmp_path / 'cache' / 'inlaid' / 'models' / 'SmolLM2-135M-Instruct'}; "
                                     "`inlaid models prepare` makes it"), served.stderr


def test_generate_refuses_options_that_would_change_nothing_or_cannot_travel(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """`--chat` with only `--batch` and `--batch-invariant` without `--quantized` ran as if not
    given (exit 0, no word); `--seed 10**23` ran, where every request to a server is refused it."""
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"prompt": "Hi"}\n')
    cases = [(["--chat", "--batch", str(batch)], "--chat wraps each --prompt as a user message"),
             (["--batch-invariant", "--prompt", "Hi"], "--batch-invariant chooses the kernel route of a --quantized"),
             (["--seed", str(10**23), "--prompt", "Hi"], "options: seed must be an integer in [-2**63, 2**64)")]
    for options, words in cases:
        assert main(["generate", *options]) == 2, options
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"inlaid generate: {words}") and len(err.splitlines()) == 1, err
    from inlaid.protocol import SamplingError, SamplingParams

    SamplingParams(seed=2**64 - 1).validate()
    SamplingParams(seed=-(2**63)).validate()
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(SamplingError, match="seed must be an integer") as refused:
            SamplingParams(seed=seed).validate()
        assert refused.value.field == "seed"
