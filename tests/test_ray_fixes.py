"""Fixes to the Ray Serve integration found by an outside probe, each checked without a Ray
cluster (the cluster tests are tests/test_ray_serve.py).

* A replica whose `inlaid serve` died answers `connection_lost` at once, not after the SDK's
  600 s timeout (or Ray's health check plus its graceful-shutdown wait).
* Ray Serve's own errors (a deployment with no replica up) are 503 `unavailable` with
  Retry-After, not 500 `internal`.
* An unknown model's 404 names every task, as a single server's does.
* The deploy command: a runtime deploy failure is one line, exit 2 and the app deleted; a
  CUDA executor on replicas given no GPU, an address with no cluster, or a catalog adapter a
  server would refuse are refused in seconds, before anything is deployed.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inlaid.client import AsyncClient, ConnectionLostError, UnknownTaskError
from inlaid.http.errors import from_inlaid
from inlaid.serve.config import ConfigError
from inlaid.serve.launcher import to_toml

with warnings.catch_warnings():  # Ray 2.60 declares pydantic fields in a deprecated style; not ours
    warnings.simplefilter("ignore", DeprecationWarning)
    from inlaid.integrations.ray import ReplicaBase
    from inlaid.integrations.ray_client import RayTaskClient
    from inlaid.integrations.ray_holds import TaskHolds

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
CATALOG = {name: str(ADAPTERS / name) for name in ("qa", "sentiment", "math")}
BASE_MODEL = "SmolLM2-135M-Instruct"
NO_CLUSTER_PORT = 21007  # this suite's port range (21000-21199): nothing listens here
LISTENING_PORT = 21008


# --- a replica whose server died ------------------------------------------------------------

class ServerProcessStandIn:
    """In place of ChildServer: a real child process (not `inlaid serve`: nothing need answer)
    and an ipc address where nothing listens, so an SDK call waits as on a dead server."""

    def __init__(self, workdir: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        self.address = f"ipc://{workdir}/server.ipc"
        self.admin_token = "stand-in"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        return ""

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class ReplicaWithoutRay(ReplicaBase):
    """ReplicaBase's request handling as is; only the Ray-bound constructor (the replica
    context, the model config) and the process-wide ZeroMQ teardown are left out."""

    def __init__(self, server: ServerProcessStandIn) -> None:
        self.catalog = dict(CATALOG)
        self.replica_id = "replica-without-ray"
        self.server = server  # type: ignore[assignment]
        self._client: AsyncClient | None = None
        self.loaded: list[str] = []
        self._holds = TaskHolds()

    def __del__(self) -> None:
        pass


@pytest.fixture()
def replica(tmp_path: Path) -> Iterator[ReplicaWithoutRay]:
    server = ServerProcessStandIn(tmp_path)
    yield ReplicaWithoutRay(server)
    server.kill()


async def _within(seconds: float, call: Any) -> Any:
    """The call's answer; a call still waiting after `seconds` fails the test (the old code
    waited the SDK's 600 s timeout)."""
    started = time.monotonic()
    try:
        answer = await asyncio.wait_for(call, seconds)
    except asyncio.TimeoutError:
        raise AssertionError(f"still waiting after {seconds} s on a dead server") from None
    return answer, time.monotonic() - started


def test_a_replica_whose_server_died_answers_connection_lost_at_once(replica: ReplicaWithoutRay) -> None:
    async def scenario() -> None:
        try:
            # The server dies while a generate waits on it.
            waiting = asyncio.ensure_future(replica.generate({"prompt": "hi", "max_tokens": 2}))
            await asyncio.sleep(0.5)
            replica.server.kill()  # type: ignore[attr-defined]
            answer, waited = await _within(5.0, waiting)
            assert answer.error is not None and answer.error.code == "connection_lost", answer
            assert "Inlaid server exited" in answer.error.message and waited < 2.0
            with pytest.raises(ConnectionLostError):
                answer.result()  # what the ingress raises: the front's 503 `unavailable`
            # Requests arriving after it died are answered before anything is sent.
            answer, waited = await _within(5.0, replica.generate({"prompt": "hi", "max_tokens": 2}))
            assert answer.error is not None and answer.error.code == "connection_lost" and waited < 0.5
            chunks = [chunk async for chunk in replica.stream({"prompt": "hi", "max_tokens": 2})]
            assert len(chunks) == 1 and chunks[0].error.code == "connection_lost"
            with pytest.raises(ConnectionLostError):  # a new ingress's first hello, too
                await _within(5.0, replica.hello())
            status = from_inlaid(ConnectionLostError(f"[connection_lost] {answer.error.message}"))
            assert (status.status, status.code, status.headers()) == (503, "unavailable", {"Retry-After": "1"})
        finally:
            if replica._client is not None:
                await replica._client.close()

    asyncio.run(scenario())


