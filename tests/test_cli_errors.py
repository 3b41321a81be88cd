"""The command line on bad inputs: one line naming the problem and a non-zero exit code,
never a traceback, never a silent success. Each case runs the real command (`inlaid.cli.main`)
in this process; only a bug (an error that says nothing about the inputs) keeps its traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inlaid.cli import is_input_error, main


def test_input_errors_are_told_from_bugs() -> None:
    import zmq

    from inlaid.engine.adapter_config import AdapterError
    from inlaid.serve.config import ConfigError

    for error in (FileNotFoundError("x"), NotADirectoryError("x"), ValueError("x"), AdapterError("x"),
                  ConfigError("x"), zmq.ZMQError(), json.JSONDecodeError("x", "doc", 0)):
        assert is_input_error(error), error
    for error in (KeyError("x"), AttributeError("x"), AssertionError(), TypeError("x"), RuntimeError("x")):
        assert not is_input_error(error), error


def test_no_command_is_a_usage_error_and_help_is_not(capsys: pytest.CaptureFixture) -> None:
    """Bare `inlaid` printed its usage and exited 0: a script running `inlaid $COMMAND` with an
    empty COMMAND read success. It is a usage error now (exit 2, usage on stderr), as an
    unknown command is; `--help` still prints to stdout with 0."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: inlaid" in captured.err
    assert captured.err.rstrip().endswith("inlaid: a command is required")
    assert main(["nonsense"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.rstrip().endswith("inlaid: unknown command 'nonsense'")
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert "usage: inlaid" in captured.out and captured.err == ""


def test_the_demo_answers_help_and_refuses_unknown_arguments(capsys: pytest.CaptureFixture) -> None:
    """`python -m inlaid.demo --help` started the whole `make run` (minutes), as any argument
    did: --help now says what it does, and an unknown argument is a usage error."""
    from inlaid.demo import run_main

    with pytest.raises(SystemExit) as exited:
        run_main(["--help"])
    assert exited.value.code == 0
    assert "make run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        run_main(["--quick"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --quick" in capsys.readouterr().err


def test_an_error_of_the_project_is_told_in_its_words_without_its_class(capsys: pytest.CaptureFixture) -> None:
    """`inlaid eval --task nope` said `inlaid eval: TaskError: unknown task ...`: a class name
    to a user. The project's own errors print their message; others keep their class."""
    assert main(["eval", "--task", "nope", "--adapter", "adapters/sentiment"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("inlaid eval: unknown task 'nope'; known tasks:") and "TaskError" not in err, err
    from inlaid.cli import input_error_text
    from inlaid.serve.config import ConfigError

    assert input_error_text(ConfigError("server.address is not an address")) == "server.address is not an address"
    assert input_error_text(ConfigError()) == "ConfigError"  # no words of its own: its class says something
    assert input_error_text(FileNotFoundError(2, "No such file or directory")) == (
        "FileNotFoundError: [Errno 2] No such file or directory")


def test_generate_names_what_is_wrong(model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    from adapter_corruptions import copy_adapter

    cases = [
        (["--adapter", f"s={tmp_path / 'missing'}", "--use", "s"], "directory not found"),
        (["--quantized", str(tmp_path)], ".safetensors weights"),
        (["--batch", str(tmp_path / "missing.jsonl")], "No such file"),
    ]
    for extra, message in cases:
        assert main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-tokens", "2", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # Truncated weights: refused when the adapter is registered, naming it, before any request
    # runs (the in-process engine checked the config alone and failed the request at load:
    # the engine's failure path is tests/test_fault_units.py's).
    broken = copy_adapter(next(iter(adapter_dirs.values())), tmp_path, "broken")
    weights = broken / "adapter_model.safetensors"
    args = ["generate", "--model", str(model_dir), "--adapter", f"b={broken}", "--use", "b", "--prompt", "Hi",
            "--max-tokens", "2", "--json"]
    weights.write_bytes(weights.read_bytes()[:-64])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "adapter 'b'" in err and "truncated" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_client_refuses_bad_settings_and_takes_json_after_the_action(capsys: pytest.CaptureFixture) -> None:
    assert main(["client", "--timeout", "-1", "health"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
    assert main(["client", "--address", "garbage", "health"]) == 2
    assert "garbage" in capsys.readouterr().err
    assert main(["client", "--address", "http://127.0.0.1:8000", "health"]) == 2  # ZeroMQ: "Protocol not supported"
    assert "must be tcp://HOST:PORT or ipc://PATH" in capsys.readouterr().err
    # Sampling values the server refuses are refused here, before any connection (with no
    # server they waited the whole --timeout, then said "no answer").
    for option, message in (("--max-tokens=0", "--max-tokens: max_tokens must be >= 1"),
                            ("--temperature=nan", "--temperature: temperature must be a finite number"),
                            ("--top-p=2", "--top-p: top_p must be in (0, 1]"), ("--stop=", "--stop: stop strings"),
                            ("--deadline=0", "--deadline must be > 0"),
                            (f"--seed={2**64}", "--seed must be an integer in [-2**63, 2**64)")):  # it exited 1
        assert main(["client", "--address", "tcp://127.0.0.1:9", "--timeout", "60", "generate", "hi", option]) == 2
        assert message in capsys.readouterr().err, option
    # No server at this address: the parse succeeds (--json after the action) and the call times out.
    assert main(["client", "--address", "tcp://127.0.0.1:9", "--timeout", "0.3", "task-status", "code", "--json"]) == 1
    assert "no answer" in capsys.readouterr().err


# No server listens here: each refusal below comes before any connection (exit 2, one line).
_NOBODY = "tcp://127.0.0.1:9"


def _refused_naming(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["client", "--timeout", "0.3", *argv]) == 2, argv
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_client_refuses_an_empty_prompt_before_sending(capsys: pytest.CaptureFixture) -> None:
    """The server refused it (exit 1, after a connection); `inlaid generate --prompt ""` exits 2."""
    _refused_naming(["--address", _NOBODY, "generate", ""], "the prompt (PROMPT) is empty", capsys)


def test_client_refuses_integers_past_64_bits_naming_the_option(capsys: pytest.CaptureFixture) -> None:
    """Only --seed was range-checked: --top-k / --max-tokens past the wire's 64 bits exited 1
    with the SDK's "a number in top_k is out of range: can't serialize ints"."""
    for option, value in (("--top-k", "9" * 24), ("--max-tokens", str(2**64)), ("--top-k", str(-(2**63) - 1))):
        _refused_naming(["--address", _NOBODY, "generate", "Hi", option, value],
                        f"{option} must be an integer in [-2**63, 2**64)", capsys)


def test_client_refuses_a_port_no_server_can_listen_on(capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Port 99999 or 0 waited the whole --timeout, then said "no answer" (exit 1); the
    server's own rule for server.address refuses them."""
    _refused_naming(["--address", "tcp://127.0.0.1:99999", "health"],
                    "--address 'tcp://127.0.0.1:99999' must be tcp://HOST:PORT with a port in 1-65535", capsys)
    _refused_naming(["--address", "tcp://127.0.0.1:0", "generate", "Hi"], "--address 'tcp://127.0.0.1:0'", capsys)
    import inlaid.client.messages  # the default address is $INLAID_ADDRESS's, and the line names it

    monkeypatch.setattr(inlaid.client.messages, "DEFAULT_ADDRESS", "tcp://127.0.0.1:70000")
    _refused_naming(["health"], "$INLAID_ADDRESS 'tcp://127.0.0.1:70000' must be", capsys)


def test_client_refuses_arguments_that_are_not_utf8_naming_them(capsys: pytest.CaptureFixture) -> None:
    """A prompt of undecodable bytes said "'\\udcff' ... is a lone surrogate" (exit 1)."""
    bad = b"a\xff\xfeb".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    _refused_naming(["--address", _NOBODY, "generate", bad],
                    "the prompt (PROMPT) is not valid UTF-8 (byte 0xff at byte 1)", capsys)
    _refused_naming(["--address", _NOBODY, "generate", "Hi", "--stop", bad], "--stop is not valid UTF-8", capsys)
    _refused_naming(["--address", _NOBODY, "add-task", "t", f"/tmp/{bad}"], "ADAPTER_DIR is not valid UTF-8", capsys)


def test_a_home_that_cannot_be_found_or_a_huge_timeout_is_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """~user with no such user (pathlib's RuntimeError), a timeout past what a timer holds
    (OverflowError) and a non-ASCII digit were tracebacks (a config/CLI probe's findings)."""
    nobody = "~no-such-user-inlaid/x"
    empty_config = tmp_path / "empty.toml"  # every default
    empty_config.write_text("")
    cases = [
        (["serve", "--config", nobody], 2, f"config file {nobody}: Could not determine home directory"),
        (["generate", "--prompt", "Hi", "--model", nobody], 2, f"model directory {nobody}"),
        (["quantize", "--method", "rtn", "--out", nobody], 2, f"--out {nobody}"),
        (["client", "--timeout", "1e308", "health"], 2, "--timeout must be > 0 and <= 1000000 seconds"),
        # a digit to Python, not an ASCII one: the threads pre-scan's int() raised
        (["quantize", "--method", "rtn", "--threads", "\u00b2", "--out", str(tmp_path / "q")], 2, "--threads"),
        # logging's own "Unknown level" named no option; an empty one was ignored
        (["http", "--log-level", "LOUD"], 2, "--log-level must be one of"),
        (["serve", "--config", str(empty_config), "--log-level", ""], 2, "--log-level must be one of"),
    ]
    for argv, code, message in cases:
        try:
            assert main(argv) == code, argv
        except SystemExit as exit_:  # argparse's error(): its usage line, then the message
            assert exit_.code == code, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_quantize_add_refuses_an_output_that_would_overwrite_a_checkpoint(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from inlaid.quant.incremental_cli import output_dir_problem

    checkpoint = tmp_path / "ckpt"
    (checkpoint / "hessian_state").mkdir(parents=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for out, message in [(checkpoint, "overlaps"), (checkpoint / "hessian_state", "overlaps"), (tmp_path, "overlaps"),
                         (tmp_path / "full", "not an empty directory"), (tmp_path / "file", "not an empty directory")]:
        assert message in (output_dir_problem(out, checkpoint) or ""), out
    assert output_dir_problem(tmp_path / "empty", checkpoint) is None
    assert output_dir_problem(tmp_path / "new", checkpoint) is None
    # The command stops before reading anything: the checkpoint is not even looked at.
    assert main(["quantize-add", "--checkpoint", str(checkpoint), "--task", "t=adapter:calib.jsonl",
                 "--out", str(checkpoint)]) == 2
    assert "overlaps the checkpoint" in capsys.readouterr().err


def test_serve_refuses_scheduler_files_it_could_never_write_or_read(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A predictor state in a missing directory (the server served, every refit's save failed
    with a traceback and SIGTERM ended with exit 2 and a leaked ipc directory), a corrupt state
    file (numpy's allow_pickle advice, naming no file), a step log in a missing directory:
    one line naming the key and the file, exit 2, before any executor starts."""
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a npz at all")
    cases = [("predictor_state", tmp_path / "missing" / "pred.npz", "does not exist"),
             ("predictor_state", corrupt, "is not a length predictor state written by Inlaid"),
             ("step_log", tmp_path / "missing" / "steps.jsonl", "does not exist")]
    for key, path, message in cases:
        config = tmp_path / "server.toml"
        # A missing quantized_dir too: were the scheduler's file accepted, the start would
        # still stop (on that, later) instead of serving in this process.
        config.write_text(f'[model]\nquantized_dir = "{tmp_path / "nowhere"}"\n[server]\npolicy = "inlaid"\n'
                          f'[scheduler]\n{key} = "{path}"\n')
        assert main(["serve", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"scheduler.{key}" in err and str(path) in err and message in err, err
        assert "Traceback" not in err and "allow_pickle" not in err and len(err.strip().splitlines()) == 1, err


def test_threads_reach_openmp_and_mkl_before_torch_loads(monkeypatch):
    # An offline `quantize-add --threads 1` differed from the live server's re-quantization
    # (whose requantizer starts with OMP_NUM_THREADS=1) in 622 tensors of the default model;
    # with the environment set before torch loads, 0 (checked by hand: the run takes a minute).
    from inlaid.cli import _pin_math_threads

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "7")
    _pin_math_threads(["--checkpoint", "c", "--threads", "1"])
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    _pin_math_threads(["--threads=2", "--out", "o"])
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
    for ignored in (["--threads", "0"], ["--threads", "x"], ["--threads"], ["--thread", "5"]):
        _pin_math_threads(ignored)  # the subcommand's own parser refuses what is wrong
        assert os.environ["OMP_NUM_THREADS"] == "2"


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """argparse's refusal: exit 2 from the subcommand's parser, before its run() starts."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def test_counts_that_make_no_sense_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Each was a traceback (--max-tokens 0: IndexError in transformers; --threads -2:
    # set_num_threads' RuntimeError; --batch-size 0: ValueError) or silently another run
    # (--max-samples 0: the default 128; -3: 125; --limit -1: 127 examples; 0: n=0).
    quantize = ["quantize", "--task", "s=:calib.jsonl", "--out", str(tmp_path / "q")]
    add = ["quantize-add", "--checkpoint", str(tmp_path / "c"), "--task", "s=:calib.jsonl",
           "--out", str(tmp_path / "a")]
    evaluate = ["eval", "--task", "sentiment"]
    cases = [(quantize, option, value) for option in ("--max-samples", "--max-tokens", "--batch-tokens", "--threads",
                                                      "--mlgptq-rounds") for value in ("0", "-3", "x")]
    cases += [(quantize, "--mlgptq-step", value) for value in ("0", "-1", "nan")]
    cases += [(quantize, "--mlgptq-slack", value) for value in ("-1", "nan")]  # nan started the run
    cases += [(add, option, value) for option in ("--max-samples", "--threads") for value in ("0", "-2")]
    cases += [(evaluate, option, value) for option in ("--limit", "--batch-size") for value in ("0", "-1")]
    for command, option, value in cases:
        err = _usage_error([*command, option, value], capsys)
        assert f"argument {option}: must be a" in err and value in err, (option, value, err)
    err = _usage_error([*add, "--tolerance", "abc"], capsys)
    assert "argument --tolerance: must be a number >= 0 or 'none', got 'abc'" in err, err
    _usage_error([*add, "--tolerance", "-1"], capsys)
    from inlaid.quant.incremental_cli import tolerance_value

    assert tolerance_value("None") is None and tolerance_value("0") == 0.0 and tolerance_value("2.5") == 2.5
    from inlaid.quant.cli import _slack

    assert _slack("inf") == float("inf") and _slack("0.05") == 0.05  # inf: no bound (MlgptqOptions None)


def test_quantize_checks_its_paths_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from inlaid.quant.cli import quantize_out_problem

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # enough for the up-front check; nothing loads it
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    rtn = ["quantize", "--method", "rtn"]
    cases = [([*rtn, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "model directory not found"),
             ([*rtn, "--model", str(tmp_path / "foreign"), "--out", str(tmp_path / "o")], "has no config.json"),
             ([*rtn, "--model", str(model), "--out", str(tmp_path / "file")], "is a file, not a directory"),
             ([*rtn, "--model", str(model), "--out", str(tmp_path / "file" / "o")], "which is a file"),
             ([*rtn, "--model", str(model), "--out", str(tmp_path / "foreign")], "not an `inlaid quantize` checkpoint")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]  # nothing written into it
    # What a resume or a rerun writes into stays accepted: a partial run, its state, a checkpoint.
    for name in (".partial", "hessian_state", "inlaid_quant.json"):
        previous = tmp_path / f"previous-{name}"
        previous.mkdir()
        (previous / name).mkdir() if not name.endswith(".json") else (previous / name).write_text("{}")
        assert quantize_out_problem(previous) is None, name
    (tmp_path / "empty").mkdir()
    assert quantize_out_problem(tmp_path / "empty") is None and quantize_out_problem(tmp_path / "new" / "o") is None


def test_quantize_add_checks_drop_tasks_and_paths_before_the_model_loads(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "inlaid_quant.json").write_text(json.dumps({"method": "mlgptq", "spec": {},
                                                             "tasks": [{"name": "math"}, {"name": "qa"}]}))
    (tmp_path / "file").write_text("x")
    add = ["quantize-add", "--checkpoint", str(checkpoint), "--task", "s=:calib.jsonl"]
    cases = [([*add, "--out", str(tmp_path / "o"), "--drop-task", "qa", "--drop-task", "nope"],
              "--drop-task nope: not a task of"),
             ([*add, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nowhere")], "model directory not found"),
             ([*add, "--out", str(tmp_path / "file" / "o")], "which is a file")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_eval_checks_adapters_and_outputs_before_the_model_loads(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    cases = [(["--suite", "--adapters-dir", str(tmp_path / "nowhere")], "directory not found"),
             (["--task", "math", "--task", "qa", "--adapter", str(tmp_path)], "2 --task but 1 --adapter"),
             (["--suite", "--adapter", str(tmp_path)], "--adapter goes with --task"),
             (["--task", "math", "--out", str(tmp_path / "file" / "r.json")], "which is a file"),
             (["--task", "math", "--markdown", str(tmp_path / "file" / "t.md")], "which is a file"),
             (["--task", "math", "--out", str(tmp_path)], "is a directory"),
             (["--task", "math", "--model", str(tmp_path / "nowhere")], "model directory not found")]
    for extra, message in cases:
        assert main(["eval", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_eval_pairs_each_adapter_with_its_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    import inlaid.tasks.evaluate as evaluate

    seen: list = []

    def fake_evaluate_runs(model_dir: Path, runs: list, **options: object) -> dict:
        seen.extend(runs)  # what would be generated; the model is not needed to check the pairing
        return {"backend": "peft", "seconds": 0.0, "generated_tokens": 0, "tasks": {}}

    monkeypatch.setattr(evaluate, "evaluate_runs", fake_evaluate_runs)
    out = tmp_path / "new" / "r.json"
    assert main(["eval", "--task", "math", "--adapter", str(tmp_path / "m"), "--task", "qa",
                 "--adapter", str(tmp_path / "q"), "--with-base", "--out", str(out)]) == 0
    assert [(r.task, r.adapter_dir) for r in seen] == [("math", tmp_path / "m"), ("math", None),
                                                       ("qa", tmp_path / "q"), ("qa", None)]
    assert json.loads(out.read_text())["tasks"] == {}  # its missing parent was created

