"""`inlaid generate` and `inlaid train-adapter` on bad inputs (an outside probe's cases): one
line `inlaid <command>: ...` naming the option, field or batch line, exit code 2, no traceback,
and refused before any model loads. Each case runs the installed command in a subprocess, as
a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

INLAID = str(Path(sys.executable).parent / "inlaid")
ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _refused(command: str, args: list[str], *named: str) -> None:
    """Run `inlaid command args`, check it is refused as the house rule says."""
    done = subprocess.run([INLAID, command, *args], capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err)
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"inlaid {command}: "), err
    for word in named:
        assert word in last, (word, err)


# -------------------------------------------------------------------- inlaid generate

@pytest.mark.parametrize("line, named", [
    ("[1, 2]", ["expected a JSON object"]),                     # was TypeError: not a mapping
    ('{"prompt": "hi", "max_tokens": "5"}', ["max_tokens"]),    # was "'<' not supported ..."
    ('{"prompt": "hi", "temperature": null}', ["temperature"]),
    ('{"prompt": "hi", "stop": 5}', ["stop"]),                  # was "'int' object is not iterable"
    ('{"prmpt": "hi"}', ["unknown field", "prmpt"]),            # was "give exactly one of ..."
    ('{"messages": [{"role": "user"}]}', ["messages", "content"]),
    ('{"messages": [{"role": "tool", "content": "x"}]}', ["messages[0].role", "'tool'", "not supported"]),
    ("not json", ["not JSON"]),                                 # was rc 1, no prefix
])
def test_generate_names_the_bad_batch_line_and_field(model_dir: Path, tmp_path: Path, line: str,
                                                      named: list[str]) -> None:
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"prompt": "fine", "max_tokens": 1}\n' + line + "\n")
    _refused("generate", ["--model", str(model_dir), "--batch", str(batch)], f"{batch}:2", *named)


@pytest.mark.parametrize("adapters, named", [
    (["c=ADAPTERS/code", "c=ADAPTERS/math"], ["'c'", "twice"]),  # the last one silently won
    (["=ADAPTERS/code"], ["task name ''"]),                      # names the server refuses
    (["a b=ADAPTERS/code"], ["task name 'a b'"]),
    (["code"], ["--adapter expects NAME=DIR", "'code'"]),        # was rc 1, no prefix
    (["c=ADAPTERS/missing"], ["directory not found"]),
])
def test_generate_checks_adapter_options(model_dir: Path, adapters: list[str], named: list[str]) -> None:
    args = ["--model", str(model_dir), "--prompt", "Hi", "--max-tokens", "1"]
    for item in adapters:
        args += ["--adapter", item.replace("ADAPTERS", str(ADAPTERS))]
    _refused("generate", args, "--adapter", *named)


def test_generate_reads_a_batch_from_standard_input(model_dir: Path, monkeypatch, capsys) -> None:
    """`--batch -` read a file named '-' (an outside probe)."""
    import io

    from inlaid.cli import main

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "Hi", "max_tokens": 2}\n')))
    assert main(["generate", "--model", str(model_dir), "--batch", "-", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["finish_reason"] in ("length", "stop")


def test_generate_refuses_other_inputs_up_front(model_dir: Path, tmp_path: Path) -> None:
    # Nothing to do: was rc 1 without the prefix.
    _refused("generate", ["--model", str(model_dir)], "nothing to generate")
    # An adapter directory as --quantized: was "unexpected tensor '...lora_A.weight'" after loading.
    _refused("generate", ["--model", str(model_dir), "--quantized", str(ADAPTERS / "code"), "--prompt", "Hi"],
             "--quantized", "not a checkpoint")
    _refused("generate", ["--model", str(tmp_path / "nonexist"), "--prompt", "Hi"], "model directory not found")
    # A request for an adapter no --adapter registers is known before the model loads.
    _refused("generate", ["--model", str(model_dir), "--prompt", "Hi", "--use", "nope"], "unknown adapter 'nope'")


# -------------------------------------------------------------------- inlaid train-adapter

@pytest.mark.parametrize("args, named", [
    (["--alpha", "-1"], ["--alpha"]),          # wrote lora_alpha -1.0
    (["--threads", "0"], ["--threads"]),       # taken silently
    (["--save-every", "-1"], ["--save-every"]),
    (["--rank", "0"], ["--rank"]),             # was rc 1, no prefix
    (["--steps", "0"], ["--steps"]),
    (["--batch-size", "x"], ["--batch-size"]),
    (["--model", "/nonexist/model"], ["model directory not found"]),  # was "Repo id must use ..."
])
def test_train_adapter_refuses_bad_options_before_loading(tmp_path: Path, args: list[str],
                                                          named: list[str]) -> None:
    out = tmp_path / "out"
    _refused("train-adapter", ["--task", "sentiment", "--steps", "1", "--out", str(out), *args], *named)
    assert not out.exists()  # refused before anything was written (or loaded)


def test_train_adapter_checks_out_before_training(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    # A file as --out trained for a minute, then died with NotADirectoryError.
    for out, named in [(afile, "is a file"), (afile / "sub", "which is a file")]:
        _refused("train-adapter", ["--task", "sentiment", "--steps", "1", "--out", str(out)], "--out", named)
        assert afile.read_text() == ""