# --- the ingress: Ray Serve's own errors, unknown tasks -------------------------------------

class UnavailableDeploymentHandleStandIn:
    """In place of a DeploymentHandle whose deployment has no replica up: every call fails
    with Ray Serve's real DeploymentUnavailableError (a RayServeException, not a RayError)."""

    def __init__(self) -> None:
        from ray.serve._private.common import DeploymentID
        from ray.serve.exceptions import DeploymentUnavailableError

        self.error = DeploymentUnavailableError(DeploymentID(name="InlaidReplica", app_name="inlaid"))
        self.calls: list[str] = []

    def options(self, **options: Any) -> "UnavailableDeploymentHandleStandIn":
        return self

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            @staticmethod
            def remote(*arguments: Any) -> Any:
                handle.calls.append(method)
                if method == "stream":
                    return FailingGenerator(handle.error)
                return FailingResponse(handle.error)

        return Method


class FailingResponse:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __await__(self) -> Any:
        raise self.error
        yield  # a generator: awaitable

    def cancel(self) -> None:
        pass


class FailingGenerator:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def __anext__(self) -> Any:
        raise self.error

    def cancel(self) -> None:
        pass


def test_an_unavailable_deployment_is_503_unavailable_with_retry_after() -> None:
    handle = UnavailableDeploymentHandleStandIn()
    client = RayTaskClient(handle, CATALOG, timeout_s=5.0)

    async def calls() -> list[BaseException]:
        errors: list[BaseException] = []
        for call in (client.handshake(), client.health(), client.generate("hi", task="qa")):
            try:
                await call
            except Exception as error:  # noqa: BLE001 (each is checked below)
                errors.append(error)
        stream = await client.stream("hi", task="qa")
        try:
            async for _ in stream:
                pass
        except Exception as error:  # noqa: BLE001
            errors.append(error)
        return errors

    errors = asyncio.run(calls())
    assert handle.calls == ["hello", "health", "generate", "stream"]
    assert len(errors) == 4
    for error in errors:
        assert isinstance(error, ConnectionLostError), repr(error)
        answer = from_inlaid(error, model="qa")
        assert (answer.status, answer.code, answer.headers()) == (503, "unavailable", {"Retry-After": "1"})


def test_unloading_an_adapter_through_ray_is_400_naming_the_catalog() -> None:
    """The front's unload asks remove_task_reply (the server's whole answer, for its notes):
    the Ray client lacked it, and an unload answered 500 where it answered 400 (a reviewer)."""
    import json

    from test_http_probe_fixes import _post

    from inlaid.http.app import create_app
    from inlaid.http.settings import HttpConfig

    client = RayTaskClient(UnavailableDeploymentHandleStandIn(), CATALOG)
    app = create_app("tcp://127.0.0.1:1", HttpConfig(), client=client, admin_client=client.admin_client)
    status, answer = _post(app, "/v1/unload_lora_adapter", json.dumps({"lora_name": "qa"}).encode(),
                           ((b"authorization", b"Bearer t"),))
    assert status == 400 and "come from its catalog" in json.loads(answer)["error"]["message"], answer


def test_a_typed_error_a_replica_raises_reaches_the_ingress_as_it_is() -> None:
    """A replica's hello on a dead server raises ConnectionLostError; Ray wraps it in a
    RayTaskError, which used to become 500 `executor_failed`."""
    from ray.exceptions import RayTaskError

    from inlaid.integrations.ray_client import _ray_failure

    lost = ConnectionLostError("[connection_lost] this replica's Inlaid server exited")
    assert _ray_failure(RayTaskError("hello", "Traceback ...", lost)) is lost


