"""Ray Serve deployment (inlaid/integrations/ray.py) on a local Ray cluster: two replicas, each
a real `inlaid serve`, behind the OpenAI ingress.

Checked: answers through Ray's HTTP proxy (plain and streamed) equal the in-process engine's
greedy answers with the same adapter; every request for a task lands on a replica holding
it; each replica's adapter set follows an independent LRU model of the per-replica cap, on
Ray's side and on the replica's Inlaid server alike; SIGKILL of a replica takes its server
with it, Ray replaces the replica, and requests for its task succeed again. Requests that
cannot load (an unknown task, a catalog task with a corrupt adapter) or carry bad arguments
are refused without unloading any task; a replica whose server cannot start leaves no
temp folder behind, and a starting replica removes the folders of replicas that died without
cleaning up; SIGTERM on the deploy command deletes its application, as Ctrl-C does.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import pytest

from inlaid.serve.ipc_dirs import process_alive

# Ray 2.60 declares pydantic fields in a deprecated style; its warnings are not ours.
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
TASKS = ["sentiment", "qa", "trans-es", "math", "table-to-text"]  # five tasks, 2 x 2 adapter seats
PROMPT = "Say something about the weather."
CAP = 2
CORRUPT = "corrupt"  # in the catalog, but its adapter cannot load
ROUTER_LEARNS_S = 1.0  # ample for a local cluster: the controller pushes replica updates at once


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str | None, str]:
    """Greedy answers of the in-process engine (before Ray starts: the cores are shared)."""
    from inlaid.engine.config import EngineConfig
    from inlaid.engine.engine import Engine
    from inlaid.protocol import SamplingParams

    engine = Engine.local(EngineConfig(model_dir=str(model_dir), threads=1, max_lora_rank=16))
    for task in TASKS[:2]:
        engine.register_adapter(task, str(ADAPTERS / task))
    wanted = [None, TASKS[0], TASKS[1]]
    outputs = engine.generate([PROMPT] * 3, SamplingParams(max_tokens=8, temperature=0.0), wanted)
    return {task: out.text for task, out in zip(wanted, outputs)}


def serve_port() -> int:
    """A free port for Ray Serve's HTTP proxy, outside both the kernel's ephemeral range and
    Ray's worker ports (10002-19999): picked from the ephemeral range (bind to 0), it was
    taken by one of the processes `ray.init` and `serve.start` spawn (which bind ephemeral
    ports) before the proxy bound it: "Failed to bind to address" (a flake under two workers)."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="module")
