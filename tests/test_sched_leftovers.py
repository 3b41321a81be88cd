"""Scheduling leftovers as a user of `inlaid serve` meets them: a plug-in policy that cannot
be made is a one-line config error before anything starts; the log names the policy in
force and the predictor state it loads and saves; absurd option values are refused, naming
the option, the value and the allowed range."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inlaid.scheduling.registry import make_policy, parse_options
from inlaid.serve.config import ConfigError, config_from_dict

PLUGINS = '''
import sys
from inlaid.engine.scheduler import SchedulingPolicy

class Refusing(SchedulingPolicy):
    def __init__(self):
        raise ValueError("no GPU found")

def not_a_policy():
    return object()
'''


def _serve_refused(tmp_path: Path, policy: str) -> str:
    """`inlaid serve` with server.policy = `policy`: the one stderr line it refuses with."""
    (tmp_path / "leftover_plugins.py").write_text(PLUGINS)
    (tmp_path / "leftover_exits.py").write_text("import sys\nsys.exit(0)\n")  # a script's guard, run on import
    (tmp_path / "leftover_broken.py").write_text("import numpy\nraise ImportError('needs libfoo.so')\n")
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\naddress = "tcp://127.0.0.1:20650"\npolicy = "{policy}"\n')
    done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, err)
    assert len(err.splitlines()) == 1 and err.startswith("inlaid serve: server.policy "), err
    return err


@pytest.mark.parametrize("policy, words", [
    ("leftover_missing:factory", "cannot import it: ModuleNotFoundError"),
    ("leftover_broken:factory", "cannot import it: ImportError: needs libfoo.so"),
    ("leftover_exits:factory", "cannot import it: SystemExit"),
    ("leftover_plugins:Refusing", "Refusing() (called with no arguments) raised ValueError: no GPU found"),
    ("leftover_plugins:not_a_policy", "did not give a SchedulingPolicy"),
])
def test_serve_refuses_a_plugin_policy_it_cannot_make_in_one_config_line(tmp_path: Path, policy: str,
                                                                       words: str) -> None:
    # Before: a CRITICAL JSON log line ("cannot start") after the CUDA probe, and a module
    # that exits on import ended the server with exit 0 and no word at all.
    assert words in _serve_refused(tmp_path, policy)


def _said(records: list[logging.LogRecord], message: str) -> list[logging.LogRecord]:
    return [record for record in records if record.getMessage() == message and record.levelno == logging.INFO]


def test_the_start_log_names_the_policy_and_every_option_in_force(tmp_path: Path,
                                                                  server_log: list[logging.LogRecord]) -> None:
    from inlaid.serve.cli import _policies

    config = config_from_dict({"server": {"policy": "inlaid"}, "executors": {"count": 2},
                               "scheduler": {"max_wait_s": 40, "step_log": "steps.jsonl"}}, base_dir=tmp_path)
    factory = _policies(config)
    factory(), factory()  # one policy an executor
    said = _said(server_log, "scheduling policy")
    assert len(said) == 1, "one line a server, not one an executor"
    line = said[0].__dict__
    assert line["policy"] == "inlaid" and line["class"] == "inlaid.scheduling.srtf.InlaidPolicy"
    # Every option, the defaults filled in: what really schedules, not just what the file set.
    assert line["options"]["max_wait_s"] == 40.0 and line["options"]["batch_rows_target"] == 16
    assert line["step_log"] == str(tmp_path / "steps.jsonl")
    fifo = config_from_dict({"server": {}}, base_dir=tmp_path)
    _policies(fifo)
    assert _said(server_log, "scheduling policy")[-1].__dict__["policy"] == "fifo"


def test_the_predictor_state_is_logged_where_it_is_loaded_from_and_saved_to(
        tmp_path: Path, server_log: list[logging.LogRecord]) -> None:
    state = tmp_path / "predictor.npz"
    fresh = make_policy("inlaid", {"predictor_state": str(state)})
    assert _said(server_log, "length predictor starts untrained; its state will be saved")[0].__dict__["path"] == \
        str(state)
    for index in range(5):
        fresh.length_model.observe("task-a", [1, 2, 3, index], 10 + index)
    # Two executors share one model (inlaid serve's _policies); each closes it, one line says so.
    other = make_policy("inlaid", {"predictor_state": str(state)}, length_model=fresh.length_model)
    fresh.close()
    other.close()
    saved = _said(server_log, "length predictor state saved")
    assert [(r.__dict__["path"], r.__dict__["records"]) for r in saved] == [(str(state), 5)]
    assert state.is_file()
    restarted = make_policy("inlaid", {"predictor_state": str(state)})
    loaded = _said(server_log, "length predictor state loaded")
    assert [(r.__dict__["path"], r.__dict__["records"]) for r in loaded] == [(str(state), 5)]
    # The policies a start-up tuning replaces before any request learnt nothing: no "saved"
    # line at start (the docs put it at shutdown).
    make_policy("inlaid", {"predictor_state": str(state)}).close()
    assert len(_said(server_log, "length predictor state saved")) == 1
    # A save that fails is the predictor's warning, never "saved".
    state.unlink()
    state.mkdir()  # the rename over it fails, as a removed directory or a full disk would
    restarted.length_model.observe("task-a", [9], 3)
    restarted.close()
    assert len(_said(server_log, "length predictor state saved")) == 1


@pytest.mark.parametrize("policy, option, value, allowed", [
    ("inlaid", "batch_rows_target", 10**12, "<= 65536"),
    ("inlaid", "max_adapters_per_step", 10**9, "<= 1024"),
    ("inlaid", "prefill_weight", 1e300, "<= 100"),
    ("inlaid", "aging_tokens_per_s", 1e300, "<= 1000000"),
    ("inlaid", "batch_bonus_tokens", -1.0, ">= 0"),
    ("inlaid", "resident_bonus_tokens", 1e300, "<= 1000000"),
    ("inlaid", "fairness_bound", 1e300, "<= 1000000000000000"),
    ("inlaid", "predictor_refit_every", 10**12, "<= 1000000"),
    ("inlaid", "max_prefill_tokens_per_step", 10**12, "<= 16777216"),
    ("inlaid", "max_wait_s", 0.0, "> 0"),
    ("vtc", "input_weight", 1e300, "<= 1000000"),
    ("mlfq", "prefill_weight", 1e300, "<= 100"),
])
def test_absurd_option_values_are_refused_naming_option_value_and_range(
        tmp_path: Path, policy: str, option: str, value: float, allowed: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"server": {"policy": policy}, "scheduler": {option: value}}, base_dir=tmp_path)
    message = str(refused.value)
    assert message.startswith(f"[scheduler]: {option} must be ") and allowed in message, message
    assert f"got {value!r}" in message, message


def test_every_tuning_candidate_and_default_fits_the_bounds() -> None:
    from inlaid.scheduling.autotune import CANDIDATES, resolved_options
    from inlaid.scheduling.cost_model import StepCostModel
    from inlaid.scheduling.simulator import EngineShape
    from inlaid.scheduling.srtf import CUDA_DEFAULTS

    root = Path(__file__).resolve().parent.parent / "bench" / "results"
    for name in ("sched_cost_model.json", "sched_cost_model_h200.json"):
        cost = StepCostModel.load(str(root / name))
        for options in CANDIDATES.values():
            parse_options("inlaid", resolved_options(options, cost, EngineShape()))
    parse_options("inlaid", CUDA_DEFAULTS)
    for policy in ("fifo", "inlaid", "mlfq", "vtc"):
        parse_options(policy, {})


def test_a_plugin_policy_whose_options_hold_a_lock_is_described_not_refused(
        tmp_path: Path, server_log: list[logging.LogRecord]) -> None:
    """The start log's options were dataclasses.asdict's deep copy: a plug-in whose options
    hold a lock (or a model) made `inlaid serve` fail with TypeError on that log line."""
    import threading

    from inlaid.serve.scheduler_config import load_policy

    (tmp_path / "locked_policy.py").write_text(
        "import dataclasses, threading\n"
        "from inlaid.engine.scheduler import SchedulingPolicy\n"
        "@dataclasses.dataclass\n"
        "class Options:\n"
        "    quantum: int = 4\n"
        "    guard: object = dataclasses.field(default_factory=threading.Lock)\n"
        "class Locked(SchedulingPolicy):\n"
        "    name = 'locked'\n"
        "    def __init__(self):\n"
        "        self.options = Options()\n"
        "def make():\n"
        "    return Locked()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        policy = load_policy("locked_policy:make")
    finally:
        sys.path.remove(str(tmp_path))
    assert isinstance(policy.options.guard, type(threading.Lock()))
    line = _said(server_log, "scheduling policy")[-1].__dict__
    assert line["policy"] == "locked" and line["options"]["quantum"] == 4
    assert line["options"]["guard"].startswith("<unlocked _thread.lock")
