"""A task added again with the very adapter files and calibration samples its stored Hessians
came from queues no job (inlaid/serve/hessian_sources.py).

An outside probe re-added `sentiment` to the 4-bit suite base with its own committed samples:
a job ran, the aggregate moved by 1.25 % (median), all 30 layers were re-quantized and most
other tasks' greedy answers changed, for nothing new. Checked on the coordinator's task side
as coordinator.py wires it: a task whose job finished, and a task of the checkpoint (whose
inlaid_quant.json records the adapter signature and the samples' sha256); other samples,
other files, a checkpoint without signatures, or Hessians that left the aggregate still
queue a job.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inlaid.engine.adapter_config import adapter_signature
from inlaid.engine.config import ModelConfig
from inlaid.quant.aggregate import TaskHessian
from inlaid.quant.state import save_layer_state
from inlaid.serve import dynamic_tasks
from inlaid.serve.config import config_from_dict
from inlaid.serve.dynamic_tasks import DynamicTasks
from inlaid.serve.executor_pool import ExecutorPool
from inlaid.serve.task_registry import TaskRegistry
from inlaid.serve.hessian_sources import HessianSource
from inlaid.serve.task_records import QUEUED, READY, TaskRecord

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
SAMPLES = '{"messages": [{"role": "user", "content": "q"}], "reference": "a"}\n'
LAYERS = 30  # the default model's (checked below)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return Path(shutil.copytree(ADAPTERS / "qa", tmp_path_factory.mktemp("src") / "qa"))


def _checkpoint(tmp_path: Path, entries: list[dict], held: tuple[str, ...] = ("qa", "code")) -> Path:
    """A stand-in for the checkpoint directory: its metadata, and a Hessian state (real files,
    tiny Hessians) whose every layer holds the tasks `held`."""
    checkpoint = tmp_path / "gptq"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "inlaid_quant.json").write_text(json.dumps({"method": "mlgptq", "tasks": entries,
                                                              "hessian_state": "hessian_state"}))
    for layer in range(LAYERS):
        state = {group: {task: TaskHessian(torch.eye(2), 4) for task in held} for group in ("attn", "mlp")}
        save_layer_state(checkpoint / "hessian_state", layer, state, forward="adapter")
    return checkpoint


def _dynamic(model_dir: Path, tmp_path: Path, monkeypatch, checkpoint: Path, tasks: dict[str, str] | None = None,
             record: TaskRecord | None = None, source: HessianSource | None = None) -> tuple[DynamicTasks, list[str]]:
    """The task side on a GPTQ base that can re-quantize; the jobs it submits are recorded."""
    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": {"state_dir": str(tmp_path / "state")},
                               "tasks": tasks or {},
                               "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}})
    registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "token")
    for name, adapter_dir in config.tasks.items():
        registry.add(name, adapter_dir)
    config = replace(config, engine=replace(config.engine, quantized_dir=str(checkpoint)))
    monkeypatch.setattr(dynamic_tasks, "requantization_blocker", lambda config: "")
    if record is not None:
        first = DynamicTasks(config, registry, wake=lambda: None)
        first.store.tasks[record.name] = record
        if source is not None:
            first.store.hessian_sources[record.name] = source
        first.store.save()
    dynamic = DynamicTasks(config, registry, wake=lambda: None)
    submitted: list[str] = []
    monkeypatch.setattr(dynamic.jobs, "submit", submitted.append)
    return dynamic, submitted


def _samples(tmp_path: Path, name: str, text: str = SAMPLES) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_checkpoint_task_added_again_with_its_files_and_samples_queues_no_job(model_dir, tmp_path, adapter,
                                                                              monkeypatch):
    samples = _samples(tmp_path, "calib.jsonl")
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                                         "adapter_signature": adapter_signature(adapter)}])
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, tasks={"qa": str(adapter)})
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(samples)))
    assert "nothing to re-quantize" in text and "(the checkpoint)" in text and "queued" not in text, text
    assert submitted == [] and "qa" not in dynamic.store.tasks  # nothing changed: nothing recorded
    assert "qa" not in dynamic.store.dropped  # the checkpoint's Hessians still serve the aggregate
    # Nothing copied either, and the name stays where it is served: with requests in flight
    # (a deployment script re-adding under traffic) that is no `task_busy`.
    assert dynamic.registry.tasks["qa"] == str(adapter) and not any((tmp_path / "state" / "adapters").iterdir())
    dynamic.registry.active["qa"] = 2
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(samples)))
    assert "already serves" in text and "nothing to re-quantize" in text and submitted == [], text
    without_samples = dynamic.add(dynamic.prepare("qa", str(adapter), None))
    assert "added again with the same files: served as it was" in without_samples, without_samples
    dynamic.registry.active["qa"] = 0
    # Other samples: a job.
    other = _samples(tmp_path, "other.jsonl", SAMPLES.replace('"q"', '"q2"'))
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(other)))
    assert "re-quantization queued" in text and submitted == ["qa"]


def test_the_checkpoints_own_files_replacing_other_ones_keep_its_hessians(model_dir, tmp_path, adapter,
                                                                         monkeypatch):
    """The config serves other files under the name than the checkpoint was computed with;
    adding the checkpoint's own files and samples back replaces them, with no job, and the
    Hessians stored for the name (which came from those files) stay in the aggregate."""
    samples = _samples(tmp_path, "calib.jsonl")
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                                         "adapter_signature": adapter_signature(adapter)}])
    changed = _changed(adapter, tmp_path)
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, tasks={"qa": str(changed)})
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(samples)))
    assert "nothing to re-quantize" in text and "replaces the config's [tasks] entry" in text, text
    assert submitted == [] and "qa" not in dynamic.store.dropped and "leave the aggregate" not in text


def _changed(adapter: Path, tmp_path: Path) -> Path:
    """A copy of `adapter` with one bit of its last weight flipped."""
    changed = Path(shutil.copytree(adapter, tmp_path / "changed"))
    weights = changed / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return changed


def test_a_stored_state_without_the_tasks_hessians_queues_a_job(model_dir, tmp_path, adapter, monkeypatch):
    """The checkpoint's record matches, but the stored state no longer holds the task (a removed
    task's Hessians, once another job rewrote the layers without them): a job (a reviewer)."""
    assert ModelConfig.from_dir(model_dir).num_layers == LAYERS
    samples = _samples(tmp_path, "calib.jsonl")
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                                         "adapter_signature": adapter_signature(adapter)}], held=("code",))
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, tasks={"qa": str(adapter)})
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(samples)))
    assert "re-quantization queued" in text and submitted == ["qa"], text


