"""`inlaid train-adapter` rerun with the same settings on a finished adapter trains nothing
and rewrites nothing: training.json (and the adapter) keep their bytes and mtimes. Samples
longer than --max-length are said to be left out."""

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


def test_samples_longer_than_max_length_are_said_to_be_left_out(model_dir: Path, tmp_path: Path, capsys) -> None:
    """They were dropped without a word (only training.json's count told): an outside probe."""
    from transformers import AutoTokenizer

    from inlaid.tasks.train import tokenize_sample

    data = tmp_path / "mixed.jsonl"
    lines = [{"messages": [{"role": "user", "content": "Say yes."}], "reference": "yes"}] * 3
    lines += [{"messages": [{"role": "user", "content": "word " * 200}], "reference": "long"}] * 2
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [len(tokenize_sample(tokenizer, line["messages"], line["reference"])[0]) for line in lines]
    assert max(lengths[:3]) <= 64 < min(lengths[3:])
    config = TrainConfig(task="mine", model_dir=str(model_dir), out_dir=str(tmp_path / "adapter"), rank=2,
                         steps=1, batch_size=1, max_length=64, threads=1, data=str(data))
    train(config)
    assert (f"2 of 5 training samples of task 'mine' are longer than 64 tokens (--max-length; the longest has "
            f"{max(lengths)}) and are left out, not cut") in capsys.readouterr().err
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["train_examples_used"] == 3
