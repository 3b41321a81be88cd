"""`FrontReplies` on a real ROUTER in process (no server): a reply to a peer that is gone is
dropped silently, as the ROUTER did before ZMQ_ROUTER_MANDATORY; a peer whose queue is full
is cut off once, reported after the send returns, and gets nothing more until forgotten or let
back in a second later."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from inlaid.serve.peers import FrontReplies, front_socket


async def _router_with_reader_less_peer(sndhwm: int) -> tuple[zmq.asyncio.Socket, zmq.Socket, bytes]:
    front = front_socket(max_frame_bytes=1 << 20, max_pending_requests=1)
    front.setsockopt(zmq.SNDHWM, sndhwm)  # before bind: the pipes take it
    port = front.bind_to_random_port("tcp://127.0.0.1")
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.RCVHWM, 1)
    peer.setsockopt(zmq.RCVBUF, 4096)
    peer.connect(f"tcp://127.0.0.1:{port}")
    peer.send(b"hello")
    identity, _ = await asyncio.wait_for(front.recv_multipart(), 10)
    return front, peer, identity



async def _send_until_cut_off(replies: FrontReplies, identity: bytes) -> None:
    """Replies to a peer that reads none, until its queue is full and it is cut off."""
    sent = 0
    while identity not in replies.cut_off_at and sent < 100_000:
        replies.send(identity, b"x" * 1000)
        sent += 1
        if sent % 50 == 0:
            await asyncio.sleep(0.01)  # let the I/O thread fill the kernel buffers

def test_the_front_socket_is_bounded_and_mandatory():
    front = front_socket(max_frame_bytes=1 << 20, max_pending_requests=1024)
    try:
        assert front.getsockopt(zmq.SNDHWM) == 4096  # four per request a connection may hold, not 100,000
        assert front.getsockopt(zmq.MAXMSGSIZE) == 16 << 20
    finally:
        front.close(linger=0)


def test_a_reply_to_a_vanished_peer_is_dropped_silently():
    async def scenario() -> tuple[list[bytes], set[bytes]]:
        front, peer, _ = await _router_with_reader_less_peer(sndhwm=10)
        cut: list[bytes] = []
        replies = FrontReplies(front, cut.append)
        try:
            replies.send(b"\x00never-connected", b"reply")  # EHOSTUNREACH under ROUTER_MANDATORY
            await asyncio.sleep(0.05)
            return cut, set(replies.cut_off_at)
        finally:
            peer.close()
            front.close(linger=0)

    assert asyncio.run(scenario()) == ([], set())


def test_a_peer_that_never_reads_is_cut_off_once_after_the_send():
    async def scenario() -> tuple[list[bytes], list[bytes], bytes, int]:
        front, peer, identity = await _router_with_reader_less_peer(sndhwm=10)
        cut: list[bytes] = []
        replies = FrontReplies(front, cut.append)
        try:
            await _send_until_cut_off(replies, identity)
            cut_during_send = list(cut)  # reported later, never inside the send's caller
            replies.send(identity, b"dropped")  # no second report, no exception
            await asyncio.sleep(0.05)
            replies.forget(identity)  # disconnected: a chosen identity may come back
            return cut_during_send, cut, identity, len(replies.cut_off_at)
        finally:
            peer.close()
            front.close(linger=0)

    during, after, identity, still_unread = asyncio.run(scenario())
    assert during == [] and after == [identity] and still_unread == 0


def test_a_cut_off_peer_that_reads_again_is_let_back_in(monkeypatch):
    """Cut off for good (until a disconnect the SDK never makes), the HTTP front, one
    connection for all its users, stayed silent after falling behind once."""
    import inlaid.serve.peers as peers

    monkeypatch.setattr(peers, "READMIT_AFTER_S", 0.2)

    async def scenario() -> tuple[bool, bool, bool, bytes]:
        front, peer, identity = await _router_with_reader_less_peer(sndhwm=10)
        replies = FrontReplies(front, lambda identity: None)
        try:
            await _send_until_cut_off(replies, identity)
            dropped_at_once = replies.is_cut_off(identity)
            while peer.poll(200):  # the client reads its backlog now
                peer.recv()
            await asyncio.sleep(0.25)
            let_back = not replies.is_cut_off(identity)
            replies.send(identity, b"served again")
            answer = b""
            while peer.poll(2000):
                answer = peer.recv()
                if answer == b"served again":
                    break
            return dropped_at_once, let_back, identity not in replies.cut_off_at, answer
        finally:
            peer.close()
            front.close(linger=0)

    assert asyncio.run(scenario()) == (True, True, True, b"served again")

def test_an_unreadable_field_still_names_its_request_and_what_went_wrong() -> None:
    """Bad UTF-8 in the prompt made the whole frame "not valid msgpack" with no request id, so
    its sender waited for its timeout; an unknown field's 1 MB name came back whole."""
    import msgspec

    from inlaid.protocol import ErrorCode, ErrorReply
    from inlaid.serve.frames import decode_client_frames

    frame = msgspec.msgpack.encode({"type": "generate", "request_id": "u8", "prompt": "x"})
    refused = decode_client_frames([frame.replace(b"\xa1x", b"\xa1\xff")], 1 << 20)
    assert (refused.request_id, refused.code) == ("u8", ErrorCode.MALFORMED)
    assert "utf-8" in refused.message and "0xff" in refused.message, refused.message
    named = decode_client_frames([msgspec.msgpack.encode({"type": "generate", "request_id": "big", "prompt": "x",
                                                          "z" * 1_000_000: 1})], 1 << 22)
    assert named.request_id == "big" and "unknown field `zzz" in named.message and len(named.message) < 700
    long_id = decode_client_frames([msgspec.msgpack.encode({"type": "nope", "request_id": "r" * 300})], 1 << 20)
    assert (long_id.request_id, long_id.code) == ("", ErrorCode.UNKNOWN_MESSAGE)
    # Each info and admin call with an id past 256 characters is refused, the id not echoed;
    # Generate's admission refuses (and counts) its own, and a Cancel is never answered.
    for kind in ("hello", "health", "stats", "metrics", "list_tasks", "task_status", "add_task", "remove_task"):
        fields = {"type": kind, "request_id": "r" * 257, "protocol_version": 1, "name": "t", "adapter_dir": "/a"}
        fields = {k: v for k, v in fields.items() if k in {"type", "request_id"} | _REQUIRED.get(kind, set())}
        refused = decode_client_frames([msgspec.msgpack.encode(fields)], 1 << 20)
        assert isinstance(refused, ErrorReply), (kind, refused)
        assert (refused.request_id, refused.code, refused.field) == ("", ErrorCode.INVALID_REQUEST, "request_id")
        assert "too long: at most 256 characters" in refused.message and len(refused.message) < 200
        assert decode_client_frames([msgspec.msgpack.encode({**fields, "request_id": "r" * 256})], 1 << 20).request_id \
            == "r" * 256
    for kind in ("generate", "cancel"):
        fields = {"type": kind, "request_id": "r" * 300, **({"prompt": "x"} if kind == "generate" else {})}
        assert decode_client_frames([msgspec.msgpack.encode(fields)], 1 << 20).request_id == "r" * 300