def test_a_removal_between_the_check_and_the_add_queues_a_job(model_dir, tmp_path, adapter, monkeypatch):
    """`prepare` judges the stored Hessians in a worker thread; a removal on the loop before
    `add` took them out of the aggregate: the add must not say "nothing to re-quantize"."""
    samples = _samples(tmp_path, "calib.jsonl")
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                                         "adapter_signature": adapter_signature(adapter)}])
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, tasks={"qa": str(adapter)})
    inputs = dynamic.prepare("qa", str(adapter), str(samples))
    assert inputs.hessians_from == "the checkpoint"
    dynamic.remove("qa")
    text = dynamic.add(inputs)
    assert "re-quantization queued" in text and submitted == ["qa"], text


def test_a_removed_task_whose_own_job_wrote_its_hessians_is_judged_by_that_job(model_dir, tmp_path, adapter,
                                                                                 monkeypatch):
    """A config task re-quantized live with other samples, then removed: its Hessians (the
    job's) stay in the state and rejoin at a restart. Added back with the checkpoint's own
    samples, "(the checkpoint): nothing to re-quantize" kept the other samples' Hessians in
    every later aggregate (an outside probe): the job's inputs are what count."""
    samples = _samples(tmp_path, "calib.jsonl")
    other = _samples(tmp_path, "other.jsonl", SAMPLES.replace('"q"', '"q2"'))
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                                         "adapter_signature": adapter_signature(adapter)}])
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, tasks={"qa": str(adapter)})
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(other)))
    assert "re-quantization queued (version 1)" in text and submitted == ["qa"]
    source = dynamic.store.hessian_sources["qa"]
    assert (source.version, source.complete) == (1, False)
    # Its job ends (as requantization_jobs._end_job marks it), then the task is removed and
    # (as at a restart that serves the config task again) its Hessians rejoin.
    record = dynamic.store.tasks["qa"]
    record.phase, source.complete = READY, True
    dynamic.remove("qa")
    dynamic.store.dropped.remove("qa")
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(samples)))
    assert "re-quantization queued" in text and submitted == ["qa", "qa"], text
    # A job cancelled or failed wrote some layers only: its own samples match nothing either.
    dynamic.store.tasks["qa"].phase = READY  # (a reader's shortcut: the job ended, not completed)
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(samples)))
    assert "re-quantization queued" in text and submitted == ["qa", "qa", "qa"], text


