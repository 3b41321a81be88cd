"""StartupHold (serve/startup_hold.py): what a starting server answers at once, what it holds,
in which order it lets the held requests in, what it refuses past its bound, and how it
refuses what it holds when the start ends in a shutdown or a failure."""

from __future__ import annotations

import asyncio

import msgspec

from inlaid.protocol import (
    AddTask, Cancel, ErrorCode, ErrorReply, Generate, GetStats, Health, ListTasks, RemoveTask, TaskStatus,
)
from inlaid.serve.startup_hold import StartupHold


def _generate(request_id: str) -> Generate:
    return Generate(request_id=request_id, prompt="hi")


class _RecordingInFlight:
    """Stands in for InFlight's one method the hold calls: records each refused generate."""

    def __init__(self) -> None:
        self.refused: list[tuple[bytes, str, str]] = []

    def refuse_unadmitted(self, identity: bytes, message: Generate, code: str, text: str) -> None:
        self.refused.append((identity, message.request_id, code))

    def running(self, identity: bytes, request_id: str) -> bool:
        return False  # nothing is admitted while these tests' server starts


def test_read_only_calls_pass_the_rest_waits_in_arrival_order_and_gone_clients_drop_out():
    in_flight, sent = _RecordingInFlight(), []
    hold = StartupHold(4, in_flight, lambda identity, message: sent.append((identity, message)))  # type: ignore[arg-type]
    for message in (Health(request_id="h"), GetStats(request_id="s"), ListTasks(request_id="l"),
                    TaskStatus(request_id="t", name="x")):
        assert not hold.holds(b"a", message)
    arrivals = [(b"a", _generate("g1")), (b"b", _generate("g2")), (b"a", Cancel(request_id="g1")),
                (b"c", RemoveTask(request_id="r", name="x")), (b"b", _generate("g3")),
                (b"c", AddTask(request_id="add", name="y", adapter_dir="/a"))]
    assert all(hold.holds(identity, message) for identity, message in arrivals)
    # past the bound: answered at once, overloaded (a generate counted by in_flight)
    assert len(hold) == 4 and in_flight.refused == [(b"b", "g3", ErrorCode.OVERLOADED)]
    assert [(identity, m.request_id, m.code) for identity, m in sent] == [(b"c", "add", ErrorCode.OVERLOADED)]
    hold.forget(b"b")
    handled: list[tuple[bytes, str]] = []
    asyncio.run(hold.release(lambda identity, message, arrived: handled.append((identity, message.request_id))))
    assert handled == [(b"a", "g1"), (b"a", "g1"), (b"c", "r")] and len(hold) == 0  # b's generate left with b
    assert not hold.starting and not hold.holds(b"a", _generate("g4"))  # served: nothing waits any more


def test_a_start_that_ends_in_a_shutdown_refuses_what_it_held():
    """A held admin call must not run while the server stops (it used to be carried out), a
    held generate is refused and counted, a held cancel needs no answer."""
    in_flight, sent = _RecordingInFlight(), []
    hold = StartupHold(8, in_flight, lambda identity, message: sent.append(message))  # type: ignore[arg-type]
    for message in (_generate("g"), Cancel(request_id="g"), RemoveTask(request_id="r", name="x")):
        assert hold.holds(b"a", message)
    asyncio.run(hold.release(hold.refusing("the server shut down before it served")))
    assert in_flight.refused == [(b"a", "g", ErrorCode.SHUTTING_DOWN)]
    assert [(m.request_id, m.code, m.message) for m in sent] == [
        ("r", ErrorCode.SHUTTING_DOWN, "the server shut down before it served")]


