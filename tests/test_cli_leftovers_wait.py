"""`wait_task` / `inlaid client add-task --wait` while the server stops answering.

The server here is a stand-in: a ZeroMQ ROUTER in a thread that speaks the wire protocol's
hello, add-task and task-status (a real `inlaid serve` needs a model and minutes). What is
tested is the real client: `Client.wait_task`, `AsyncClient.wait_task` and the CLI. The
stand-in can go silent (keeps its socket, answers nothing) and be stopped and restarted on
the same port, as a server restart would.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest
import zmq

from inlaid.cli import main
from inlaid.client import AsyncClient, Client, RequestTimeoutError, UnknownTaskError
from inlaid.protocol import (
    PROTOCOL_VERSION, AddTask, AdminReply, ClientRequest, ErrorCode, ErrorReply, Hello, HelloReply, RemoveTask,
    TaskStatus, TaskStatusReply,
)
from inlaid.serve.launcher import free_tcp_port

_requests = msgspec.msgpack.Decoder(ClientRequest)


class StandInServer:
    """Answers hello, add_task and task_status (phase from `self.phase`) while `answering`."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.phase = "requantizing"
        self.layers_done = 3
        self.answering = True
        self.removed = False  # set: task_status answers unknown_task, as a server after remove_task
        self.admin_token: str | None = None  # set: admin calls with another token are refused
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._bound = threading.Event()
        self._thread.start()
        assert self._bound.wait(5)

    def _reply(self, request: object) -> msgspec.Struct | None:
        if isinstance(request, Hello):
            return HelloReply(request_id=request.request_id, protocol_version=PROTOCOL_VERSION,
                              server_version="stand-in", model="none", max_model_len=64)
        if isinstance(request, (AddTask, RemoveTask)) and self.admin_token not in (None, request.token):
            return ErrorReply(request_id=request.request_id, code=ErrorCode.UNAUTHORIZED, message="unauthorized")
        if isinstance(request, AddTask):
            return AdminReply(request_id=request.request_id, message=f"task {request.name!r} added")
        if isinstance(request, RemoveTask):
            return AdminReply(request_id=request.request_id, message=f"task {request.name!r} removed")
        if isinstance(request, TaskStatus) and self.removed:
            return ErrorReply(request_id=request.request_id, code=ErrorCode.UNKNOWN_TASK,
                              message=f"unknown task {request.name!r}")
        if isinstance(request, TaskStatus):
            return TaskStatusReply(request_id=request.request_id, name=request.name, phase=self.phase,
                                   layers_done=self.layers_done, layers_total=10, version=1, served_version=0,
                                   layers_swapped=0)
        return None

    def _serve(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                peer, frame = sock.recv_multipart()
                reply = self._reply(_requests.decode(frame))
                if self.answering and reply is not None:
                    sock.send_multipart([peer, msgspec.msgpack.encode(reply)])
        finally:
            sock.close(linger=0)  # the client's monitor sees its connection end

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _restart_later(server: StandInServer, delay_s: float, box: list[StandInServer]) -> threading.Thread:
    """Stop `server` now; after `delay_s` a new one on the same address answers `ready`."""
    server.stop()

    def start() -> None:
        time.sleep(delay_s)
        replacement = StandInServer(server.address)
        replacement.phase = "ready"
        box.append(replacement)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


def test_wait_task_outlasts_a_silent_then_restarted_server() -> None:
    """It used to end with a timeout at the first poll left unanswered (after the client's
    whole timeout, saying nothing); now it reports the silence and picks the task up again."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)
    box: list[StandInServer] = []
    silences: list[tuple[float, TaskStatusReply | None]] = []
    statuses: list[str] = []
    try:
        with Client(address, timeout_s=0.5) as client:
            def on_status(status: TaskStatusReply) -> None:
                statuses.append(status.phase)
                if len(statuses) == 2:  # mid-wait: silent first, then gone, then back
                    server.answering = False
                    threading.Timer(0.8, lambda: _restart_later(server, 0.8, box)).start()

            final = client.wait_task("t", timeout_s=20, poll_s=0.05, on_status=on_status,
                                     on_silence=lambda s, last: silences.append((s, last)))
        assert final.phase == "ready"
        assert silences, "the silence was never reported"
        assert silences[0][1] is not None and silences[0][1].phase == "requantizing"
        assert statuses[:2] == ["requantizing", "requantizing"] and statuses[-1] == "ready"
    finally:
        server.stop()
        for replacement in box:
            replacement.stop()


def test_wait_task_gives_up_naming_the_last_progress() -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)
    try:
        with Client(address, timeout_s=0.3) as client:
            client.task_status("t")  # greeted; then the server goes quiet
            server.answering = False
            started = time.monotonic()
            # Silent from the wait's first poll (as a wrong address is): no server restarting
            # mid-job to wait for, so the client's own timeout (0.3 s) ends it, not timeout_s.
            with pytest.raises(RequestTimeoutError) as raised:
                client.wait_task("t", timeout_s=5.0, poll_s=0.05)
            assert "gave up" not in str(raised.value)
            assert time.monotonic() - started < 2.0

        async def async_wait() -> None:
            server.answering = True
            async with AsyncClient(address, timeout_s=0.3) as async_client:
                silences: list[float] = []

                def go_quiet(status: TaskStatusReply) -> None:
                    server.answering = False

                with pytest.raises(RequestTimeoutError, match=r"last known: requantizing, layers 3/10"):
                    await async_client.wait_task("t", timeout_s=1.0, poll_s=0.05, on_status=go_quiet,
                                                 on_silence=lambda s, last: silences.append(s))
                assert silences

        asyncio.run(asyncio.wait_for(async_wait(), 10))
    finally:
        server.stop()


def test_cli_wait_says_the_server_is_silent(capsys: pytest.CaptureFixture) -> None:
    """`add-task --wait` used to print nothing for the whole --timeout of each poll."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)
    try:
        threading.Timer(1.0, lambda: setattr(server, "answering", False)).start()
        code = main(["client", "--address", address, "--timeout", "0.5", "add-task", "t", ".", "--wait",
                     "--wait-timeout", "3"])
        err = capsys.readouterr().err
        assert code == 1
        assert "no answer from the server for" in err and "still waiting until" in err, err
        assert "gave up after 3 s (last known: requantizing, layers 3/10)" in err, err
    finally:
        server.stop()


def test_cli_admin_calls_print_json_with_json(capsys: pytest.CaptureFixture) -> None:
    """--json was taken by add-task and remove-task and ignored: their text line (and, with
    --wait, a text line before a JSON object) was no JSON a script could parse."""
    import json

    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)
    server.phase = "ready"
    try:
        for argv, expected in ((["add-task", "t", "."], "task 't' added"), (["remove-task", "t"], "task 't' removed")):
            assert main(["client", "--address", address, "--json", *argv]) == 0
            assert json.loads(capsys.readouterr().out)["message"] == expected
        assert main(["client", "--address", address, "add-task", "t", ".", "--wait", "--json"]) == 0
        document = json.loads(capsys.readouterr().out)  # one document: the add's reply and the wait's end
        assert document["added"]["message"] == "task 't' added" and document["final_status"]["phase"] == "ready"
        assert main(["client", "--address", address, "remove-task", "t"]) == 0  # without --json: the text
        assert capsys.readouterr().out == "task 't' removed\n"

        async def removed_async() -> AdminReply:  # the SDK's whole reply, as the sync client's
            async with AsyncClient(address, timeout_s=5) as client:
                return await client.remove_task_reply("t")

        assert asyncio.run(removed_async()).message == "task 't' removed"
    finally:
        server.stop()


