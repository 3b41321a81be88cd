"""A scheduling policy that fails every plan, or leaves sequences out of its order, held the
queued requests unanswered for ever while health said ok (an outside probe with plug-in
policies: an `order()` that raises, one that returns []). The scheduler now refuses an order
that is not a permutation of its work, and the step loop fails the queued requests once
planning has failed PLANNING_FAILURES_BEFORE_FAILING_QUEUE times in a row."""

from __future__ import annotations

import asyncio

import pytest

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import PolicyError, Scheduler, SchedulerLimits, SchedulingPolicy
from inlaid.engine.sequence import Sequence
from inlaid.protocol import ErrorCode, SamplingParams
from inlaid.serve import step_loop
from inlaid.serve.step_loop import StepLoop


class _Dropping(SchedulingPolicy):
    name = "dropping"

    def order(self, running, waiting, now):  # type: ignore[no-untyped-def]
        return list(running)  # the waiting ones left out


def test_an_order_that_leaves_work_out_is_refused() -> None:
    scheduler = Scheduler(SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          BlockManager(16, 4), AdapterSlots(2), eos_token_ids=(0,), policy=_Dropping())
    scheduler.add(Sequence(seq_id=1, prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=2)))
    with pytest.raises(PolicyError, match="order\\(\\) must return every running and waiting sequence once"):
        scheduler.schedule()


class _Engine:
    def has_unfinished(self) -> bool:
        return True

    def begin_step(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("the policy broke")


class _Supervisor:
    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()


def test_the_queue_is_failed_once_planning_keeps_failing(monkeypatch) -> None:
    monkeypatch.setattr(step_loop, "FAULT_PAUSE_S", 0.001)
    failed: list[tuple[str, str, str]] = []

    async def scenario() -> None:
        loop = StepLoop(_Engine(), _Supervisor(), on_plan=lambda plan: None,  # type: ignore[arg-type]
                        deliver=lambda *args: None, counters={},
                        fail_running=lambda message, code: failed.append(("running", message, code)),
                        fail_waiting=lambda message, code: failed.append(("waiting", message, code)))
        task = asyncio.ensure_future(loop.run())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if any(kind == "waiting" for kind, _, _ in failed):
                break
        task.cancel()

    asyncio.run(scenario())
    kinds = [kind for kind, _, _ in failed]
    first_waiting = kinds.index("waiting")
    assert kinds[:first_waiting] == ["running"] * (step_loop.PLANNING_FAILURES_BEFORE_FAILING_QUEUE - 1)
    assert failed[first_waiting][2] == ErrorCode.INTERNAL and "cannot plan" in failed[first_waiting][1]


def test_a_plugin_policy_takes_step_log_and_names_any_other_option(tmp_path, monkeypatch) -> None:
    """scheduling.md: step_log is for "any policy"; a plug-in's was refused with "[scheduler]
    options apply to the built-in policies only", naming no key (an outside probe)."""
    from inlaid.scheduling.step_log import StepLogPolicy
    from inlaid.serve.config import ConfigError, config_from_dict
    from inlaid.serve.scheduler_config import load_policy

    (tmp_path / "plug_policy.py").write_text("from inlaid.engine.scheduler import SchedulingPolicy\n"
                                              "def good():\n    return SchedulingPolicy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"model": {"dir": str(tmp_path)}, "server": {"address": "ipc:///tmp/inlaid-check.ipc",
                                                       "policy": "plug_policy:good"}}
    config = config_from_dict({**raw, "scheduler": {"step_log": "steps.jsonl"}}, base_dir=tmp_path)
    policy = load_policy(config.policy, config.scheduler, announce=False)
    assert isinstance(policy, StepLogPolicy) and policy.path == tmp_path / "steps.jsonl"
    with pytest.raises(ConfigError, match=r"^\[scheduler\] max_wait_s: a plug-in policy takes no options but step_log"):
        config_from_dict({**raw, "scheduler": {"step_log": "steps.jsonl", "max_wait_s": 5}}, base_dir=tmp_path)
    # The tuning's keys were taken out of [scheduler] before that check: accepted, then tuned for nothing
    for key in ("autotune_cost_model", "autotune_lengths"):
        with pytest.raises(ConfigError, match=f"scheduler.{key} tunes the inlaid policy; server.policy is the plug-in"):
            config_from_dict({**raw, "scheduler": {key: "/nonexistent.json"}}, base_dir=tmp_path)