def test_a_starting_coordinator_refuses_generates_past_the_bound_as_overloaded_and_counts_them(model_dir, tmp_path):
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)},
                                                "server": {"max_pending_requests": 2}}, base_dir=tmp_path))
    replies: list[object] = []
    coordinator.in_flight._send = lambda identity, message: replies.append(message)
    for number in range(3):
        coordinator._handle(b"client", [msgspec.msgpack.encode(_generate(f"g{number}"))])
    assert len(coordinator.startup) == 2 and len(replies) == 1
    refused = replies[0]
    assert isinstance(refused, ErrorReply) and (refused.request_id, refused.code) == ("g2", ErrorCode.OVERLOADED)
    assert "starting" in refused.message and "holds 2 requests" in refused.message
    assert (coordinator.counters["received"], coordinator.counters["overloaded"]) == (1, 1)
    assert 'inlaid_requests_total{outcome="overloaded",task="__base__"} 1.0' in coordinator.metrics.exposition()


def test_a_held_generates_deadline_counts_from_its_arrival(model_dir, tmp_path):
    """Held through a long start-up tuning, a generate with deadline_s 0.3 got 0.3 s more from
    its release (the start could take minutes); its deadline is past once let in, and its
    latency counts its wait."""
    import time

    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    replies: list[object] = []
    coordinator.in_flight._send = lambda identity, message: replies.append(message)
    late = Generate(request_id="late", prompt="hi", deadline_s=0.3)
    coordinator._handle(b"client", [msgspec.msgpack.encode(late)])
    time.sleep(0.5)  # the start-up goes on

    async def serve_then_wait() -> None:
        await coordinator.startup.release(coordinator._answer)
        await asyncio.sleep(0.05)  # the deadline's timer fires at once (never 0.3 s later)

    asyncio.run(serve_then_wait())
    assert [(r.request_id, r.code) for r in replies] == [("late", ErrorCode.DEADLINE_EXCEEDED)], replies
    assert not coordinator.in_flight.requests


def test_an_id_held_while_starting_gets_one_end(model_dir, tmp_path):
    """A second generate, a refused frame or an info call under the id of a held generate
    was answered under that id (a shutdown then refused both generates under it too): two
    ends for one request. Each is answered under no id now; the held one ends once."""
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    replies: list[ErrorReply] = []
    coordinator.in_flight._send = coordinator._send = lambda identity, message: replies.append(message)
    for frame in (_generate("g"), _generate("g"), {"type": "bogus", "request_id": "g"}, GetStats(request_id="g"),
                  _generate("other")):
        coordinator._handle(b"client", [msgspec.msgpack.encode(frame)])
    assert len(coordinator.startup) == 2
    assert [(reply.code, reply.request_id) for reply in replies] == [
        (ErrorCode.INVALID_REQUEST, ""), (ErrorCode.UNKNOWN_MESSAGE, ""), (ErrorCode.INVALID_REQUEST, "")]
    asyncio.run(coordinator.startup.release(coordinator.startup.refusing("the server shut down")))
    assert [(reply.code, reply.request_id) for reply in replies[3:]] == [
        (ErrorCode.SHUTTING_DOWN, "g"), (ErrorCode.SHUTTING_DOWN, "other")]
    assert not coordinator.startup.holding(b"client", "g")


def test_an_admitted_id_or_an_invalid_one_is_not_taken_for_a_held_request(model_dir, tmp_path):
    """A generate whose id admission refuses ("") was recorded as held: every info call under
    "" was then refused while the server started, Health included (a review). And a duplicate
    of a generate already released (the release yields between messages) was held, to be
    refused under that id by a shutdown: two ends."""
    from inlaid.protocol import HealthReply
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    replies: list[object] = []
    coordinator.in_flight._send = coordinator._send = lambda identity, message: replies.append(message)
    coordinator.info_calls._reply = coordinator._send
    coordinator._handle(b"client", [msgspec.msgpack.encode(_generate(""))])
    coordinator._handle(b"client", [msgspec.msgpack.encode(Health(request_id=""))])
    assert len(coordinator.startup) == 1 and [type(reply) for reply in replies] == [HealthReply]
    coordinator.in_flight.generate(b"client", _generate("x"))  # released and admitted
    coordinator._handle(b"client", [msgspec.msgpack.encode(_generate("x"))])
    assert len(coordinator.startup) == 1
    refused = replies[-1]
    assert isinstance(refused, ErrorReply) and (refused.code, refused.request_id) == (ErrorCode.INVALID_REQUEST, "")