def ray_app(model_dir, reference, tmp_path_factory):  # type: ignore[no-untyped-def]
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from inlaid.integrations.ray import build_app
    from inlaid.integrations.ray_config import ray_config_from_dict

    # A catalog task whose adapter config reads fine but whose weights file is cut short:
    # only the full weights check (the server's) refuses it.
    corrupt = tmp_path_factory.mktemp("corrupt") / CORRUPT
    shutil.copytree(ADAPTERS / TASKS[0], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    port = serve_port()
    config = ray_config_from_dict({
        "ray": {"num_replicas": 2, "max_tasks_per_replica": CAP, "num_cpus": 0.5, "ingress_num_cpus": 0.1,
                "health_check_period_s": 1.0, "http_port": port, "replica_start_timeout_s": 120.0},
        "model": {"dir": str(model_dir)},
        "executor": {"threads": 1, "num_kv_blocks": 128, "max_num_seqs": 8, "max_lora_slots": CAP,
                     "max_lora_rank": 16},
        "server": {"log_level": "WARNING"},
        "tasks": {**{task: str(ADAPTERS / task) for task in TASKS}, CORRUPT: str(corrupt)},
    })  # fmt: skip
    # address="local": a cluster of the test's own; a running one (`ray start --head` on this
    # machine) was joined, refused num_cpus, and would have had its Serve shut down at the end.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve.get_deployment_handle("InlaidReplica", app_name=config.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(handle, task: str, max_tokens: int = 2):  # type: ignore[no-untyped-def]
    return handle.options(multiplexed_model_id=task).generate.remote(
        {"prompt": PROMPT, "max_tokens": max_tokens}).result(timeout_s=120)


def _describe(handle, task: str):  # type: ignore[no-untyped-def]
    return handle.options(multiplexed_model_id=task).describe.remote().result(timeout_s=60)


def _describe_on(handle, task: str, replica: str, attempts: int = 10):  # type: ignore[no-untyped-def]
    """Describe `replica` through a request for `task` (describe loads nothing, so asking a
    replica that does not hold the task again is harmless)."""
    for _ in range(attempts):
        info = _describe(handle, task)
        if info.replica == replica:
            return info
        time.sleep(ROUTER_LEARNS_S / 2)
    raise AssertionError(f"requests for {task!r} never reached {replica}, which holds it (last: {info.replica})")


def test_ray_serve_routes_by_task_evicts_lru_and_replaces_a_killed_replica(ray_app, reference) -> None:
    import openai

    url, handle = ray_app
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    # The OpenAI front through Ray's proxy: the same answers as the engine with that adapter.
    models = {m.id for m in api.models.list().data}
    assert set(TASKS) < models
    for task in TASKS[:2]:
        answer = api.completions.create(model=task, prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.choices[0].text == reference[task]
    streamed = api.completions.create(model=TASKS[1], prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == reference[TASKS[1]]
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="no-such-task", prompt=PROMPT, max_tokens=2)

    # Affinity and the per-replica LRU cap, against an independent model of each replica.
    held: dict[str, OrderedDict[str, None]] = {}
    for task in TASKS[:2]:
        info = _describe(handle, task)
        held[info.replica] = OrderedDict.fromkeys(info.loaded_tasks)
    # Repeats reorder each replica's LRU; which replica a task no one holds goes to is Ray's
    # (random) choice, so how often this fixed part evicts depends on the routing.
    for task in ["sentiment", "qa", "trans-es", "sentiment", "math", "qa", "table-to-text", "trans-es", "sentiment"]:
        _request_and_check(handle, task, held)
    # Then requests for a task no replica holds: each one fills a free seat (4 in all, never
    # freed) or evicts, so at most 4 + 3 of them make 3 more evictions under any routing.
    misses_evicting = 0
    for _ in range(CAP * 2 + 3):
        unheld = [task for task in TASKS if not any(task in tasks for tasks in held.values())]
        misses_evicting += _request_and_check(handle, unheld[0], held)
        if misses_evicting == 3:
            break
    assert misses_evicting == 3, held
    _request_and_check(handle, "sentiment", held)  # held again: the task of the replica killed below

    # Tasks that cannot load are refused before Ray's multiplexer evicts anything for them
    # (it evicts its LRU task *before* calling the loader): every replica keeps its tasks.
    for _ in range(CAP + 1):  # more than a replica's seats, whichever replicas they land on
        assert _generate(handle, "no-such-task").error.code == "unknown_task"
        refused = _generate(handle, CORRUPT).error
        assert refused.code == "invalid_request" and "adapter" in refused.message, refused
    with pytest.raises(openai.BadRequestError, match="adapter"):
        api.completions.create(model=CORRUPT, prompt=PROMPT, max_tokens=2)
    for replica, model in held.items():
        info = _describe_on(handle, next(iter(model)), replica)
        assert sorted(info.loaded_tasks) == sorted(model) == info.server_tasks, (info, held)

    # Bad handle arguments: a typed invalid_request answer, not a RayTaskError(TypeError).
    for arguments in [{"prompt": PROMPT, "bogus": 1}, ["not", "a", "dict"], {"prompt": PROMPT, "task": "qa"}]:
        answer = handle.options(multiplexed_model_id="").generate.remote(arguments).result(timeout_s=60)
        assert answer.error is not None and answer.error.code == "invalid_request", (arguments, answer)
    streamed_items = list(handle.options(stream=True).stream.remote({"prompt": PROMPT, "bogus": 1}))
    assert [item.error.code for item in streamed_items] == ["invalid_request"]

    # SIGKILL one replica: its Inlaid server dies with it, Ray starts a new replica, and the
    # task it held is served again.
    victim = _describe(handle, "sentiment")
    [victim_folder] = [d for d in Path(tempfile.gettempdir()).glob("inlaid-replica-*")
                       if (d / "replica.pid").exists() and (d / "replica.pid").read_text() == str(victim.pid)]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:
        try:
            answer = _generate(handle, "sentiment")
            if answer.error is None:
                break
        except Exception:  # the dead replica's in-flight call, until Ray routes around it
            pass
        assert time.monotonic() < deadline, "no answer for the killed replica's task"
        time.sleep(0.5)
    _wait_for_running_replicas(2, deadline)
    replicas = {_describe(handle, task).replica for task in TASKS}
    assert victim.replica not in replicas
    assert not process_alive(victim.server_pid)
    # Its folder goes when the replacement replica starts (the victim could not remove it).
    # Ray may still count the dead replica as running until its controller notices, so the
    # wait above does not prove the replacement exists yet.
    folder_deadline = time.monotonic() + 120
    while victim_folder.exists():
        assert time.monotonic() < folder_deadline, f"{victim_folder} outlived the killed replica"
        time.sleep(0.5)
    answer = api.completions.create(model=TASKS[0], prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == reference[TASKS[0]]


def test_a_replica_whose_server_died_answers_503_at_once_and_is_replaced(ray_app) -> None:
    """SIGKILL of a replica's Inlaid server alone (its replica lives on): requests used to wait
    until Ray's health check failed three times and its graceful shutdown gave up on them
    (~25 s), then 503. Now a request for its task is 503 `unavailable` at once (or served by
    the other replica), the replica ends itself, and Ray replaces it."""
    import urllib.error
    import urllib.request

    url, handle = ray_app
    holder = _generate(handle, TASKS[1]).replica  # requests for the task now go to this replica
    time.sleep(ROUTER_LEARNS_S)
    victim = _describe_on(handle, TASKS[1], holder)
    os.kill(victim.server_pid, signal.SIGKILL)
    started = time.monotonic()
    request = urllib.request.Request(f"{url}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=f'{{"model": "{TASKS[1]}", "prompt": "{PROMPT}", "max_tokens": 2}}'.encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, retry_after = answer.status, None
    except urllib.error.HTTPError as error:
        status, retry_after = error.code, error.headers.get("Retry-After")
    assert time.monotonic() - started < 10, "a request waited on a replica whose server is dead"
    assert (status, retry_after) in [(503, "1"), (200, None)], status
    deadline = time.monotonic() + 30  # Ray's health check alone takes 3 periods plus a graceful shutdown
    while process_alive(victim.pid):
        assert time.monotonic() < deadline, "the replica outlived its server"
        time.sleep(0.2)
    deadline = time.monotonic() + 120
    while True:
        try:
            if _generate(handle, TASKS[1]).error is None:
                break
        except Exception:  # the dead replica's calls, until Ray routes around it
            pass
        assert time.monotonic() < deadline, "the task was never served again"
        time.sleep(0.5)
    _wait_for_running_replicas(2, deadline)


def _request_and_check(handle, task: str, held: dict[str, OrderedDict[str, None]]) -> int:  # type: ignore[no-untyped-def]
    """One request for `task`: it must land on a replica holding the task if any does; the
    replica's reported adapters (Ray's view and its Inlaid server's) must then equal the LRU
    model `held`, updated here. Returns the evictions the model predicts (0 or 1)."""
    holders = {r for r, tasks in held.items() if task in tasks}
    answer = _generate(handle, task)
    assert answer.error is None and answer.done.finish_reason in ("length", "stop")
    if holders:
        assert answer.replica in holders, (task, answer.replica, held)
    model = held.setdefault(answer.replica, OrderedDict())
    loaded_now = task not in model
    model[task] = None
    model.move_to_end(task)
    evicted = 0
    if len(model) > CAP:
        model.popitem(last=False)
        evicted = 1
    if loaded_now:
        # Replicas report the tasks they hold to Ray's routers asynchronously: until the
        # report arrives, a request for the task may go to either replica.
        time.sleep(ROUTER_LEARNS_S)
    info = _describe_on(handle, task, answer.replica)
    assert sorted(info.loaded_tasks) == sorted(model) == info.server_tasks, (task, info, held)
    return evicted


def _wait_for_running_replicas(count: int, deadline: float) -> None:
    from ray import serve

    while True:
        status = serve.status().applications["inlaid"].deployments["InlaidReplica"]
        if status.replica_states.get("RUNNING", 0) == count and sum(status.replica_states.values()) == count:
            return
        assert time.monotonic() < deadline, f"replicas: {status.replica_states}"
        time.sleep(0.5)


def test_a_replica_server_that_cannot_start_leaves_no_temp_folder(tmp_path, monkeypatch) -> None:
    """The replica's child `inlaid serve` with no model: it exits, the constructor raises,
    and the replica's folder (config, log, ipc socket) is gone (Ray would retry, leaking one
    folder per failed start)."""
    from inlaid.integrations.ray_child import ChildServer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp's folder, this test's alone
    sections = {"model": {"dir": str(tmp_path / "no-model")}, "executor": {"threads": 1}, "server": {}}
    with pytest.raises(RuntimeError, match="exited"):
        ChildServer(sections, start_timeout_s=60.0)
    assert list(tmp_path.glob("inlaid-replica-*")) == []


def test_a_starting_replica_removes_folders_of_dead_replicas(tmp_path, monkeypatch) -> None:
    """A replica killed with SIGKILL cannot remove its folder; the next replica on the node
    does, when the folder's replica process is gone (exited, or a zombie not yet reaped).
    Live owners' folders and folders without an owner file (being made right now) stay."""
    import subprocess
    import sys

    from inlaid.integrations.ray_child import ChildServer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    # A killed replica stays a zombie until Ray reaps it; its replacement may start first.
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # not reaped: no poll()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    owners = {"inlaid-replica-dead": str(exited.pid), "inlaid-replica-zombie": str(zombie.pid),
              "inlaid-replica-live": str(os.getpid()), "inlaid-replica-garbled": "not a pid",
              "inlaid-replica-unowned": None}
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "server.log").write_text("old")
        if owner is not None:
            (tmp_path / name / "replica.pid").write_text(owner)
    sections = {"model": {"dir": str(tmp_path / "no-model")}, "executor": {"threads": 1}, "server": {}}
    with pytest.raises(RuntimeError, match="exited"):
        ChildServer(sections, start_timeout_s=60.0)
    zombie.wait()
    assert sorted(p.name for p in tmp_path.glob("inlaid-replica-*")) == [
        "inlaid-replica-garbled", "inlaid-replica-live", "inlaid-replica-unowned"]


def test_sigterm_on_the_deploy_command_deletes_its_application(model_dir, tmp_path) -> None:
    """`python -m inlaid.integrations.ray` on a cluster of its own (--address local), SIGTERM
    once the app answers through Ray's proxy: the same path as Ctrl-C (serve.delete, one line,
    exit 128 + 15). SIGTERM used to kill it with the application left deployed."""
    import subprocess
    import sys
    import urllib.request

    from inlaid.serve.launcher import to_toml

    port = serve_port()
    config = tmp_path / "ray.toml"
    config.write_text(to_toml({
        "ray": {"num_replicas": 1, "max_tasks_per_replica": 1, "num_cpus": 0.5, "ingress_num_cpus": 0.1,
                "http_port": port, "replica_start_timeout_s": 120.0, "app_name": "sigterm-test"},
        "model": {"dir": str(model_dir)},
        "executor": {"threads": 1, "num_kv_blocks": 32, "max_num_seqs": 2, "max_lora_slots": 1},
        "server": {"log_level": "WARNING"},
        "tasks": {TASKS[0]: str(ADAPTERS / TASKS[0])},
    }))  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    deploy = subprocess.Popen([sys.executable, "-m", "inlaid.integrations.ray", "--config", str(config),
                               "--address", "local"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert deploy.poll() is None, deploy.stderr.read().decode(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                    assert TASKS[0] in answer.read().decode()
                    break
            except OSError:
                assert time.monotonic() < deadline, "the deployment never answered"
                time.sleep(1.0)
        deploy.send_signal(signal.SIGTERM)
        _, stderr = deploy.communicate(timeout=120)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert deploy.returncode == 128 + signal.SIGTERM, stderr.decode(errors="replace")[-3000:]
    assert "inlaid ray: terminated; deleting application 'sigterm-test'" in stderr.decode(errors="replace")
    assert "may still be deployed" not in stderr.decode(errors="replace")
