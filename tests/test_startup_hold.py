"""StartupHold (serve/startup_hold.py): what a starting server answers at once, what it holds,
in which order it lets the held requests in, and what it refuses past its bound."""

from __future__ import annotations

from inlaid.protocol import Cancel, GetStats, Generate, Health, ListTasks, RemoveTask
from inlaid.serve.startup_hold import StartupHold


def _generate(request_id: str) -> Generate:
    return Generate(request_id=request_id, prompt="hi")


def test_read_only_calls_pass_the_rest_waits_in_arrival_order_and_gone_clients_drop_out():
    refused: list[tuple[bytes, str, int]] = []
    hold = StartupHold(limit=4, overflow=lambda identity, message, held: refused.append(
        (identity, message.request_id, held)))
    for message in (Health(request_id="h"), GetStats(request_id="s"), ListTasks(request_id="l")):
        assert not hold.holds(b"a", message)
    arrivals = [(b"a", _generate("g1")), (b"b", _generate("g2")), (b"a", Cancel(request_id="g1")),
                (b"c", RemoveTask(request_id="r", name="x")), (b"b", _generate("g3"))]
    assert all(hold.holds(identity, message) for identity, message in arrivals)
    assert len(hold) == 4 and refused == [(b"b", "g3", 4)]  # past the bound: answered, not held
    hold.forget(b"b")
    handled: list[tuple[bytes, str]] = []
    hold.release(lambda identity, message: handled.append((identity, message.request_id)))
    assert handled == [(b"a", "g1"), (b"a", "g1"), (b"c", "r")] and len(hold) == 0  # b's generate left with b
    assert not hold.starting and not hold.holds(b"a", _generate("g4"))  # served: nothing waits any more


def test_a_starting_coordinator_refuses_generates_past_the_bound_as_overloaded_and_counts_them(model_dir, tmp_path):
    import msgspec

    from inlaid.protocol import ErrorCode, ErrorReply
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)},
                                                "server": {"max_pending_requests": 2}}, base_dir=tmp_path))
    replies: list[object] = []
    coordinator._send = lambda identity, message: replies.append(message)  # type: ignore[method-assign]
    for number in range(3):
        coordinator._handle(b"client", [msgspec.msgpack.encode(_generate(f"g{number}"))])
    assert len(coordinator.startup) == 2 and len(replies) == 1
    refused = replies[0]
    assert isinstance(refused, ErrorReply) and (refused.request_id, refused.code) == ("g2", ErrorCode.OVERLOADED)
    assert "starting" in refused.message and "holds 2 requests" in refused.message
    assert (coordinator.counters["received"], coordinator.counters["overloaded"]) == (1, 1)
    assert 'inlaid_requests_total{outcome="overloaded",task="__base__"} 1.0' in coordinator.metrics.exposition()
