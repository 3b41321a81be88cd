"""The torch-free parts of dynamic tasks, without processes: the state directory (round trip,
refusals, garbage), the [requantizer] config section, and why a base cannot be re-quantized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.serve.config import ConfigError, config_from_dict
from inlaid.serve.dynamic_tasks import requantization_blocker
from inlaid.serve.task_store import QUEUED, CommittedLayer, StateDirError, TaskRecord, TaskStore

BASE = {"model_dir": "/models/m", "quantized_dir": "/models/q"}


def _adapter(directory):
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    return directory


def test_state_round_trip_and_garbage(tmp_path):
    store = TaskStore(tmp_path / "state", BASE)
    adapter, calibration = store.copy_inputs("code", str(_adapter(tmp_path / "a")), str(tmp_path / "a" / "adapter_config.json"))
    assert (Path(adapter) / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads(Path(calibration).read_text()) == {}
    store.tasks["code"] = TaskRecord(name="code", adapter_dir=adapter, calibration=calibration, phase=QUEUED,
                                     version=1, layers_done=2, layers_total=30,
                                     decisions=[{"layer": 0, "linear": "mlp.down_proj", "action": "kept-quality",
                                                 "reason": "r", "change": 0.1}])
    kept = store.layers_dir / "layer_000.v1.safetensors"
    kept.write_bytes(b"x")
    store.layers[0] = CommittedLayer(version=1, file=str(kept))
    store.dropped.append("math")
    store.next_version = 2
    store.save()
    # an orphan copy, an uncommitted layer file: gone at the next start
    orphan, _ = store.copy_inputs("orphan", str(tmp_path / "a"), None)
    stale = store.layers_dir / "layer_001.v1.safetensors"
    stale.write_bytes(b"y")

    again = TaskStore(tmp_path / "state", BASE)
    assert again.tasks["code"] == store.tasks["code"]
    assert again.layers == {0: CommittedLayer(version=1, file=str(kept))}
    assert again.dropped == ["math"] and again.next_version == 2 and again.served_version == 1
    assert not (tmp_path / "state" / "adapters" / orphan.split("/")[-1]).exists() and not stale.exists()
    assert kept.exists() and (tmp_path / "state" / "adapters" / adapter.split("/")[-1]).is_dir()


def test_state_of_another_base_or_corrupt_is_refused(tmp_path):
    TaskStore(tmp_path / "state", BASE).save()
    with pytest.raises(StateDirError, match="another base"):
        TaskStore(tmp_path / "state", {**BASE, "quantized_dir": "/models/other"})
    (tmp_path / "state" / "registry.json").write_text("{broken")
    with pytest.raises(StateDirError, match="unreadable"):
        TaskStore(tmp_path / "state", BASE)


def test_requantizer_section(tmp_path):
    config = config_from_dict({"server": {"state_dir": "state"}, "requantizer": {"threads": 2, "change_threshold": 0,
                                                                                 "idle_priority": False}},
                              base_dir=tmp_path)
    assert config.state_dir == str(tmp_path / "state")
    assert (config.requantizer.threads, config.requantizer.change_threshold, config.requantizer.idle_priority) == (2, 0, False)
    assert config.requantizer.quality_tolerance == 1.0 and config.requantizer.niceness == 19
    for bad, match in (({"threads": "1"}, "must be a int"), ({"enabled": 1}, "must be a bool"),
                       ({"threads": 0}, ">= 1"), ({"niceness": 25}, "0..19"), ({"speed": 1}, "unknown keys"),
                       ({"change_threshold": -0.1}, ">= 0")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"requantizer": bad})


def test_why_a_base_cannot_be_requantized(tmp_path):
    def blocker(quantized, state_dir="state", enabled=True, metadata=None):
        if metadata is not None:
            (tmp_path / "q").mkdir(exist_ok=True)
            (tmp_path / "q" / "inlaid_quant.json").write_text(json.dumps(metadata))
        config = config_from_dict({"model": {"quantized_dir": quantized} if quantized else {},
                                   "server": {"state_dir": state_dir} if state_dir else {},
                                   "requantizer": {"enabled": enabled}}, base_dir=tmp_path)
        return requantization_blocker(config)

    assert "full-precision" in blocker(None)
    assert "no server.state_dir" in blocker("q", state_dir=None)
    assert "enabled is false" in blocker("q", enabled=False)
    assert "not written by `inlaid quantize`" in blocker("q")
    assert "RTN" in blocker("q", metadata={"method": "rtn", "hessian_state": "hessian_state"})
    assert "without its Hessian state" in blocker("q", metadata={"method": "mlgptq", "hessian_state": ""})
    assert blocker("q", metadata={"method": "mlgptq", "hessian_state": "hessian_state"}) == ""
