"""Messages that name a server's tasks stay short with thousands of them: the first
SHOWN_NAMES and the count (an outside probe's server with 1,000 tasks answered an unknown
task with 7.1 KB over the SDK, 9.2 KB over HTTP, and logged a 9.7 KB start-up line)."""

from __future__ import annotations

import pytest

from inlaid.engine import Engine, EngineConfig, InvalidRequestError
from inlaid.http.errors import model_not_found
from inlaid.protocol import SHOWN_NAMES, SamplingParams, shown_names, unknown_task_message


def test_shown_names_lists_every_name_up_to_the_limit_then_the_first_ones_and_the_count() -> None:
    assert shown_names([]) == "none"
    assert shown_names(["a"]) == "a"
    few = [f"t{i}" for i in range(SHOWN_NAMES)]
    assert shown_names(few) == ", ".join(few)
    many = [f"t{i:04d}" for i in range(1000)]
    text = shown_names(many)
    assert text == ", ".join(many[:SHOWN_NAMES]) + ", ... (1000 in all)"
    assert "t0020" not in text


def test_an_unknown_task_among_a_thousand_is_answered_in_a_few_hundred_bytes() -> None:
    many = [f"a{i:04d}" for i in range(1000)]
    message = unknown_task_message("nope", many)
    assert len(message) < 400
    assert message.endswith("this server has: " + ", ".join(many[:SHOWN_NAMES]) + ", ... (1000 in all)")
    assert unknown_task_message("nope", ["a", "b"]).endswith("this server has: a, b")  # as before


def test_the_http_404_names_the_base_model_first_and_points_to_v1_models() -> None:
    many = [f"a{i:04d}" for i in range(1000)]
    error = model_not_found("nope", "base", many)
    assert len(error.message) < 500
    assert error.message.startswith("The model `nope` does not exist; this server has: `base` (the base model), "
                                    "`a0000`, `a0001`")
    assert error.message.endswith(", ... (1001 in all); GET /v1/models lists every one.")
    few = model_not_found("nope", "base", ["qa", "code"])
    assert few.message == "The model `nope` does not exist; this server has: `base` (the base model), `code`, `qa`."


@pytest.mark.usefixtures("one_torch_thread")
def test_the_engine_names_its_first_adapters_and_the_count(model_dir, adapter_dirs) -> None:
    engine = Engine(EngineConfig(model_dir=str(model_dir), max_lora_rank=32), runner=None)
    names = [f"task{i:02d}" for i in range(30)]
    for name in names:
        engine.register_adapter(name, str(adapter_dirs["attn-r8"]))
    with pytest.raises(InvalidRequestError) as refused:
        engine.add_request([1, 2, 3], sampling=SamplingParams(max_tokens=1), adapter="nope")
    assert str(refused.value) == ("unknown adapter/task 'nope'; known: " + ", ".join(names[:SHOWN_NAMES])
                                  + ", ... (30 in all)")


def test_a_refusal_carries_the_first_names_and_the_count_and_the_404_says_both() -> None:
    """The reply's `known_tasks` was every name (10 KB msgpack for 1,000 tasks, a reviewer);
    now the first SHOWN_NAMES and `known_tasks_total`, which the HTTP 404 counts from."""
    import msgspec

    from inlaid.http.errors import from_inlaid
    from inlaid.integrations.ray_client import unknown_task_error

    many = [f"a{i:04d}" for i in range(1000)]
    error = unknown_task_error("nope", many)
    assert error.reply.known_tasks == many[:SHOWN_NAMES] and error.reply.known_tasks_total == 1000
    assert len(msgspec.msgpack.encode(error.reply)) < 1000
    answer = from_inlaid(error, model="nope", base_model="base")
    assert answer.status == 404 and answer.message.endswith(", ... (1001 in all); GET /v1/models lists every one.")
    assert "`a0018`" in answer.message and "`a0019`" not in answer.message  # the base model is one of the 20


def test_the_404_from_a_reply_without_the_list_reads_the_count_from_its_words() -> None:
    """A reply with only its message (a server older than `known_tasks`): the shortened list's
    tail "... (25 in all)" was read as a model id."""
    from inlaid.client import UnknownTaskError
    from inlaid.http.errors import from_inlaid

    names = [f"t{i:02d}" for i in range(25)]
    answer = from_inlaid(UnknownTaskError(f"[unknown_task] {unknown_task_message('nope', names)}", "r"),
                         model="nope", base_model="base")
    assert "in all)`" not in answer.message
    assert answer.message.endswith(", `t18`, ... (26 in all); GET /v1/models lists every one.")
