"""A server with several executors has a step-log writer per executor on one file, and step
ids count per executor: a line did not say whose step it was, so the log could not be
read back per executor (steps of different executors shared ids). Lines must stay whole
with several writers (each appends whole buffered lines)."""

from __future__ import annotations

from pathlib import Path

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import FifoPolicy, Scheduler, SchedulerLimits
from inlaid.engine.sequence import Sequence
from inlaid.protocol import SampledToken, SamplingParams
from inlaid.scheduling.step_log import StepLogPolicy, read_step_log

STEPS_PER_EXECUTOR = 900  # lines of ~300 bytes: several 64 KiB buffers per writer


def _executor(path: Path, index: int) -> Scheduler:
    scheduler = Scheduler(SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=4096),
                          BlockManager(4096, 16), AdapterSlots(2), eos_token_ids=(0,),
                          policy=StepLogPolicy(FifoPolicy(), path))
    scheduler.executor_index = index
    # a long prompt makes the long lines (its chunks name the tokens' count, not the tokens)
    scheduler.add(Sequence(seq_id=index, prompt_token_ids=list(range(1, 200)),
                           sampling=SamplingParams(max_tokens=STEPS_PER_EXECUTOR, ignore_eos=True),
                           adapter=None))
    return scheduler


def _step(scheduler: Scheduler, seq_id: int) -> None:
    from inlaid.protocol import StepResult

    plan = scheduler.schedule()
    assert plan is not None
    scheduler.process_result(StepResult(step_id=plan.step_id, sampled=[SampledToken(seq_id=seq_id, token_id=5)],
                                        num_tokens=sum(len(chunk.token_ids) for chunk in plan.chunks),
                                        compute_seconds=0.001),
                             {seq.seq_id: seq for seq in scheduler.running})


def test_executors_sharing_a_step_log_keep_whole_lines_and_name_themselves(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    executors = [_executor(path, 0), _executor(path, 1)]
    steps = {0: 0, 1: 0}
    # interleaved, as the coordinator's loop runs them
    for _ in range(STEPS_PER_EXECUTOR):
        for index, scheduler in enumerate(executors):
            if scheduler.has_work():
                _step(scheduler, index)
                steps[index] += 1
    for scheduler in executors:
        scheduler.policy.close()
    records = read_step_log(path)  # every line whole
    assert len(records) == sum(steps.values())
    for index in (0, 1):
        mine = [record for record in records if record["executor"] == index]
        assert len(mine) == steps[index]
        assert [record["step"] for record in mine] == list(range(steps[index]))  # in order, none lost


def test_a_single_engine_log_has_no_executor_field(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    scheduler = _executor(path, 0)
    scheduler.executor_index = None  # an in-process engine: no pool names it
    _step(scheduler, 0)
    scheduler.policy.close()
    (record,) = read_step_log(path)
    assert "executor" not in record and record["step"] == 0
