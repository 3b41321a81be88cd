"""Adding a task refuses at once what would fail later or route wrongly (an outside probe of
the live task administration, 2026-12-05)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid.client import InvalidRequestError
from inlaid.client.messages import build_add_task
from inlaid.quant.calibration import read_calibration_examples
from inlaid.quant.errors import CalibrationDataError
from inlaid.serve.config import ConfigError, base_model_id, config_from_dict

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def test_calibration_messages_the_chat_template_would_fail_on_are_refused_by_line(tmp_path):
    """They were accepted by add-task and failed a second later inside the re-quantization
    job ('dict object has no attribute role', 'can only concatenate str (not int)')."""
    good = {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4"}
    for messages, words in [([{"foo": 1}], "messages[0]"), ([{"role": "bogus", "content": "x"}], "messages[0]"),
                            ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], "messages[1]"),
                            (["just text"], "messages[0]")]:
        path = tmp_path / "calib.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "messages": messages}) + "\n")
        with pytest.raises(CalibrationDataError, match=rf"calib.jsonl:2: {words.replace('[', '.').replace(']', '.')}"):
            read_calibration_examples(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_calibration_examples(path) == [good]
    with pytest.raises(CalibrationDataError, match="is a directory"):  # it said "does not exist"
        read_calibration_examples(tmp_path)


def test_add_task_takes_paths_and_names_what_it_cannot_send():
    message = build_add_task("r1", "qa2", ADAPTERS / "qa", ADAPTERS / "calib.jsonl", None)
    assert (message.adapter_dir, message.calibration_jsonl) == (str(ADAPTERS / "qa"), str(ADAPTERS / "calib.jsonl"))
    assert build_add_task("r1", "qa2", "x", None, "t" * 16).calibration_jsonl == ""
    with pytest.raises(InvalidRequestError) as refused:
        build_add_task("r2", "qa2", 5, None, None)  # type: ignore[arg-type]
    assert refused.value.param == "adapter_dir" and refused.value.request_id == "r2"
    with pytest.raises(InvalidRequestError, match="adapter_dir must not be empty") as refused:
        build_add_task("r3", "qa2", "", None, None)  # the server read "" as its working directory
    assert refused.value.param == "adapter_dir"


def test_a_task_may_not_take_the_base_models_id(model_dir, tmp_path):
    """Added through the SDK, the task shadowed the base for SDK clients while HTTP (which
    refused the name) kept reaching the base by the same id."""
    from inlaid.serve.coordinator import Coordinator
    from inlaid.serve.task_registry import TaskError

    base = base_model_id(str(model_dir))
    assert base == base_model_id(str(model_dir) + "/") == Path(model_dir).name
    with pytest.raises(ConfigError, match="base model's id"):
        config_from_dict({"model": {"dir": str(model_dir)}, "tasks": {base: str(ADAPTERS / "qa")}})
    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    with pytest.raises(TaskError, match="base model's id"):
        coordinator.registry.check_adapter(base, str(ADAPTERS / "qa"))
    coordinator.registry.check_adapter("qa2", str(ADAPTERS / "qa"))  # any other name passes
    with pytest.raises(TaskError, match="adapter_dir must not be empty"):  # a raw AddTask's ""
        coordinator.registry.check_adapter("qa2", "")


def test_task_status_line_says_which_of_its_layers_are_still_served(capsys):
    """A task whose layers a later task's job replaced in part read "30/30 ... 27 layers
    swapped" above "30 of 30 layers swapped in" (an outside probe); a task with nothing
    re-quantized read "layers 0/30"."""
    from inlaid.client.cli import _print_status
    from inlaid.protocol.client import TaskStatusReply

    def line(**fields) -> str:
        base = dict(request_id="r", name="code", phase="ready", layers_done=30, layers_total=30, version=1,
                    served_version=5, layers_swapped=27, message="30 of 30 layers swapped in")
        _print_status(TaskStatusReply(**{**base, **fields}), as_json=False)
        return capsys.readouterr().out.splitlines()[0]

    assert line(layers_superseded=3) == ("code: ready, layers 30/30, version 1 (served up to 5), 27 of its layers "
                                         "served now, 3 replaced by later versions")
    # layers kept as served were never swapped: no "replaced" for them (it was said whenever
    # fewer layers were swapped than done); layers lost at a restart are named as such
    assert line(layers_swapped=20, served_version=1).endswith("20 of its layers served now")
    assert "2 changed layers not served at its version" in line(layers_not_served=2)
    assert "remove the task and add it again" in line(layers_not_served=2)  # adding it again changes nothing
    assert line(layers_swapped=30, served_version=1).endswith("30 of its layers served now")
    assert line(phase="serving", layers_done=0, version=0, layers_swapped=0) == "code: serving"


def test_task_status_counts_the_linears_the_gate_kept_unless_verbose(capsys):
    """`add-task --wait` and `task-status` printed one line per linear the quality gate kept:
    ~200 lines for a job on the default model (an outside probe following the docs)."""
    from inlaid.client.cli import _print_status
    from inlaid.protocol.client import KeptLinear, TaskStatusReply

    kept = [KeptLinear(layer=layer, linear=linear, action="kept-quality", reason=f"task 'qa' would lose {layer}%")
            for layer in range(30) for linear in ("q_proj", "down_proj")]
    kept.append(KeptLinear(layer=3, linear="v_proj", action="kept-unchanged", reason="aggregate moved 0%"))
    status = TaskStatusReply(request_id="r", name="code", phase="ready", layers_done=30, layers_total=30, version=1,
                             served_version=1, layers_swapped=30, kept=kept, message="done")
    _print_status(status, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["  kept layer 0 q_proj: task 'qa' would lose 0%",
                         "  ... and 59 more linears kept as served by the quality gate (--verbose lists each)",
                         "  done"]
    _print_status(status, as_json=False, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 60 + 1 and lines[-2] == "  kept layer 29 down_proj: task 'qa' would lose 29%"


def test_an_added_adapter_naming_another_base_is_said_in_the_reply_and_the_log(model_dir, tmp_path, caplog):
    """Served (its shapes fit), as `inlaid generate` serves it, but said: the server added it with
    an INFO line alone (an outside probe)."""
    import asyncio
    import logging
    import shutil

    from inlaid.protocol import AddTask, AdminReply
    from inlaid.serve.coordinator import Coordinator

    adapter = Path(shutil.copytree(ADAPTERS / "qa", tmp_path / "named"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config,
                                                             "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)},
                                                "server": {"admin_token": "t" * 16}}, base_dir=tmp_path))
    replies = []
    coordinator.task_calls._reply = lambda identity, message: replies.append(message)

    async def add(name: str, directory: Path) -> None:
        coordinator.task_calls.admin(b"c", AddTask(request_id=name, name=name, adapter_dir=str(directory),
                                                   token="t" * 16))
        await asyncio.gather(*coordinator.task_calls.pending)

    inlaid_log, propagated = logging.getLogger("inlaid"), logging.getLogger("inlaid").propagate
    inlaid_log.propagate = True  # (the server's log set-up stops it; caplog reads the root logger)
    try:
        with caplog.at_level(logging.WARNING, logger="inlaid"):
            asyncio.run(add("named", adapter))
            asyncio.run(add("plain", ADAPTERS / "qa"))
    finally:
        inlaid_log.propagate = propagated
    named, plain = replies
    assert isinstance(named, AdminReply) and named.message.endswith(
        f"; note: adapter 'named' was trained for base model 'meta-llama/Llama-2-7b-hf' (its adapter_config.json's "
        f"base_model_name_or_path), not this model '{Path(model_dir).name}'; served because its shapes fit")
    assert isinstance(plain, AdminReply) and "note:" not in plain.message
    assert [r.getMessage() for r in caplog.records] == ["an added adapter names another base model"]
