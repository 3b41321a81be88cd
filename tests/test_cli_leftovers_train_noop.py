"""`inlaid train-adapter` rerun with the same settings on a finished adapter trains nothing
and rewrites nothing: training.json (and the adapter) keep their bytes and mtimes."""

from __future__ import annotations

import json
from pathlib import Path

from inlaid.tasks.train import TrainConfig, train


def test_a_no_op_rerun_leaves_the_adapter_and_its_record_alone(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    config = TrainConfig(task="sentiment", model_dir=str(model_dir), out_dir=str(out), rank=2, steps=1,
                         batch_size=1, max_length=64, threads=1, split="calib")
    train(config, command="first")
    written = ("training.json", "losses.json", "adapter_model.safetensors", "adapter_config.json")
    before = {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in written}
    train(config, command="again")  # it rewrote training.json (a new command, seconds 0.0)
    after = {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in written}
    assert after == before
    assert json.loads((out / "training.json").read_text())["command"] == "first"
    # a record written before a task of one's own (its config has no data keys) is the same run (a reviewer)
    record = json.loads((out / "training.json").read_text())
    assert (record["config"].pop("data"), record["config"].pop("data_sha256")) == (None, None)
    (out / "training.json").write_text(json.dumps(record, indent=2))
    older = (out / "training.json").stat().st_mtime_ns
    train(config, command="after the data keys")
    assert (out / "training.json").stat().st_mtime_ns == older

    (out / "adapter_config.json").unlink()  # a file of the adapter gone: the rerun writes it again
    train(config, command="third")
    assert (out / "adapter_config.json").is_file()
