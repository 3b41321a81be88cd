"""The coordinator's replies carry, beside their words, the facts the HTTP front answers from
(ErrorReply.field / .in_flight / .context_overflow, AdminReply's replaces_config_entry):
checked on the coordinator's real admission (no processes) and task side, through the wire
and the SDK to the front's error; and the new fields keep old and new peers decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from inlaid.client.errors import error_from_reply
from inlaid.http.errors import from_inlaid
from inlaid.protocol import (
    AdminReply, ContextOverflow, ErrorCode, ErrorReply, Generate, InFlightCounts, ReplacedConfigEntry, SamplingParams,
)

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _coordinator(model_dir: Path, tmp_path: Path, **server: Any) -> Any:
    """The coordinator's real engine and admission, no processes; replies collected instead of sent."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    made = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}, "server": server}, base_dir=tmp_path))
    made.replies = []
    made.in_flight._send = lambda identity, message: made.replies.append(message)
    return made


def _refusal(coordinator: Any, identity: bytes, message: Generate) -> ErrorReply:
    """The ErrorReply the client reads for `message` (through the wire's encoding)."""
    coordinator.in_flight.generate(identity, message)
    reply = coordinator.replies[-1]
    assert isinstance(reply, ErrorReply), reply
    return msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=ErrorReply)


@pytest.fixture(scope="module")
def coordinator(model_dir, tmp_path_factory):
    return _coordinator(model_dir, tmp_path_factory.mktemp("c"))


def test_an_overload_refusal_carries_the_admission_counts(model_dir, tmp_path):
    coordinator = _coordinator(model_dir, tmp_path, max_pending_requests=10)
    for index in range(9):  # admitted, held (no step runs): the last tenth is kept from this connection
        coordinator.in_flight.generate(b"front", Generate(request_id=f"r{index}", prompt="hi"))
    refused = _refusal(coordinator, b"front", Generate(request_id="r9", prompt="hi"))
    assert (refused.code, refused.in_flight, refused.field) == (
        ErrorCode.OVERLOADED, InFlightCounts(requests=9, this_connection=9, limit=10), None), refused
    coordinator.in_flight.generate(b"other", Generate(request_id="o0", prompt="hi"))  # the tenth kept for others
    refused = _refusal(coordinator, b"other", Generate(request_id="o1", prompt="hi"))
    assert refused.in_flight == InFlightCounts(requests=10, this_connection=1, limit=10), refused


def test_under_overload_a_bad_request_is_still_told_what_is_wrong(model_dir, tmp_path):
    """An unknown task or a bad value is answered as such when the server is full too (before:
    `overloaded`, which the official clients retry twice, then report as a rate limit)."""
    coordinator = _coordinator(model_dir, tmp_path, max_pending_requests=4)
    for index in range(4):
        coordinator.in_flight.generate(b"front", Generate(request_id=f"r{index}", prompt="hi"))
    assert _refusal(coordinator, b"front", Generate(request_id="full", prompt="hi")).code == ErrorCode.OVERLOADED
    unknown = _refusal(coordinator, b"front", Generate(request_id="typo", prompt="hi", task="nope"))
    assert (unknown.code, unknown.field) == (ErrorCode.UNKNOWN_TASK, "task"), unknown
    bad = _refusal(coordinator, b"front", Generate(request_id="bad", prompt="hi",
                                                   sampling=SamplingParams(temperature=-1.0)))
    assert (bad.code, bad.field) == (ErrorCode.INVALID_REQUEST, "temperature"), bad
    # the prompt's own checks (tokenizing it) still come after the refusal: no work for a refused request
    too_long = _refusal(coordinator, b"front", Generate(request_id="long", prompt="hi " * 5000))
    assert too_long.code == ErrorCode.OVERLOADED