_REQUIRED = {"hello": {"protocol_version"}, "task_status": {"name"}, "remove_task": {"name"},
             "add_task": {"name", "adapter_dir"}}


def test_a_malformed_frame_is_explained_without_decoding_it_whole(monkeypatch) -> None:
    """Reading a refused frame's type and request_id decoded all of it, untyped: 1 MB of nested
    arrays cost the coordinator's event loop 0.3-0.5 s a frame (an outside probe's 30 frames
    made another client's 1-token call take 4.6 s). Only the two fields are read now."""
    import msgspec

    import inlaid.serve.frames as frames
    from inlaid.protocol import ErrorCode

    whole_decodes: list[int] = []
    real_decode = msgspec.msgpack.decode

    def counting_decode(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(data) > 1000:
            whole_decodes.append(len(data))
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(frames.msgspec.msgpack, "decode", counting_decode)
    for poison in ([[] for _ in range(200_000)], [[[0]] for _ in range(100_000)]):
        frame = msgspec.msgpack.encode({"type": "generate", "request_id": "poison", "prompt_token_ids": poison})
        refused = frames.decode_client_frames([frame], 1 << 22)
        assert (refused.request_id, refused.code) == ("poison", ErrorCode.MALFORMED), refused
        assert "prompt_token_ids" in refused.message, refused.message
    unknown = frames.decode_client_frames([msgspec.msgpack.encode({"type": "nope", "request_id": "k",
                                                                   "pad": [[] for _ in range(100_000)]})], 1 << 22)
    assert (unknown.request_id, unknown.code) == ("k", ErrorCode.UNKNOWN_MESSAGE)
    not_a_map = frames.decode_client_frames([msgspec.msgpack.encode([1, 2, 3])], 1 << 20)
    assert (not_a_map.request_id, not_a_map.code) == ("", ErrorCode.MALFORMED) and "array" in not_a_map.message
    # bytes that read as a msgpack int (0xff is -1): the refusal says what a message is, not "Expected `object`"
    garbage = frames.decode_client_frames([b"\xff\xfe\x00garbage"], 1 << 20)
    assert garbage.message.startswith("invalid message: a message is one msgpack map with a string `type`"), garbage
    # the poison in the two fields read (a reviewer): neither is decoded unless a string
    nested = [[[0]] for _ in range(100_000)]
    for fields in ({"type": nested, "request_id": "t"}, {"type": "generate", "request_id": nested}):
        refused = frames.decode_client_frames([msgspec.msgpack.encode(fields)], 1 << 22)
        named = "t" if fields["request_id"] == "t" else ""
        assert (refused.code, refused.request_id) == (ErrorCode.MALFORMED, named)
    # a map with another scalar key still names its request
    other_key = frames.decode_client_frames([msgspec.msgpack.encode({"type": "generate", "request_id": "r4", 1: 2})],
                                            1 << 20)
    assert (other_key.request_id, other_key.code) == ("r4", ErrorCode.MALFORMED), other_key
    assert whole_decodes == []


def test_a_malformed_frame_names_its_field_in_the_reply_not_only_in_the_message() -> None:
    """`malformed` replies left ErrorReply.field None (`invalid_request` ones set it), so a
    program had to read the message's words (an outside probe)."""
    import msgspec

    from inlaid.protocol import ErrorCode
    from inlaid.serve.frames import decode_client_frames

    def field_of(fields: dict) -> str | None:
        refused = decode_client_frames([msgspec.msgpack.encode({"type": "generate", "request_id": "f", **fields})],
                                       1 << 22)
        assert refused.code == ErrorCode.MALFORMED, refused
        return refused.field

    assert field_of({"prompt": "Hi", "sampling": {"temperature": "0"}}) == "sampling.temperature"
    assert field_of({"prompt": "Hi", "sampling": {"temprature": 0}}) == "sampling.temprature"
    assert field_of({"prompt_token_ids": [1, "a"]}) == "prompt_token_ids[1]"
    assert field_of({"prompt": "Hi", "colour": 1}) == "colour"
    long_name = field_of({"prompt": "x", "z" * 1_000_000: 1})
    assert long_name is not None and long_name.startswith("zzz") and len(long_name) < 200
    missing = decode_client_frames([msgspec.msgpack.encode({"type": "generate", "prompt": "Hi"})], 1 << 20)
    assert missing.field == "request_id"


def test_the_front_inbox_bounds_each_connection_and_takes_them_in_turn() -> None:
    """The ROUTER's reading must not pause (a paused read could abort libzmq 4.3.5), so the
    bound per connection is the inbox's; frames are handled one connection after another."""
    from inlaid.serve.front_inbox import FrontInbox

    async def scenario() -> None:
        inbox = FrontInbox(None, 3, 10, on_read=lambda frame: None,  # type: ignore[arg-type]
                           dropped=lambda identity: False, handle=lambda identity, body: None,
                           refuse=lambda identity, body: None, refuse_dropped=lambda: None)
        assert [inbox.put(b"a", [b"a%d" % i]) for i in range(5)] == [True, True, True, False, False]
        assert inbox.put(b"a", [b"cancel"], force=True)  # a Cancel is queued past the bound
        assert inbox.put(b"b", [b"b0"]) and inbox.put(b"c", [b"c0"]) and inbox.waiting(b"a")
        taken = [inbox.take() for _ in range(3)]
        assert taken == [(b"a", [b"a0"]), (b"b", [b"b0"]), (b"c", [b"c0"])]  # a flood does not go first for long
        assert not inbox.waiting(b"b") and inbox.waiting(b"a")
        assert not inbox.put(b"a", [b"a3"])  # three wait again (a1, a2, the Cancel)
        assert (inbox.queued(b"a"), inbox.queued(b"b")) == (3, 0)  # what a refusal says (queued_messages)
        assert inbox.forget(b"a") == 3  # a peer reported gone: what it left is not handled
        assert inbox.take() is None and not inbox.waiting(b"a")
        # the bytes bound: 64 frames of the largest size a connection may have waiting
        assert inbox.max_bytes == 640 and all(inbox.put(b"d", [b"x" * 10]) for _ in range(3))
        big = FrontInbox(None, 1000, 10, on_read=lambda frame: None,  # type: ignore[arg-type]
                         dropped=lambda identity: False, handle=lambda identity, body: None,
                         refuse=lambda identity, body: None, refuse_dropped=lambda: None)
        assert sum(big.put(b"e", [b"x" * 10]) for _ in range(100)) == 64

    asyncio.run(scenario())


def test_refusals_for_a_full_backlog_are_logged_at_most_every_ten_seconds(caplog, monkeypatch) -> None:
    """Thousands a second in a flood: one WARNING per interval, counting them (none at all
    before: only /metrics' frames_refused told of them)."""
    from inlaid.serve import front_inbox

    clock = [100.0]
    monkeypatch.setattr(front_inbox, "_refusal_clock", lambda: clock[0])
    inbox = front_inbox.FrontInbox(None, 1, 10, on_read=lambda frame: None,  # type: ignore[arg-type]
                                   dropped=lambda identity: False, handle=lambda identity, body: None,
                                   refuse=lambda identity, body: None, refuse_dropped=lambda: None)
    inbox.put(b"a", [b"x"])
    with caplog.at_level("WARNING", logger="inlaid.coordinator"):
        for _ in range(500):
            inbox.log_refused(b"a")
        clock[0] += front_inbox.REFUSALS_LOGGED_EVERY_S
        inbox.log_refused(b"a")
    lines = [r for r in caplog.records if "messages refused" in r.getMessage()]
    assert [(r.refused, r.queued, r.limit) for r in lines] == [(1, 1, 1), (500, 1, 1)]
