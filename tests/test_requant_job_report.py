"""What a finished re-quantization job says of the tasks whose Hessians left the aggregate
since the previous job (removed, replaced, failed): an outside probe replaced one task and
removed two, then added an ordinary one, whose job moved the aggregate by 9 % (median) and
re-quantized every layer, raising six other tasks' errors by 4 %: the report charged it all
to the new task. It now names the drops since the last job that ended ready, kept in the
state directory across restarts."""

from __future__ import annotations

import json
from pathlib import Path

from inlaid.serve.task_records import READY, TaskRecord
from inlaid.serve.task_status import drops_since_previous_job, ready_message
from inlaid.serve.task_store import REGISTRY_FILE, TaskStore

BASE = {"model_dir": "/m", "quantized_dir": "/q"}


def _record(drops: list[str] | None) -> TaskRecord:
    decision = {"layer": 0, "linear": "q_proj", "action": "requantized", "reason": "", "change": 0.1}
    return TaskRecord(name="new", adapter_dir="/a", calibration="/c", phase=READY, version=3, decisions=[decision],
                      aggregate_drops=drops)


def test_the_drops_since_the_last_ready_job_are_named() -> None:
    record = _record(["qa", "arx", "job2"])
    assert drops_since_previous_job(record, ["qa"]) == ["arx", "job2"]
    assert drops_since_previous_job(record, []) == ["qa", "arx", "job2"]  # a new state: the checkpoint's aggregate
    assert drops_since_previous_job(record, None) == []  # an older registry: unknown, nothing claimed
    assert drops_since_previous_job(_record(None), []) == []
    message = ready_message(record, 30, 30, 0.01, ["arx", "job2"])
    assert message == ("30 of 30 layers swapped in; 0 linears kept as served; the aggregate also lost the Hessians "
                       "of tasks removed, replaced or failed since the previous job (arx, job2): part of its change "
                       "is theirs")
    assert ready_message(record, 30, 30, 0.01, []) == "30 of 30 layers swapped in; 0 linears kept as served"
    many = ready_message(record, 1, 30, 0.01, [f"t{i}" for i in range(11)])
    assert "(t0, t1, t2, t3, t4, t5, t6, t7 and 3 more)" in many


def test_the_last_jobs_drops_are_kept_across_restarts(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "state", BASE)
    assert store.last_job_drops == []  # a new state
    store.dropped = ["qa", "arx"]
    store.last_job_drops = ["qa"]
    record = _record(["qa", "arx"])
    store.tasks["new"] = record
    store.save()
    again = TaskStore(tmp_path / "state", BASE)
    assert again.last_job_drops == ["qa"] and again.tasks["new"].aggregate_drops == ["qa", "arx"]
    # A registry written before they were kept loads as unknown (and says nothing of drops).
    path = tmp_path / "state" / REGISTRY_FILE
    raw = json.loads(path.read_text())
    del raw["last_job_drops"]
    del raw["tasks"]["new"]["aggregate_drops"]
    path.write_text(json.dumps(raw))
    old = TaskStore(tmp_path / "state", BASE)
    assert old.last_job_drops is None and old.tasks["new"].aggregate_drops is None
