"""`inlaid eval` and `inlaid train-adapter` on an outside probe's inputs: an adapter the
engine cannot serve, an output path that only a real write finds unwritable, a checkpoint of
a run with other settings, a rank the default serving config refuses. Each case runs the
installed command in a subprocess, as a user would; a refusal is one line `inlaid <command>:
...` naming the problem, a non-zero exit and no traceback, before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

INLAID = str(Path(sys.executable).parent / "inlaid")
ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
TINY_TRAIN = ["--task", "sentiment", "--split", "calib", "--steps", "1", "--batch-size", "1",
              "--max-length", "64", "--threads", "1"]


def _run(command: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1")
    return subprocess.run([INLAID, command, *args], capture_output=True, text=True, timeout=600, env=env)


def _refused(done: subprocess.CompletedProcess, command: str, *named: str, code: int = 2) -> str:
    err = done.stderr.strip()
    assert done.returncode == code, (done.returncode, err)
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"inlaid {command}: "), err
    for word in named:
        assert word in last, (word, err)
    return last


# ---------------------------------------------------------------------- eval: adapters

def _broken_math_adapter(tmp_path: Path, kind: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / f"ad_{kind}"
    shutil.copytree(ADAPTERS / "math", out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    config = json.loads((out / "adapter_config.json").read_text())
    if kind == "otherbase":  # every hidden-size (576) dimension made 1024: another base's adapter
        tensors = {k: torch.zeros([1024 if d == 576 else d for d in v.shape], dtype=v.dtype)
                   for k, v in tensors.items()}
    elif kind == "rank":  # config r=16 over rank-8 tensors
        tensors = {k: (v[:8] if ".lora_A." in k else v[:, :8]).contiguous() for k, v in tensors.items()}
        assert config["r"] == 16
    elif kind == "nan":
        name = next(k for k in tensors if ".lora_B." in k)
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("kind, named", [
    ("otherbase", ["another base model", "576"]),   # was accuracy=0.00 tokens=0, exit 0
    ("rank", ["r=16", "rank mismatch"]),
    ("nan", ["NaN"]),
])
def test_eval_refuses_an_adapter_the_engine_cannot_serve(model_dir: Path, tmp_path: Path, kind: str,
                                                         named: list[str]) -> None:
    adapter = _broken_math_adapter(tmp_path, kind)
    out = tmp_path / "results.json"
    done = _run("eval", ["--task", "math", "--model", str(model_dir), "--adapter", str(adapter), "--limit", "1",
                         "--out", str(out)], tmp_path)
    _refused(done, "eval", f"adapter '{adapter.name}'", *named)
    assert "accuracy" not in done.stdout  # no score recorded, none printed
    assert not out.exists()


@pytest.mark.parametrize("option", ["--out", "--markdown"])
def test_eval_checks_an_unwritable_output_before_the_model_loads(model_dir: Path, tmp_path: Path,
                                                                 option: str) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    # As root os.access says /proc is writable: the run used to end in FileNotFoundError.
    done = _run("eval", ["--task", "sentiment", "--model", str(model_dir), "--limit", "1",
                         option, "/proc/x.json"], tmp_path)
    _refused(done, "eval", option, "/proc/x.json", "cannot be written")
    assert "tokens=" not in done.stdout  # nothing was evaluated


def test_eval_scores_a_good_adapter_in_percent(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "results.json"
    done = _run("eval", ["--task", "sentiment", "--model", str(model_dir), "--adapter", str(ADAPTERS / "sentiment"),
                         "--limit", "1", "--out", str(out), "--dtype", "float32"], tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("sentiment"))
    assert "accuracy=" in line and line.rstrip().split("accuracy=")[1].split(",")[0].endswith("%"), line
    entry = json.loads(out.read_text())["tasks"]["sentiment"]["sentiment"]
    assert entry["examples"] == 1 and entry["predictions"][0]["tokens"] > 0


# ---------------------------------------------------------------------- train-adapter

def test_train_adapter_refuses_to_resume_a_run_with_other_settings(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    base = [*TINY_TRAIN, "--model", str(model_dir), "--out", str(out)]
    first = _run("train-adapter", [*base, "--rank", "1"], tmp_path)
    assert first.returncode == 0, first.stderr
    # The same run with --rank 2 used to print "resuming sentiment from step 1" and exit 0,
    # leaving an r=1 adapter beside a training.json that said rank 2.
    other = _run("train-adapter", [*base, "--rank", "2"], tmp_path)
    _refused(other, "train-adapter", "--out", "rank 1 there, 2 here", "--restart")
    assert "resuming" not in other.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    assert json.loads((out / "training.json").read_text())["rank"] == 1

    restarted = _run("train-adapter", [*base, "--rank", "2", "--restart"], tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((out / "training.json").read_text())["rank"] == 2

    # Same settings, more steps: the run continues from its checkpoint.
    more = _run("train-adapter", [*base, "--rank", "2", "--steps", "2"], tmp_path)
    assert more.returncode == 0, more.stderr
    assert "resuming sentiment from step 1" in more.stderr
    assert json.loads((out / "training.json").read_text())["steps"] == 2


def test_train_adapter_refuses_an_old_checkpoint_of_another_rank(model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint written before settings were recorded: its adapter_config.json decides."""
    checkpoint = tmp_path / "adapter" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 1, "losses": [1.0]}))
    (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8.0}))
    done = _run("train-adapter", [*TINY_TRAIN, "--model", str(model_dir), "--out", str(tmp_path / "adapter"),
                                  "--rank", "2"], tmp_path)
    _refused(done, "train-adapter", "rank 4 there, 2 here", "--restart")