def test_cli_refused_admin_call_says_whether_the_token_is_unset_or_empty(capsys: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)
    server.admin_token = "0123456789abcdef"
    try:
        for value, said in ((None, "INLAID_ADMIN_TOKEN is not set"), ("", "INLAID_ADMIN_TOKEN is empty")):
            if value is None:
                monkeypatch.delenv("INLAID_ADMIN_TOKEN", raising=False)
            else:
                monkeypatch.setenv("INLAID_ADMIN_TOKEN", value)  # it said "is not set" for a set, empty one
            assert main(["client", "--address", address, "remove-task", "t"]) == 1
            assert said in capsys.readouterr().err
    finally:
        server.stop()


def test_a_task_removed_while_waited_for_says_so() -> None:
    """Another admin's remove_task mid-wait ended `--wait` with a bare "unknown task 'job3'"."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)
    try:
        with Client(address, timeout_s=2.0) as client:
            def remove(status: TaskStatusReply) -> None:
                server.removed = True

            removed = r"^\[unknown_task\] task 't' was removed while this wait ran"
            with pytest.raises(UnknownTaskError, match=removed + r" \(last known: requantizing, layers 3/10\)$"):
                client.wait_task("t", timeout_s=10, poll_s=0.05, on_status=remove)
            # never known in this wait: the server's own words (a typo is no removal)
            with pytest.raises(UnknownTaskError, match=r"\] unknown task 't'$"):
                client.wait_task("t", timeout_s=10, poll_s=0.05)

        async def async_wait() -> None:
            server.removed = False
            async with AsyncClient(address, timeout_s=2.0) as async_client:
                with pytest.raises(UnknownTaskError, match=r"^\[unknown_task\] task 't' was removed while"):
                    await async_client.wait_task("t", timeout_s=10, poll_s=0.05,
                                                 on_status=lambda status: setattr(server, "removed", True))

        asyncio.run(asyncio.wait_for(async_wait(), 10))
    finally:
        server.stop()


def test_cli_wait_interrupted_says_the_server_goes_on(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """Ctrl-C during `add-task --wait` printed only "interrupted", as if the add were undone;
    the re-quantization goes on in the server (a first-user walkthrough)."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    server = StandInServer(address)

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "wait_task", interrupted)
    try:
        assert main(["client", "--address", address, "add-task", "t", ".", "--wait"]) == 130
        err = capsys.readouterr().err
        assert "stopped waiting; the server goes on with task 't'" in err and "task-status t" in err, err
        assert err.rstrip().endswith("inlaid client: interrupted"), err
    finally:
        server.stop()