def test_a_context_refusal_carries_the_field_and_the_overflow(coordinator):
    limit = coordinator.pool.shards[0].engine.max_model_len
    prompt = [42] * (limit - 10)
    refused = _refusal(coordinator, b"c", Generate(request_id="over", prompt_token_ids=prompt,
                                                   sampling=SamplingParams(max_tokens=11)))
    assert (refused.code, refused.field, refused.context_overflow) == (
        ErrorCode.CONTEXT_LENGTH, "max_tokens", ContextOverflow(context_length=limit, prompt_tokens=limit - 10,
                                                                max_tokens=11)), refused
    refused = _refusal(coordinator, b"c", Generate(request_id="long", prompt_token_ids=[42] * limit))
    assert (refused.code, refused.field, refused.context_overflow) == (
        ErrorCode.CONTEXT_LENGTH, "prompt_token_ids", ContextOverflow(context_length=limit, prompt_tokens=limit))
    # Through the SDK to the front: chat's refusal in its own terms, whatever the server's words.
    reworded = msgspec.structs.replace(_refusal(coordinator, b"c", Generate(
        request_id="over2", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=11))), message="reworded")
    answer = from_inlaid(error_from_reply(reworded), prompt_param="messages", max_tokens_param="max_completion_tokens")
    assert (answer.status, answer.param) == (400, "messages")
    assert answer.message == (f"the context length is {limit} tokens, but {limit + 1} were requested ({limit - 10} in "
                              f"the prompt, max_completion_tokens 11): lower max_completion_tokens to at most 10, or "
                              "give none (null) to generate until the context is full"), answer.message


@pytest.mark.parametrize("change, field", [
    ({"sampling": SamplingParams(temperature=-1.0)}, "temperature"),
    ({"sampling": SamplingParams(top_p=1.5)}, "top_p"),
    ({"sampling": SamplingParams(top_k=-2)}, "top_k"),
    ({"sampling": SamplingParams(max_tokens=0)}, "max_tokens"),
    ({"sampling": SamplingParams(stop=[""])}, "stop"),
    ({"sampling": SamplingParams(stop_token_ids=list(range(300)))}, "stop_token_ids"),
    ({"deadline_s": -1.0}, "deadline_s"),
    ({"task": "no-such-task"}, "task"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": None, "prompt_token_ids": [10**9]}, "prompt_token_ids"),
    ({"request_id": ""}, "request_id"),
    # Past admission's checks, the engine's own refusals: a stop id no sampler can produce.
    ({"sampling": SamplingParams(stop_token_ids=[10**8])}, "stop_token_ids"),
])
def test_an_invalid_request_names_its_field(coordinator, change, field):
    message = msgspec.structs.replace(Generate(request_id="bad", prompt="hi"), **change)
    refused = _refusal(coordinator, b"c", message)
    assert refused.code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNKNOWN_TASK) and refused.field == field, refused
    assert refused.in_flight is None and refused.context_overflow is None


def test_a_refusal_of_several_fields_names_none(coordinator):
    refused = _refusal(coordinator, b"c", Generate(request_id="both", prompt="hi", prompt_token_ids=[1]))
    assert refused.code == ErrorCode.INVALID_REQUEST and refused.field is None, refused


def test_an_addition_replacing_a_configured_task_says_so_as_a_fact(model_dir, tmp_path):
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.dynamic_tasks import DynamicTasks
    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.task_registry import TaskRegistry

    def dynamic(state: Path | None) -> DynamicTasks:
        server = {"state_dir": str(state)} if state is not None else {}
        config = config_from_dict({"model": {"dir": str(model_dir)}, "server": server,
                                   "tasks": {"qa": str(ADAPTERS / "qa")},
                                   "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}},
                                  base_dir=tmp_path)
        registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "token")
        registry.add("qa", str(ADAPTERS / "qa"))
        return DynamicTasks(config, registry, wake=lambda: None)

    for state, kept in ((tmp_path / "state", True), (None, False)):
        tasks = dynamic(state)
        assert tasks.replaced_config_entry("other", str(ADAPTERS / "qa")) is None
        # not the config's path (that one is already served: nothing replaced)
        text = tasks.add(tasks.prepare("qa", str(ADAPTERS / "math"), None))
        entry = tasks.replaced_config_entry("qa", str(ADAPTERS / "math"))
        assert entry == ReplacedConfigEntry(adapter_dir=str(ADAPTERS / "qa"), kept_across_restarts=kept), entry
        # the config's own adapter again (after an unload): without a state directory nothing is
        # replaced (it said it was); with one, the stored addition outlives an edit of the config
        again = tasks.replaced_config_entry("qa", str(ADAPTERS / "qa"))
        assert again == (ReplacedConfigEntry(adapter_dir=str(ADAPTERS / "qa"), kept_across_restarts=True) if kept
                         else None), again
        assert f"replaces the config's [tasks] entry ({ADAPTERS / 'qa'})" in text  # the words say the same


