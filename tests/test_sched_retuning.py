"""Live re-tuning of the inlaid policy (inlaid/serve/retuning.py): tasks added and removed
through the coordinator tune the policies again, in place, once the task count moves 2x."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from inlaid.scheduling import autotune
from inlaid.serve.config import config_from_dict
from test_sched_autotune import COST_MODEL, SMALL


def test_live_task_changes_retune_every_policy_in_place(model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Tasks added and removed through the coordinator's live path: once the count moves 2x
    from the count last tuned for, the real tuning runs again for the new count (one at a
    time; changes during it are looked at when it ends) and every executor's policy takes
    its options in place (the length model kept); smaller moves tune nothing; a failed
    tuning keeps the options in force; stopping ends a tuning in progress."""
    import asyncio

    from inlaid.serve.cli import _policies, tuned_options_for
    from inlaid.serve.coordinator import Coordinator
    from inlaid.serve.dynamic_tasks import TaskInputs

    monkeypatch.setattr(autotune, "CANDIDATES", SMALL)
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    (tmp_path / "cost.json").write_text(COST_MODEL.read_text())
    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": {"policy": "inlaid", "state_dir": "state"},
                               "executors": {"count": 2}, "executor": {"max_lora_slots": 4},
                               "scheduler": {"autotune_cost_model": "cost.json", "max_wait_s": 40.0}},
                              base_dir=tmp_path)
    tuned_for: list[int] = []

    def tune(count, progress):  # type: ignore[no-untyped-def]
        tuned_for.append(count)
        return tuned_options_for(config, count, progress)

    # Started with beta 5, which no candidate has: a policy re-tuned in place shows it.
    coordinator = Coordinator(config, policy_factory=_policies(config, {"max_wait_s": 40.0, "max_adapters_per_step": 5}),
                              retune_options=tune)
    retuning = coordinator.retuning
    assert retuning is not None and retuning.tuned_for == 1
    policies = [engine.scheduler.policy for engine in coordinator.pool.engines]
    length_models = [policy.length_model for policy in policies]
    adapters = [str(path) for path in adapter_dirs.values()]

    def add(index: int) -> None:  # task i serves one of the three test adapters
        coordinator.dynamic.add(TaskInputs(f"task-{index}", adapters[index % len(adapters)], None, copied=False))

    async def settle() -> None:
        while retuning._running is not None:
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        add(0)
        add(1)  # 2 = 2 x 1
        assert retuning._running is not None
        add(2)  # during it
        await settle()
        assert tuned_for == [2] and retuning.tuned_for == 2 and retuning.retunings == 1  # 3 < 2 x 2: no second one
        chosen = json.loads(next((tmp_path / "state").glob("scheduler-tuning-*.json")).read_text())
        beta = SMALL[chosen["chosen"]].get("max_adapters_per_step", 8)
        assert all(p.options.max_adapters_per_step == beta and p.options.max_wait_s == 40.0 for p in policies)
        assert [p.length_model for p in policies] == length_models
        for policy in policies:
            policy.retune(dataclasses.replace(policy.options, max_adapters_per_step=5))
        coordinator.dynamic.remove("task-2")
        coordinator.dynamic.remove("task-1")  # 1 x 2 <= 2: tune for 1 task
        await settle()
        assert tuned_for == [2, 1] and retuning.retunings == 2
        assert all(p.options.max_adapters_per_step != 5 for p in policies)

        (tmp_path / "cost.json").unlink()  # the next tuning fails
        for policy in policies:
            policy.retune(dataclasses.replace(policy.options, max_adapters_per_step=5))
        add(1)
        await settle()
        assert tuned_for == [2, 1, 2] and retuning.retunings == 2
        assert all(p.options.max_adapters_per_step == 5 for p in policies)  # the options in force stay

        (tmp_path / "cost.json").write_text(COST_MODEL.read_text())
        monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),) * 50)  # long enough to be stopped
        add(2)
        add(3)
        assert retuning._running is not None
        await asyncio.wait_for(retuning.stop(), timeout=60)
        assert tuned_for == [2, 1, 2, 4] and retuning.retunings == 2
        assert all(p.options.max_adapters_per_step == 5 for p in policies)

    with caplog.at_level(logging.INFO, logger="inlaid.coordinator"):
        asyncio.run(scenario())
    assert len([r for r in caplog.records if r.message == "scheduler re-tuned"]) == 2
    assert len([r for r in caplog.records if r.message.startswith("scheduler re-tuning failed")]) == 1
    for policy in policies:
        policy.close()