def test_text_output_rounds_floats_and_json_keeps_them(capsys: pytest.CaptureFixture) -> None:
    """`inlaid client health` / `stats` printed uptime_seconds: 30.351641882007243 and nested
    floats to 17 digits (a first-user walkthrough); --json keeps every digit."""
    from inlaid.client.cli import _print
    from inlaid.protocol import HealthReply

    reply = HealthReply(request_id="r", status="ok", executor_ready=True, uptime_seconds=30.351641882007243,
                        step_running_seconds=12345.6)
    _print(reply, False)
    text = capsys.readouterr().out
    assert "uptime_seconds: 30.35\n" in text and "step_running_seconds: 12346\n" in text, text  # not 1.235e+04
    assert "status: ok\n" in text and "executor_ready: True\n" in text, text
    _print(reply, True)
    assert "30.351641882007243" in capsys.readouterr().out
    _print({"executors": [{"mean_step_seconds": 0.04695943214798771, "index": 0}]}, False)  # nested: JSON, rounded
    assert capsys.readouterr().out == 'executors: [{"mean_step_seconds": 0.04696, "index": 0}]\n'
    _print({"gaps": [float("nan"), float("inf")]}, False)  # not finite: as they are, not an exception
    assert capsys.readouterr().out == "gaps: [NaN, Infinity]\n"