# ---------------------------------------------------------------- old and new peers


class _OldErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    request_id: str
    code: str
    message: str


class _OldAdminReply(msgspec.Struct, frozen=True, kw_only=True, tag="admin_reply"):
    request_id: str
    message: str


def test_the_new_fields_keep_old_and_new_peers_decoding():
    old_error = msgspec.msgpack.encode(_OldErrorReply(request_id="r", code=ErrorCode.OVERLOADED, message="busy"))
    assert msgspec.msgpack.decode(old_error, type=ErrorReply) == ErrorReply(
        request_id="r", code=ErrorCode.OVERLOADED, message="busy")  # every fact None
    new_error = ErrorReply(request_id="r", code=ErrorCode.OVERLOADED, message="busy", field="prompt",
                           in_flight=InFlightCounts(requests=1, this_connection=1, limit=1),
                           context_overflow=ContextOverflow(context_length=8, prompt_tokens=9))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new_error), type=_OldErrorReply).message == "busy"
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new_error), type=ErrorReply) == new_error
    old_admin = msgspec.msgpack.encode(_OldAdminReply(request_id="a", message="added"))
    assert msgspec.msgpack.decode(old_admin, type=AdminReply).replaces_config_entry is None
    new_admin = AdminReply(request_id="a", message="added",
                           replaces_config_entry=ReplacedConfigEntry(adapter_dir="/a", kept_across_restarts=False))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new_admin), type=_OldAdminReply).message == "added"
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new_admin), type=AdminReply) == new_admin


def _admin_adder(model_dir: Path, tmp_path: Path) -> Callable[[str, Path], AdminReply]:
    """AddTask through the coordinator's TaskCalls (serve/admin.py), no processes and no state
    directory, on a registry serving the config's task 'qa': the AdminReply a client reads."""
    import asyncio

    from inlaid.protocol import AddTask
    from inlaid.serve.admin import TaskCalls
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.dynamic_tasks import DynamicTasks
    from inlaid.serve.executor_pool import ExecutorPool
    from inlaid.serve.task_registry import TaskRegistry

    config = config_from_dict({"model": {"dir": str(model_dir)}, "tasks": {"qa": str(ADAPTERS / "qa")},
                               "executor": {"max_num_seqs": 4, "num_kv_blocks": 64, "max_lora_slots": 2}},
                              base_dir=tmp_path)
    registry = TaskRegistry(ExecutorPool(config, lambda: None).engines, "0123456789abcdef")
    registry.add("qa", str(ADAPTERS / "qa"))
    replies: list[Any] = []
    calls = TaskCalls(registry, lambda identity, message: replies.append(message),
                      DynamicTasks(config, registry, wake=lambda: None))

    async def call(name: str, path: Path) -> Any:
        calls.admin(b"c", AddTask(request_id=name, name=name, adapter_dir=str(path), token="0123456789abcdef"))
        await asyncio.gather(*calls.pending)
        return replies[-1]

    def add(name: str, path: Path) -> AdminReply:
        reply = asyncio.run(call(name, path))
        assert isinstance(reply, AdminReply), reply
        return msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=AdminReply)

    return add