def test_train_adapter_warns_about_a_rank_above_the_serving_default(model_dir: Path, tmp_path: Path) -> None:
    # A settings conflict stops the run right after the warning, so nothing trains here.
    checkpoint = tmp_path / "adapter" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 1, "losses": [1.0], "settings": {"rank": 1}}))
    done = _run("train-adapter", [*TINY_TRAIN, "--model", str(model_dir), "--out", str(tmp_path / "adapter"),
                                  "--rank", "1000"], tmp_path)
    assert done.returncode == 2, done.stderr
    warning = next(x for x in done.stderr.splitlines() if "warning:" in x)
    for word in ("--rank 1000", "max_lora_rank 64", "[executor]", "max_lora_rank = 1000"):
        assert word in warning, (word, warning)


def test_train_adapter_refuses_a_rank_no_engine_serves(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    done = _run("train-adapter", [*TINY_TRAIN, "--out", str(out), "--rank", "5000"], tmp_path)
    _refused(done, "train-adapter", "--rank 5000", "4096")
    assert not out.exists()


def test_train_adapter_checks_an_unwritable_out_before_loading(tmp_path: Path) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    done = _run("train-adapter", [*TINY_TRAIN, "--out", "/proc/inlaid-adapter"], tmp_path)
    _refused(done, "train-adapter", "--out", "/proc/inlaid-adapter", "cannot be written")


# ---------------------------------------------------------------------- tasks report
def test_tasks_report_checks_its_inputs_and_outputs_before_writing(tmp_path: Path) -> None:
    """A missing, broken or foreign --results file was a traceback; an unwritable --markdown
    failed after MANIFEST.json had been rewritten."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"model": "m", "split": "eval", "tasks": {}}))
    (tmp_path / "foreign.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{oops")
    cases = [(["--results", str(tmp_path / "missing.json")], "missing.json"),
             (["--results", str(tmp_path / "broken.json")], "is not JSON"),
             (["--results", str(tmp_path / "foreign.json")], "is not a results file"),
             (["--results", str(good), "--markdown", "/proc/table.md"], "--markdown"),
             (["--adapters-dir", str(tmp_path / "none")], "is not a directory")]
    for args, named in cases:
        done = _run("tasks", ["report", "--adapters-dir", str(adapters), *args], tmp_path)
        _refused(done, "tasks report", named)
        assert not (adapters / "MANIFEST.json").exists()
    done = _run("tasks", ["report", "--adapters-dir", str(adapters)], tmp_path)
    assert done.returncode == 0 and json.loads((adapters / "MANIFEST.json").read_text()) is not None, done.stderr