def test_an_unknown_model_through_ray_names_every_task() -> None:
    from inlaid.serve.task_registry import TaskError, TaskRegistry

    client = RayTaskClient(UnavailableDeploymentHandleStandIn(), CATALOG)
    with pytest.raises(UnknownTaskError) as raised:
        asyncio.run(client.generate("hi", task="nope"))
    answer = from_inlaid(raised.value, model="nope", base_model=BASE_MODEL)
    assert answer.status == 404
    assert answer.message == (f"The model `nope` does not exist; this server has: `{BASE_MODEL}` (the base model), "
                              "`math`, `qa`, `sentiment`.")
    # The same words as a single server's coordinator (whose message the front reads).
    registry = TaskRegistry([object()], admin_token=None)  # type: ignore[list-item]  # check_accepting uses no engine
    registry.tasks = dict(CATALOG)
    with pytest.raises(TaskError) as refused:
        registry.check_accepting("nope")
    assert raised.value.message == f"[unknown_task] {refused.value.message}"
    # A replica asked for a task outside its catalog says it alike.
    replica = ReplicaWithoutRay.__new__(ReplicaWithoutRay)
    replica.catalog = dict(CATALOG)
    with pytest.raises(UnknownTaskError) as on_replica:
        replica._check_task("nope")
    assert on_replica.value.message == raised.value.message


# --- the deploy command ----------------------------------------------------------------------

@pytest.fixture()
def deploy_config(model_dir: Path, tmp_path: Path) -> Any:
    def write(**sections: dict[str, Any]) -> str:
        path = tmp_path / "ray.toml"
        path.write_text(to_toml({"ray": {"num_replicas": 1, "app_name": "fix-test"}, "model": {"dir": str(model_dir)},
                                 "executor": {"threads": 1, "max_lora_rank": 16},
                                 "tasks": {"qa": CATALOG["qa"]}, **sections}))
        return str(path)

    return write


# A failed deployment's status message, as Ray 2.60 words it (abridged): the replica's
# traceback, then its server's log.
FAILED_REPLICA_MESSAGE = (
    "Failed to update the deployments ['InlaidReplica'].\nray.exceptions.RayTaskError(RuntimeError): "
    "ray::ServeReplica:fix-test:InlaidReplica.initialize_and_get_metadata() (pid=4242)\n"
    "RuntimeError: the replica's Inlaid server exited:\n"
    '{"ts": 1.0, "level": "critical", "msg": "cannot start", "error": "/models/x has no tokenizer.json"}\n')


@dataclass
class DeploymentStatusStandIn:  # what serve.status() holds, reduced to what the command reads
    message: str


@dataclass
class ApplicationStatusStandIn:
    deployments: dict[str, DeploymentStatusStandIn]


@dataclass
class ServeStatusStandIn:
    applications: dict[str, ApplicationStatusStandIn]


@pytest.fixture()
def ray_stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[Any]]]:
    """Ray's cluster calls, recorded instead of made: `ray.init` connecting to nothing (it would
    retry an explicit address forever), a deploy that fails on the cluster the way `serve.run`
    reports it (serve.run's error, serve.status's messages). The command's own handling is
    what is under test."""
    import ray
    from ray import serve

    calls: dict[str, list[Any]] = {"init": [], "delete": []}

    def failing_run(*arguments: Any, **options: Any) -> None:  # serve.run's words (ray 2.60)
        raise RuntimeError("Deploying application fix-test failed: Failed to update the deployments "
                           "['InlaidReplica'].")

    monkeypatch.setattr(ray, "init", lambda **options: calls["init"].append(options))
    monkeypatch.setattr(serve, "start", lambda **options: None)
    monkeypatch.setattr(serve, "run", failing_run)
    monkeypatch.setattr(serve, "delete", lambda name: calls["delete"].append(name))
    monkeypatch.setattr(serve, "status", lambda: ServeStatusStandIn(
        {"fix-test": ApplicationStatusStandIn({"InlaidReplica": DeploymentStatusStandIn(FAILED_REPLICA_MESSAGE)})}))
    sigterm = signal.getsignal(signal.SIGTERM)  # the command installs its own handler
    yield calls
    signal.signal(signal.SIGTERM, sigterm)


