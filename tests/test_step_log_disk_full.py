"""A step log that cannot be written never fails the requests: its lines are dropped with
one WARNING and counted when lines reach the file again. A full disk under the step log
failed every request of every step with an internal error while `health` said ok (an
outside probe). Real devices and real limits: /dev/full answers every write with ENOSPC,
RLIMIT_FSIZE cuts a write short as a filling disk does."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.scheduler import FifoPolicy, Scheduler, SchedulerLimits
from inlaid.engine.sequence import Sequence
from inlaid.protocol import SampledToken, SamplingParams, StepResult
from inlaid.scheduling.step_log import StepLogPolicy, read_step_log


def _scheduler(path: str, max_tokens: int = 50) -> Scheduler:
    scheduler = Scheduler(SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=4096),
                          BlockManager(4096, 16), AdapterSlots(2), eos_token_ids=(0,),
                          policy=StepLogPolicy(FifoPolicy(), path))
    scheduler.add(Sequence(seq_id=1, prompt_token_ids=list(range(1, 40)),
                           sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter=None))
    return scheduler


def _step(scheduler: Scheduler) -> None:
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.process_result(StepResult(step_id=plan.step_id, sampled=[SampledToken(seq_id=1, token_id=5)],
                                        num_tokens=sum(len(chunk.token_ids) for chunk in plan.chunks),
                                        compute_seconds=0.001),
                             {seq.seq_id: seq for seq in scheduler.running})


def test_a_step_log_on_a_full_device_drops_its_lines_and_the_steps_go_on(tmp_path, caplog) -> None:
    scheduler = _scheduler("/dev/full")
    policy = scheduler.policy
    with caplog.at_level(logging.WARNING, logger="inlaid.scheduling"):
        for _ in range(5):
            _step(scheduler)  # raised OSError: No space left on device
        assert policy.lines_lost == 5
        assert scheduler.running[0].num_computed_tokens == 39 + 4  # the prompt, then a token a step
        warnings = [record for record in caplog.records if "cannot be written" in record.getMessage()]
        assert len(warnings) == 1 and warnings[0].error == os.strerror(28)  # one for the spell
        # Space again: the same descriptor now reaches a regular file.
        regular = tmp_path / "steps.jsonl"
        replacement = os.open(regular, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(replacement, policy._fd)
        os.close(replacement)
        _step(scheduler)
    again = [record for record in caplog.records if "written again" in record.getMessage()]
    assert len(again) == 1 and again[0].lines_lost == 5
    assert policy.lines_lost == 0
    policy.close()
    assert [record["step"] for record in read_step_log(regular)] == [5]


_CUT_SHORT = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
from test_step_log_disk_full import _scheduler, _step
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
scheduler = _scheduler(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (700, hard))
for _ in range(6):
    _step(scheduler)
lost = scheduler.policy.lines_lost
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
for _ in range(3):
    _step(scheduler)
scheduler.policy.close()
print(lost)
"""


def test_a_line_cut_short_is_skipped_and_the_next_starts_a_line_of_its_own(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    run = subprocess.run([sys.executable, "-c", _CUT_SHORT, str(path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    raw_lines = path.read_text().splitlines()
    whole = [line for line in raw_lines if line.startswith("{") and line.endswith("}")]
    steps_written = [json.loads(line)["step"] for line in whole]
    assert len(raw_lines) == len(whole) + 1  # the one cut short, on a line of its own
    assert int(run.stdout) == 6 - len([s for s in steps_written if s < 6])  # the rest of the six was dropped
    assert steps_written[-3:] == [6, 7, 8]  # every line after the limit was lifted
    assert [record["step"] for record in read_step_log(path)] == steps_written
