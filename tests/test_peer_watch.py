"""The coordinator's view of its clients' connections (`inlaid.serve.peers.PeerWatch`), on
real ZeroMQ sockets: which peer went away, reported once, and only after the frames it sent
before closing (a Cancel) have been read.
"""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from inlaid.serve.peers import PeerWatch


def test_peer_watch_names_the_peer_that_disconnected():
    async def scenario() -> tuple[list[bytes], bytes, bytes]:
        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        gone: list[bytes] = []
        watch = PeerWatch(router, gone.append)
        watcher = asyncio.get_running_loop().create_task(watch.run())
        identities = []
        for name in (b"first", b"second"):
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, name)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"hello")
            frames = await asyncio.wait_for(router.recv_multipart(copy=False), 10)
            watch.saw(frames[0])
            identities.append(frames[0].bytes)
            dealer.close(linger=0)  # the second one may reuse the first one's descriptor
            for _ in range(500):
                if name in gone:
                    break
                await asyncio.sleep(0.01)
        watcher.cancel()
        watch.close()
        router.close(linger=0)
        context.term()
        return gone, identities[0], identities[1]

    gone, first, second = asyncio.run(scenario())
    assert gone == [first, second], gone  # each reported once, in order, none by mistake


def _router_with_watch(settle_s: float):  # type: ignore[no-untyped-def]
    context = zmq.asyncio.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    events: list[str] = []
    watch = PeerWatch(router, lambda identity: events.append(f"gone {identity!r}"), settle_s=settle_s)
    watcher = asyncio.get_running_loop().create_task(watch.run())

    def close() -> None:  # in a finally: a context left open hangs whichever later test collects it
        watcher.cancel()
        watch.close()
        context.destroy(linger=0)

    return router, port, watch, events, close


async def _read(router, watch, events: list[str]) -> bytes:  # type: ignore[no-untyped-def]
    frames = await asyncio.wait_for(router.recv_multipart(copy=False), 10)
    watch.saw(frames[0])
    events.append(frames[1].bytes.decode())
    return frames[0].bytes


def test_a_peer_that_sends_and_closes_is_reported_gone_after_its_last_frame_is_read():
    """The monitor's disconnect and the peer's last frame arrive on two sockets: a client that
    sent a Cancel and closed (the SDK after a timeout) was reported gone first, and its request
    counted abandoned. Here the front reads nothing for 0.5 s after the close (busy): the report
    waits for the queued frame, then comes at once."""

    async def scenario() -> tuple[list[str], float]:
        router, port, watch, events, close = _router_with_watch(settle_s=0.05)
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        try:
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"generate")
            await _read(router, watch, events)
            dealer.send(b"cancel")
            dealer.close(linger=1000)
            await asyncio.sleep(0.5)  # the disconnect is seen meanwhile (the watcher runs)
            await _read(router, watch, events)
            read_at = time.monotonic()
            for _ in range(300):
                if events[-1].startswith("gone"):
                    break
                await asyncio.sleep(0.01)
            return events, time.monotonic() - read_at
        finally:
            dealer.close(linger=0)
            close()

    events, waited = asyncio.run(scenario())
    assert [event.split(" ")[0] for event in events] == ["generate", "cancel", "gone"], events
    assert waited < 1.0  # reported once nothing waits, not at the 2 s bound


def test_a_peer_with_its_own_identity_that_reconnects_at_once_is_not_reported_gone_after_it():
    """Its report waited for the settle time: the peer, back on the same descriptor (the
    lowest free one) under its identity, was then reported gone after its new frame, and its
    new requests abandoned (a reviewer's finding). A chosen identity is reported at the event."""

    settle_s = 3.0  # a wide window: a report that waits for it comes after the peer is back

    async def scenario() -> list[str]:
        router, port, watch, events, close = _router_with_watch(settle_s=settle_s)
        loop = asyncio.get_running_loop()
        dealers = []
        try:
            for text in ("first", "again"):
                dealers.append(dealer := zmq.Context.instance().socket(zmq.DEALER))
                dealer.setsockopt(zmq.IDENTITY, b"fixed")
                dealer.connect(f"tcp://127.0.0.1:{port}")
                dealer.send(text.encode())
                await _read(router, watch, events)
                if text == "first":
                    dealer.close(linger=1000)
                    closed = loop.time()
                    # Back within the settle time, once the close is through: the ROUTER refuses an
                    # identity whose old connection it still has (a fixed 0.2 s was too short for
                    # a loaded machine: the frame was dropped). A report at the event is seen here;
                    # one waiting for the settle time is not, and comes after "again".
                    while "gone b'fixed'" not in events and loop.time() - closed < settle_s - 0.5:
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.2)
            await asyncio.sleep(max(0.0, settle_s + 0.5 - (loop.time() - closed)))
            return events
        finally:
            for dealer in dealers:
                dealer.close(linger=0)
            close()

    assert asyncio.run(scenario()) == ["first", "gone b'fixed'", "again"]


def test_a_departed_peers_late_frame_does_not_take_over_its_descriptor():
    """A's last frame, read after its disconnect and after B's first frame on the reused
    descriptor, mapped the descriptor back to A: B's own disconnect then named A, and B was
    never reported gone (its requests ran on). Each is reported once, whatever the order."""

    async def scenario() -> list[str]:
        router, port, watch, events, close = _router_with_watch(settle_s=0.05)
        first = zmq.Context.instance().socket(zmq.DEALER)
        second = zmq.Context.instance().socket(zmq.DEALER)
        try:
            first.connect(f"tcp://127.0.0.1:{port}")
            first.send(b"a-generate")
            a = await _read(router, watch, events)
            first.send(b"a-cancel")
            first.close(linger=1000)
            await asyncio.sleep(0.3)  # its disconnect seen, its Cancel not read yet
            second.connect(f"tcp://127.0.0.1:{port}")
            second.send(b"b-hello")
            identities = {await _read(router, watch, events), await _read(router, watch, events)}
            b = (identities - {a}).pop()
            second.close(linger=1000)
            for _ in range(300):
                if sum(event.startswith("gone") for event in events) >= 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            return [event.replace(repr(a), "A").replace(repr(b), "B") for event in events]
        finally:
            first.close(linger=0)
            second.close(linger=0)
            close()

    events = asyncio.run(scenario())
    assert sorted(events[1:]) == sorted(["a-cancel", "b-hello", "gone A", "gone B"]), events
    assert events.index("gone A") > events.index("a-cancel")  # after its last frame
