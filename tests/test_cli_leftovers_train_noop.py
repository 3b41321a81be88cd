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
    err = capsys.readouterr().err
    assert (f"2 of 5 training samples of task 'mine' are longer than 64 tokens (--max-length; the longest has "
            f"{max(lengths)}) and are left out, not cut") in err
    losses = json.loads((tmp_path / "adapter" / "losses.json").read_text())  # and a summary of the run
    assert (f"mine: 1 steps of 1 over 3 examples, loss {losses[0]:.3f} (first 1 steps) -> {losses[0]:.3f} (last 1), "
            in err) and f"adapter and training.json in {tmp_path / 'adapter'}" in err
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["train_examples_used"] == 3


def test_an_interrupted_run_says_what_it_kept_and_how_to_resume(model_dir: Path, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    """Ctrl-C said "interrupted" alone, though a checkpoint was kept and a rerun resumed it (a probe)."""
    from inlaid import cli
    from inlaid.tasks import train as train_module

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {word}."}],
                                        "reference": word}) + "\n" for word in ("yes", "no", "maybe")))
    real_loss, calls = train_module._loss, []

    def interrupted_on_the_third_step(*arguments, **options):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*arguments, **options)

    monkeypatch.setattr(train_module, "_loss", interrupted_on_the_third_step)
    out = tmp_path / "adapter"
    arguments = ["train-adapter", "--task", f"mine={data}", "--model", str(model_dir), "--out", str(out), "--rank",
                 "2", "--steps", "5", "--batch-size", "1", "--max-length", "64", "--save-every", "2", "--threads", "1"]
    assert cli.main(arguments) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"inlaid train-adapter: the checkpoint of step 2 of 5 is kept in {out / 'checkpoint'}: rerun "
                        "the same command to resume from it, or add --restart to start over",
                        "inlaid train-adapter: interrupted"]
    monkeypatch.setattr(train_module, "_loss", real_loss)
    assert cli.main(arguments) == 0
    assert "resuming mine from step 2" in capsys.readouterr().err
