"""The start-up scheduler tuning can be abandoned (inlaid/serve/retuning.py StartupTuning):
a server stopped while it tunes stops at once, the tuning's thread ends at its next
simulation, writes no cache and is not reported as failed."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from inlaid.serve.config import config_from_dict
from inlaid.serve.retuning import StartupTuning

COST_MODEL = Path(__file__).resolve().parent.parent / "bench" / "results" / "sched_cost_model.json"


async def _stopped_after(tuning: StartupTuning[Any], seconds: float) -> tuple[bool, float]:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    started = time.monotonic()
    finished = await tuning.start().finished_unless(stop)
    return finished, time.monotonic() - started


def test_a_shutdown_abandons_the_start_up_tuning_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        server_log: list[logging.LogRecord]) -> None:
    import inlaid.scheduling.simulator as simulator
    from inlaid.serve.cli import _tuned_policies

    simulations: list[float] = []
    real_simulate = simulator.simulate

    def slow_simulate(*args: Any, **kwargs: Any) -> Any:  # a slow machine's tuning: minutes in all
        simulations.append(time.monotonic())
        time.sleep(0.3)
        return real_simulate(*args, **kwargs)

    monkeypatch.setattr(simulator, "simulate", slow_simulate)
    state_dir = tmp_path / "state"
    config = config_from_dict({"server": {"policy": "inlaid", "state_dir": str(state_dir)},
                               "scheduler": {"autotune_cost_model": str(COST_MODEL)}}, base_dir=tmp_path)
    tuning = StartupTuning(functools.partial(_tuned_policies, config))  # what `inlaid serve` tunes with
    finished, waited = asyncio.run(_stopped_after(tuning, 1.0))
    assert not finished and waited < 2.0, waited  # the shutdown did not wait for the tuning
    assert tuning.thread is not None
    tuning.thread.join(timeout=10)
    assert not tuning.thread.is_alive(), "the tuning's thread ends at its next simulation"
    assert len(simulations) < 22, "the tuning stopped at its next simulation (it runs 44)"
    assert not list(state_dir.glob("scheduler-tuning-*.json")), "a tuning it did not finish is not cached"
    messages = [(record.levelno, record.getMessage()) for record in server_log]
    assert (logging.INFO, "scheduler tuning abandoned: the server stops") in messages
    assert not [message for level, message in messages if level >= logging.ERROR], messages  # not "failed"


def test_a_tuning_that_ends_first_hands_over_its_result_or_error() -> None:
    finished, _ = asyncio.run(_stopped_after(done := StartupTuning(lambda: "factory"), 30.0))
    assert finished and done.future is not None and done.future.result() == "factory"

    def fails() -> str:
        raise ValueError("cost model unreadable")

    finished, _ = asyncio.run(_stopped_after(failed := StartupTuning(fails), 30.0))
    assert finished and failed.future is not None and isinstance(failed.future.exception(), ValueError)