def test_other_files_or_an_older_checkpoint_still_queue_a_job(model_dir, tmp_path, adapter, monkeypatch):
    samples = _samples(tmp_path, "calib.jsonl")
    digest = hashlib.sha256(samples.read_bytes()).hexdigest()
    changed = _changed(adapter, tmp_path)
    for entries, adapter_dir in (
        ([{"name": "qa", "calib_sha256": digest, "adapter_signature": adapter_signature(adapter)}], changed),
        ([{"name": "qa", "calib_sha256": digest}], adapter),  # written before signatures were recorded
        ([{"name": "code", "calib_sha256": digest, "adapter_signature": adapter_signature(adapter)}], adapter),
    ):
        root = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
        root.mkdir()
        dynamic, submitted = _dynamic(model_dir, root, monkeypatch, _checkpoint(root, entries),
                                      tasks={"qa": str(adapter)})
        text = dynamic.add(dynamic.prepare("qa", str(adapter_dir), str(samples)))
        assert "re-quantization queued" in text and submitted == ["qa"], (entries, text)


def test_a_task_whose_job_finished_added_again_with_its_files_and_samples_keeps_its_version(
        model_dir, tmp_path, adapter, monkeypatch):
    state_copy = tmp_path / "state-src"
    state_copy.mkdir()
    kept_samples = _samples(state_copy, "calib.jsonl")
    checkpoint = _checkpoint(tmp_path, [])
    record = TaskRecord(name="qa", adapter_dir=str(adapter), calibration=str(kept_samples), phase=READY, version=3,
                        layers_done=30, layers_total=30, message="30 of 30 layers swapped in")
    source = HessianSource(3, adapter_signature(adapter), hashlib.sha256(SAMPLES.encode()).hexdigest(), complete=True)
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, record=record, source=source)
    same = _samples(tmp_path, "same.jsonl")  # the same bytes under another name
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(same)))
    assert "nothing to re-quantize" in text and "version 3" in text and submitted == [], text
    kept = dynamic.store.tasks["qa"]
    assert (kept.phase, kept.version, kept.layers_done) == (READY, 3, 30)
    assert Path(kept.calibration).read_text() == SAMPLES and Path(kept.adapter_dir).is_dir()
    # Its Hessians left the aggregate (removed and added again): a job computes them afresh.
    dynamic.store.dropped.append("qa")
    text = dynamic.add(dynamic.prepare("qa", str(adapter), str(same)))
    assert "re-quantization queued" in text and submitted == ["qa"]
    assert dynamic.store.tasks["qa"].phase == QUEUED