def _deploy(arguments: list[str]) -> int:
    from inlaid.integrations.ray import main

    return main(arguments)


def test_a_deploy_failing_on_the_cluster_is_one_line_exit_2_and_deleted(deploy_config, ray_stand_ins,
                                                                        capsys) -> None:
    assert _deploy(["--config", deploy_config(), "--address", "auto"]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr == ("inlaid ray: application 'fix-test' failed to deploy (a replica's Inlaid server cannot start: "
                      "/models/x has no tokenizer.json); deleting it")
    assert ray_stand_ins["delete"] == ["fix-test"]


@pytest.mark.parametrize("executor, ray_section, words", [
    ({"device": "cuda"}, {}, "needs a GPU, but each replica gets none"),
    ({"device": "cuda:1"}, {"num_gpus": 1}, "each replica sees 1 GPU"),
])  # fmt: skip
def test_a_cuda_executor_on_replicas_without_that_gpu_is_refused_before_connecting(
        deploy_config, ray_stand_ins, capsys, executor: dict[str, Any], ray_section: dict[str, Any],
        words: str) -> None:
    path = deploy_config(executor={"threads": 1, **executor}, ray={"num_replicas": 1, **ray_section})
    assert _deploy(["--config", path]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and stderr.startswith("inlaid ray: ") and words in stderr, stderr
    assert ray_stand_ins["init"] == []


def test_an_address_with_no_cluster_is_refused_in_seconds(deploy_config, ray_stand_ins, capsys) -> None:
    started = time.monotonic()
    assert _deploy(["--config", deploy_config(), "--address", f"127.0.0.1:{NO_CLUSTER_PORT}"]) == 2
    assert time.monotonic() - started < 10
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith(f"inlaid ray: no Ray cluster at '127.0.0.1:{NO_CLUSTER_PORT}'"), stderr
    assert ray_stand_ins["init"] == []  # the real ray.init retries this address forever
    from inlaid.integrations.ray_deploy import gcs_address_problem

    with socket.create_server(("127.0.0.1", LISTENING_PORT)):
        assert gcs_address_problem(f"127.0.0.1:{LISTENING_PORT}") is None
        assert gcs_address_problem(f"ray://127.0.0.1:{LISTENING_PORT}") is None
    assert gcs_address_problem("auto") is None and gcs_address_problem("local") is None
    assert "expected host:port" in (gcs_address_problem("nonsense") or "")
    assert "expected host:port" in (gcs_address_problem("127.0.0.1:2\u00b2") or "")  # int() raised


def test_a_catalog_adapter_a_server_would_refuse_is_refused_at_deploy(deploy_config, tmp_path) -> None:
    from inlaid.integrations.ray_config import load_ray_config

    load_ray_config(deploy_config())  # the good catalog passes
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    cut = tmp_path / "cut-adapter"
    shutil.copytree(ADAPTERS / "qa", cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for tasks, words in [({"bare": str(empty)}, r"\[tasks\] bare: .*adapter_config"),
                         ({"code": str(ADAPTERS / "code")}, r"\[tasks\] code: .*rank 32.*max_lora_rank is 16"),
                         ({"cut": str(cut)}, r"\[tasks\] cut: ")]:
        with pytest.raises(ConfigError, match=words):
            load_ray_config(deploy_config(tasks=tasks))


def test_a_ray_ingress_scrape_says_the_servers_series_are_missing() -> None:
    """The Ray ingress holds no server series (each replica keeps its own): its scrape read
    inlaid_http_server_metrics_missing 0, as if they were all there (an outside probe)."""
    from prometheus_client.parser import text_string_to_metric_families
    from test_http_probe_fixes import _post

    from inlaid.http.app import create_app
    from inlaid.http.settings import HttpConfig

    client = RayTaskClient(UnavailableDeploymentHandleStandIn(), CATALOG)
    app = create_app("tcp://127.0.0.1:1", HttpConfig(), client=client, admin_client=client.admin_client)
    status, text = _post(app, "/metrics", b"", method="GET")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text.decode())}
    assert families["inlaid_http_server_metrics_missing"].samples[0].value == 1
