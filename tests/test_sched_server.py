"""The scheduling policies in the real server: chosen in the config, fed by finished
requests, predictor state saved on shutdown, every step logged; the replay client."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path

import pytest

from inlaid.engine.tokenizer import Tokenizer
from inlaid.models.prepare import default_model_dir
from inlaid.scheduling.replay import Replay
from inlaid.scheduling.step_log import read_step_log
from inlaid.scheduling.suite import prompt_token_ids, suite_examples
from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest
from inlaid.serve.config import ConfigError, config_from_dict
from inlaid.serve.scheduler_config import load_policy
from inlaid.serve.launcher import ServerProcess

ADAPTERS = Path(__file__).parents[1] / "adapters"


def test_scheduler_table_is_validated_and_builds_the_named_policy(tmp_path):
    from inlaid.scheduling.srtf import InlaidPolicy

    config = config_from_dict({"server": {"policy": "inlaid"},
                               "scheduler": {"max_adapters_per_step": 2, "predictor_state": "state.npz"}},
                              base_dir=tmp_path)
    assert config.scheduler["predictor_state"] == str(tmp_path / "state.npz")  # resolved against the file
    policy = load_policy(config.policy, config.scheduler)
    assert isinstance(policy, InlaidPolicy) and policy.max_adapters_per_step == 2
    for bad, message in [({"max_adapters_per_step": -1}, "max_adapters_per_step"), ({"beta": 2}, "no option"),
                         ({"max_wait_s": "soon"}, "must be a number"), ({"predictor": "oracle"}, "predictor"),
                         ({"max_adapters_per_step": 2.0}, "must be an integer"),
                         # the per-task mean keeps no state: a state path was never written nor read
                         ({"predictor": "task-mean", "predictor_state": "state.npz"}, "task-mean' keeps no state")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"server": {"policy": "inlaid"}, "scheduler": bad})
    with pytest.raises(ConfigError, match="a plug-in policy takes no options but step_log"):
        config_from_dict({"server": {"policy": "inlaid.engine.scheduler:FifoPolicy"}, "scheduler": {"max_wait_s": 1.0}})
    assert config_from_dict({"server": {"policy": "mlfq"}, "scheduler": {"levels": 3}}).scheduler == {"levels": 3}


def test_scheduler_files_that_could_never_be_written_or_loaded_are_refused_up_front(tmp_path):
    """predictor_state and step_log: a missing or unwritable directory (every refit's save
    would fail, and the shutdown with it), a directory for a file, and a predictor state
    file Inlaid did not write are config errors naming the key and the file."""
    from inlaid.predictor import OnlineLengthPredictor

    (tmp_path / "file").write_text("x")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a npz at all")

    def config(key: str, path: Path, **server: object):  # type: ignore[no-untyped-def]
        return config_from_dict({"server": {"policy": "inlaid", **server}, "scheduler": {key: str(path)}},
                                base_dir=tmp_path)

    for key in ("predictor_state", "step_log"):
        for path, message in [(tmp_path / "missing" / "x", "missing does not exist"),
                              (tmp_path / "file" / "x", "file is not a directory"),
                              (tmp_path, "is a directory")]:
            with pytest.raises(ConfigError, match=f"scheduler.{key} {path}") as raised:
                config(key, path)
            assert message in str(raised.value)
        config(key, tmp_path / "new")  # a file to be created: fine
        # The server creates its state directory at start-up, before anything is saved there.
        config(key, tmp_path / "state" / "x", state_dir=str(tmp_path / "state"))
    with pytest.raises(ConfigError, match=f"scheduler.predictor_state: {corrupt} is not a length predictor state"):
        config("predictor_state", corrupt)
    with pytest.raises(ConfigError, match="delete or move it"):
        config("predictor_state", corrupt, state_dir=str(tmp_path))
    # The task-mean predictor keeps no state: a state path beside it is refused as such (not
    # read: the refusal says why, whatever the file holds).
    with pytest.raises(ConfigError, match="task-mean' keeps no state"):
        config_from_dict({"server": {"policy": "inlaid"},
                          "scheduler": {"predictor": "task-mean", "predictor_state": str(corrupt)}})
    saved = tmp_path / "saved.npz"
    OnlineLengthPredictor(refit_every=0).save(saved)
    assert config("predictor_state", saved).scheduler["predictor_state"] == str(saved)
    # A directory the server cannot write to (os.access: root may write anywhere, so faked).
    from unittest import mock

    real_access = os.access
    with mock.patch("os.access", lambda path, mode: str(path) != str(tmp_path) and real_access(path, mode)):
        with pytest.raises(ConfigError, match=f"its directory {tmp_path} is not writable"):
            config("step_log", tmp_path / "steps.jsonl")


def test_a_policy_that_fails_to_close_leaves_no_ipc_directory_behind(tmp_path, monkeypatch):
    """SIGTERM: a policy whose close raises (a plug-in's bug) is logged with its traceback,
    the exit code says so (1), and the shutdown's cleanup still runs: the executor's ipc
    directory (server.executor_address = "auto") is removed."""
    import tempfile

    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "closing_policy.py").write_text(
        "from inlaid.engine.scheduler import FifoPolicy\n\n\n"
        "class ClosingPolicy(FifoPolicy):\n"
        "    def close(self) -> None:\n"
        "        raise RuntimeError('close failed on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")])))
    # A short TMPDIR of its own: the ipc socket path must stay under ~100 bytes.
    temporary = Path(tempfile.mkdtemp(prefix="ipc-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(temporary))
    try:
        config = {"executor": {"num_kv_blocks": 64}, "server": {"policy": "closing_policy:ClosingPolicy"}}
        with ServerProcess(config, tmp_path) as server:
            server.wait_ready()
            with server.client(timeout_s=60) as client:
                assert client.generate("Hi", max_tokens=2).text is not None
            assert list(temporary.glob("inlaid-*")), "the executor's ipc directory"
            exit_code = server.terminate()
        logs = server.logs()
        assert not list(temporary.glob("inlaid-*")), logs[-3000:]  # the cleanup ran
        assert exit_code == 1 and "coordinator stopped" in logs, logs[-3000:]
        assert "a scheduling policy failed to close" in logs and "close failed on purpose" in logs, logs[-3000:]
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def test_inlaid_policy_serves_a_replayed_trace_learns_and_saves_its_state(tmp_path):
    from inlaid.predictor import OnlineLengthPredictor

    rng = random.Random(0)
    tasks = ["math", "sentiment", "qa"]
    requests = [TraceRequest(0.05 * i, tasks[i % 3] if i % 4 else None, 12 + i, 0, 6, f"r{i}") for i in range(10)]
    trace = Trace(requests, {t: TaskProfile(t, t, 16) for t in tasks})
    prompts = {r.source: [rng.randrange(100, 40000) for _ in range(r.prompt_tokens)] for r in requests}
    # The sentiment requests ask real questions: their answers (a label) end before 6 tokens.
    tokenizer = Tokenizer(default_model_dir())
    examples = [example for _, _, example in suite_examples(["sentiment"], ["eval"])]
    for index, request in enumerate(r for r in requests if r.task == "sentiment"):
        prompts[request.source] = prompt_token_ids(tokenizer, examples[index])
    state, steps = tmp_path / "predictor.npz", tmp_path / "steps.jsonl"
    config = {
        "executor": {"max_num_seqs": 4, "num_kv_blocks": 256, "max_lora_slots": 2},
        "server": {"policy": "inlaid"},
        "tasks": {t: str(ADAPTERS / t) for t in tasks},
        "scheduler": {"max_adapters_per_step": 1, "max_wait_s": 5.0, "predictor_state": str(state),
                      "predictor_refit_every": 4, "step_log": str(steps)},
    }
    with ServerProcess(config, tmp_path) as server:
        server.wait_ready()
        records = asyncio.run(Replay(server.address, trace, prompts, timeout_s=300).run())
        # ignore_eos: every request runs to its max_tokens (the GPU suite's random-weight model)
        to_the_end = asyncio.run(Replay(server.address, trace, prompts, timeout_s=300, ignore_eos=True).run())
        assert server.terminate() == 0
    assert any(len(r.token_times) < 6 for r in records if r.task == "sentiment")  # answers end by themselves ...
    assert [len(r.token_times) for r in to_the_end] == [6] * len(requests)  # ... not when told to ignore EOS
    assert all(r.finished for r in records), [r.error for r in records]
    assert all(1 <= len(r.token_times) <= 6 and r.admitted_s is not None for r in records)
    assert all(r.token_times == sorted(r.token_times) and r.arrival_s <= r.token_times[0] for r in records)
    saved = OnlineLengthPredictor.load(state)
    assert saved.size == 2 * len(records)  # every finished request reached the predictor
    assert saved.model.fitted
    logged = read_step_log(steps)
    assert logged and all(s["compute_s"] > 0 for s in logged)
    assert max(len({c[2] for c in s["chunks"] if c[2] is not None}) for s in logged) == 1  # β = 1 held
    assert sum(sum(1 for c in s["chunks"] if c[3]) for s in logged) == sum(len(r.token_times)
                                                                         for r in records + to_the_end)


def test_a_cuda_server_starts_the_inlaid_policy_from_the_gpu_defaults(tmp_path):
    """On a CUDA device the inlaid policy starts with no adapter or row bound per step and
    first tokens at once (a GPU step costs about the same whatever it holds); options set
    in [scheduler] stay; a CPU server and the other policies keep their own defaults."""
    from inlaid.scheduling.srtf import InlaidOptions

    from inlaid.serve.cli import _policies

    def started(device: str, policy: str = "inlaid", scheduler: dict | None = None) -> dict:
        config = config_from_dict({"server": {"policy": policy}, "executor": {"device": device},
                                   "scheduler": scheduler or {}}, base_dir=tmp_path)
        return config.policy_options()

    gpu_config = config_from_dict({"server": {"policy": "inlaid"}, "executor": {"device": "cuda"}}, base_dir=tmp_path)
    gpu = _policies(gpu_config)().options  # the policy a server's executors start with
    assert (gpu.max_adapters_per_step, gpu.batch_rows_target, gpu.first_token_after_s, gpu.prefill_weight) == (
        0, 0, 0.0, 0.0)
    pool = config_from_dict({"server": {"policy": "inlaid"},
                             "executors": {"count": 2, "devices": ["cuda:0", "cuda:1"]}}, base_dir=tmp_path)
    assert _policies(pool)().options.max_adapters_per_step == 0  # [executor] device left at "cpu"
    assert load_policy("inlaid", started("cuda:1")).options.max_adapters_per_step == 0
    explicit = load_policy("inlaid", started("cuda", scheduler={"max_adapters_per_step": 4})).options
    assert explicit.max_adapters_per_step == 4 and explicit.batch_rows_target == 0
    cpu = load_policy("inlaid", started("cpu")).options
    assert cpu == InlaidOptions()
    assert started("cuda", policy="mlfq", scheduler={"levels": 3}) == {"levels": 3}
