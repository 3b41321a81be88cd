"""The scheduling policies in the real server: chosen in the config, fed by finished
requests, predictor state saved on shutdown, every step logged; the replay client."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from inlaid.engine.tokenizer import Tokenizer
from inlaid.models.prepare import default_model_dir
from inlaid.scheduling.replay import replay_trace
from inlaid.scheduling.step_log import read_step_log
from inlaid.scheduling.suite import prompt_token_ids, suite_examples
from inlaid.scheduling.traces import TaskProfile, Trace, TraceRequest
from inlaid.serve.config import ConfigError, config_from_dict, load_policy
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
                         ({"max_wait_s": "soon"}, "must be a float"), ({"predictor": "oracle"}, "predictor")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"server": {"policy": "inlaid"}, "scheduler": bad})
    with pytest.raises(ConfigError, match="built-in policies only"):
        config_from_dict({"server": {"policy": "inlaid.engine.scheduler:FifoPolicy"}, "scheduler": {"max_wait_s": 1.0}})
    assert config_from_dict({"server": {"policy": "mlfq"}, "scheduler": {"levels": 3}}).scheduler == {"levels": 3}


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
        records = asyncio.run(replay_trace(server.address, trace, prompts, timeout_s=300))
        # ignore_eos: every request runs to its max_tokens (the GPU suite's random-weight model)
        to_the_end = asyncio.run(replay_trace(server.address, trace, prompts, timeout_s=300, ignore_eos=True))
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