def test_a_new_name_with_another_tasks_files_and_samples_is_said_to_weigh_them_twice(model_dir, tmp_path, adapter,
                                                                                      monkeypatch):
    """A copy of a task under a new name: its job runs (the name holds no Hessians), and the
    reply says the aggregate now weighs those files and samples twice (an outside probe saw it
    re-quantize 30 of 30 layers of the 4-bit suite base without a word)."""
    samples = _samples(tmp_path, "calib.jsonl")
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": hashlib.sha256(samples.read_bytes()).hexdigest(),
                                         "adapter_signature": adapter_signature(adapter)}])
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint, tasks={"qa": str(adapter)})
    text = dynamic.add(dynamic.prepare("qa2", str(adapter), str(samples)))
    assert "re-quantization queued" in text and submitted == ["qa2"], text
    assert "byte for byte task 'qa''s, so the aggregate weighs them twice" in text
    other = _samples(tmp_path, "other.jsonl", SAMPLES.replace('"q"', '"q2"'))
    text = dynamic.add(dynamic.prepare("qa3", str(adapter), str(other)))
    assert "re-quantization queued" in text and "twice" not in text, text


def test_a_checkpoint_tasks_name_given_to_other_files_live_drops_its_hessians(model_dir, tmp_path, adapter,
                                                                              monkeypatch):
    """The checkpoint was quantized for `qa` with `adapter`; added live under that name with other
    files and no samples, on a server with no record or config entry of it, its Hessians stayed
    in every later job's aggregate and quality gate, without a word (an outside probe). Now they
    leave it, and the reply says so; the checkpoint's own files keep them, and a name whose files
    the checkpoint does not record (`code` here) is left as it is."""
    checkpoint = _checkpoint(tmp_path, [{"name": "qa", "calib_sha256": "0" * 64,
                                         "adapter_signature": adapter_signature(adapter)}])
    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, checkpoint)
    text = dynamic.add(dynamic.prepare("qa", str(adapter), None))
    assert "qa" not in dynamic.store.dropped and "leave the aggregate" not in text, text
    dynamic.remove("qa")
    dynamic.store.tasks.pop("qa", None)
    dynamic.store.dropped.clear()
    text = dynamic.add(dynamic.prepare("qa", str(_changed(adapter, tmp_path)), None))
    assert dynamic.store.dropped == ["qa"] and submitted == [], text
    assert ("the Hessians stored for it were computed by the checkpoint's quantization (with other adapter files) "
            "and leave the aggregate") in text
    text = dynamic.add(dynamic.prepare("code", str(ADAPTERS / "code"), None))
    assert "code" not in dynamic.store.dropped and "leave the aggregate" not in text, text


def test_a_name_peft_refuses_with_calibration_samples_is_refused_at_the_add(model_dir, tmp_path, adapter,
                                                                           monkeypatch):
    """Its job loads the adapter into PEFT, which refuses '.' in adapter names and the names of
    torch's ModuleDict attributes: the add was accepted and the job failed, again at every
    retry the status advised (an outside probe; a reviewer)."""
    from inlaid.serve.task_registry import TaskError

    dynamic, submitted = _dynamic(model_dir, tmp_path, monkeypatch, _checkpoint(tmp_path, []))
    samples = str(_samples(tmp_path, "calib.jsonl"))
    with pytest.raises(TaskError, match=r"task 'my\.qa' cannot have the base re-quantized for it \(PEFT adapter names "
                                        r"cannot hold a '\.'\): .* or without calibration samples"):
        dynamic.prepare("my.qa", str(adapter), samples)
    for name in ("train", "keys"):  # torch's ModuleDict attributes: PEFT's KeyError "attribute ... already exists"
        with pytest.raises(TaskError, match=rf"task '{name}' cannot have the base re-quantized for it \(PEFT cannot "
                                            rf"load an adapter named '{name}'"):
            dynamic.prepare(name, str(adapter), samples)
    assert "added without calibration samples" in dynamic.add(dynamic.prepare("my.qa", str(adapter), None))
    assert "re-quantization queued" in dynamic.add(dynamic.prepare("my-qa", str(adapter), samples))
    assert submitted == ["my-qa"]