def test_the_add_task_admin_reply_carries_the_replaced_entry(model_dir, tmp_path):
    """The coordinator's AddTask answer (serve/admin.py) carries what DynamicTasks says it replaced."""
    add = _admin_adder(model_dir, tmp_path)
    replaced = add("qa", ADAPTERS / "math")  # another adapter than the config's (its own path: already served)
    assert replaced.replaces_config_entry == ReplacedConfigEntry(adapter_dir=str(ADAPTERS / "qa"),
                                                                 kept_across_restarts=False), replaced
    assert add("fresh", ADAPTERS / "math").replaces_config_entry is None


def test_an_unknown_task_refusal_carries_the_served_tasks(model_dir, tmp_path):
    """The front's 404 lists the server's tasks from the reply's list, whatever its words (it
    read them after "; this server has: ")."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)},
                                                "tasks": {"qa": str(ADAPTERS / "qa"),
                                                          "math": str(ADAPTERS / "math")}}, base_dir=tmp_path))
    coordinator.replies = []
    coordinator.in_flight._send = lambda identity, message: coordinator.replies.append(message)
    refused = _refusal(coordinator, b"c", Generate(request_id="u", prompt="hi", task="nope"))
    assert (refused.code, refused.field, refused.known_tasks) == (ErrorCode.UNKNOWN_TASK, "task", ["math", "qa"])
    reworded = msgspec.structs.replace(refused, message="no such adapter here")
    answer = from_inlaid(error_from_reply(reworded), model="nope", base_model="base")
    assert (answer.status, answer.param) == (404, "model")
    assert answer.message == "The model `nope` does not exist; this server has: `base` (the base model), `math`, `qa`."


def test_an_addition_of_the_path_a_task_serves_says_nothing_was_read_again(model_dir, tmp_path):
    """Without a state directory the registry keeps the caller's path: adding it again under the
    same name, its files unchanged, changes nothing, while the front answered "added
    successfully" and, for a config task, "it replaces the config's [tasks] entry" (an outside
    probe of the HTTP front). Files changed there are loaded again (test_adapter_files_changed)."""
    from inlaid.http.app import _replacement_notice

    add = _admin_adder(model_dir, tmp_path)
    again = add("qa", ADAPTERS / "qa")  # the config's own path
    assert again.already_served and again.replaces_config_entry is None, again
    assert _replacement_notice(again.replaces_config_entry, again.hessians_dropped, again.already_served) == (
        " Note: it already served these files; nothing was loaded again.")
    other = add("qa", ADAPTERS / "math")  # another path: replaced, and said so
    assert not other.already_served and other.replaces_config_entry is not None, other


def test_an_inbox_refusal_says_how_many_messages_wait(model_dir, tmp_path):
    """A frame past its connection's bound in the coordinator's inbox is refused with the count
    that waits (`queued_messages`): the HTTP front words it for its callers from that fact."""
    from inlaid.serve.front_inbox import FrontInbox

    coordinator = _coordinator(model_dir, tmp_path)
    sent: list[Any] = []
    coordinator._send = lambda identity, message: sent.append(message)
    coordinator._inbox = FrontInbox(None, 2, 1 << 20, on_read=lambda frame: None,  # type: ignore[arg-type]
                                    dropped=lambda identity: False, handle=lambda identity, body: None,
                                    refuse=coordinator._refuse_queued, refuse_dropped=lambda: None)
    frame = msgspec.msgpack.encode(Generate(request_id="late", prompt="hi"))
    assert coordinator._inbox.put(b"front", [frame]) and coordinator._inbox.put(b"front", [frame])
    coordinator._refuse_queued(b"front", [frame])
    refused = msgspec.msgpack.decode(msgspec.msgpack.encode(sent[-1]), type=ErrorReply)
    assert (refused.request_id, refused.code, refused.queued_messages) == ("late", ErrorCode.OVERLOADED, 2), refused
