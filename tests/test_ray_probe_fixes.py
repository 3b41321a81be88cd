"""Fixes to the Ray deploy command found by an outside scale-out probe, each checked without a
Ray cluster (Ray's calls are stand-ins; the command's own decisions are under test).

* A failed deploy names the server's reason from its log in either format (the coordinator's
  "cannot serve; exiting" record carries a `reason`, not an `error`; a text log is no JSON).
* [ray.autoscaling] is checked before connecting: unknown keys, ranges, min <= max (Ray says
  these with a pydantic traceback, or not at all for an unknown key).
* A second SIGINT arriving at once (`timeout -s INT` signals the command and its group) leaves
  the app as it is and says so, instead of a KeyboardInterrupt traceback out of a print.
* Replicas no node can host: refused on a cluster this command started, else a warning
  (Ray would wait forever, saying only "No available node types can fulfill ...").
* [http] host/port (Ray's proxy listens, on [ray] http_port) refused, unknown [http] keys in
  the usual words, and a dropped [server] address said in one line.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inlaid.integrations import ray_deploy
from inlaid.integrations.ray_config import AUTOSCALING_KEYS, ray_config_from_dict
from inlaid.integrations.ray_deploy import deploy_failure_reason, deploy_main
from inlaid.serve.config import ConfigError
from inlaid.serve.launcher import to_toml
from inlaid.serve.logs import setup_logging

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
CATALOG = {name: str(ADAPTERS / name) for name in ("qa", "sentiment")}
APP = "probe-fix"
DEPLOY_ERROR = RuntimeError(f"Deploying application {APP} failed: Failed to update the deployments "
                            f"['InlaidReplica'].")  # serve.run's words (ray 2.60)
# How Ray 2.60 words the failed deployment's status message before the replica's error, which
# holds its server's log (ray_child.ChildServer: "the replica's Inlaid server exited:\n<log>").
MESSAGE_HEAD = ("Failed to update the deployments ['InlaidReplica'].\nray.exceptions.RayTaskError(RuntimeError): "
                f"ray::ServeReplica:{APP}:InlaidReplica.initialize_and_get_metadata() (pid=4242)\n"
                "RuntimeError: the replica's Inlaid server exited:\n")
FATAL = "the executor failed to start 3 times in a row; last: executor (pid 7) died with signal SIGKILL"


@pytest.fixture()
def server_log_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """write(fmt, log_calls) -> what an `inlaid serve` writes to its stderr (the replica's log
    file) with server.log_format = fmt, through the server's own logging set-up."""
    logger = logging.getLogger("inlaid")
    saved = (logger.handlers[:], logger.level, logger.propagate)

    def write(fmt: str, log_calls: Any) -> str:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        setup_logging("INFO", fmt)
        log_calls()
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        return stream.getvalue()

    yield write
    logger.handlers[:], logger.level, logger.propagate = saved


def _executor_failing_to_start() -> None:
    """The records of a server whose executor never starts, made by the code that logs them:
    the supervisor's error records, then the coordinator's fatal one (`Coordinator._on_fatal`)."""
    from inlaid.serve.coordinator import Coordinator

    supervisor = logging.getLogger("inlaid.supervisor")
    supervisor.error("executor did not become ready in time; killing it", extra={"pid": 7, "timeout_s": 0.05})
    supervisor.error("executor lost", extra={"generation": 3, "reason": "executor (pid 7) died with signal SIGKILL"})
    coordinator = types.SimpleNamespace(in_flight=types.SimpleNamespace(fail_all=lambda *args: None),
                                        request_shutdown=lambda: None)
    Coordinator._on_fatal(coordinator, FATAL)  # type: ignore[arg-type]
    logging.getLogger("inlaid.coordinator").info("coordinator stopped", extra={"exit_code": 1, "received": 0})


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_failed_deploy_names_the_coordinators_fatal_reason_in_either_log_format(server_log_text, fmt: str) -> None:
    log = server_log_text(fmt, _executor_failing_to_start)
    assert "cannot serve; exiting" in log
    assert deploy_failure_reason(DEPLOY_ERROR, MESSAGE_HEAD + log) == (
        f"a replica's Inlaid server cannot serve: {FATAL}")


def test_a_text_format_cannot_start_record_is_read(server_log_text) -> None:
    from inlaid.serve.cli import _cannot_start

    log = server_log_text("text", lambda: _cannot_start("model.dir: /models/x has no tokenizer.json"))
    assert deploy_failure_reason(DEPLOY_ERROR, MESSAGE_HEAD + log) == (
        "a replica's Inlaid server cannot start: model.dir: /models/x has no tokenizer.json")


def test_the_probes_text_log_line_with_rays_prefix_is_read() -> None:
    # As the probe's run printed it (Ray prefixes a controller's lines with its colour codes).
    line = ("\x1b[36m(ServeController pid=19546)\x1b[0m 04:19:41 CRITICAL inlaid.coordinator: cannot serve; exiting  "
            "[reason=the executor failed to start 3 times in a row; last: executor (pid 20070) died with signal "
            "SIGKILL]")
    assert deploy_failure_reason(DEPLOY_ERROR, line) == (
        "a replica's Inlaid server cannot serve: the executor failed to start 3 times in a row; last: executor "
        "(pid 20070) died with signal SIGKILL")


# --- the config ----------------------------------------------------------------------------------

def _raw(model_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"ray": {"num_replicas": 1, "app_name": APP}, "model": {"dir": str(model_dir)},
                           "executor": {"threads": 1, "max_lora_rank": 16}, "tasks": dict(CATALOG)}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("autoscaling, words", [
    ({"min_replicas": 3, "max_replicas": 1}, "ray.autoscaling: min_replicas (3) must be <= max_replicas (1)"),
    ({"min_replicas": 2}, "min_replicas (2) must be <= max_replicas (1, Ray's default)"),
    ({"max_replicas": 2, "bogus_key": 3}, "[ray.autoscaling]: unknown keys ['bogus_key']"),
    ({"max_replicas": 0}, "ray.autoscaling.max_replicas"),
    ({"max_replicas": 2.5}, "ray.autoscaling.max_replicas"),
    ({"min_replicas": -1, "max_replicas": 2}, "ray.autoscaling.min_replicas"),
    ({"max_replicas": 4, "target_ongoing_requests": 0}, "ray.autoscaling.target_ongoing_requests"),
    ({"max_replicas": 4, "initial_replicas": 5}, "initial_replicas (5) must be from min_replicas (1) to"),
    ({"max_replicas": 4, "aggregation_function": "median"}, "ray.autoscaling.aggregation_function"),
])  # fmt: skip
def test_an_autoscaling_table_ray_would_refuse_is_refused_in_one_line(model_dir: Path, autoscaling: dict[str, Any],
                                                                       words: str) -> None:
    raw = _raw(model_dir, ray={"num_replicas": "auto", "app_name": APP, "autoscaling": autoscaling})
    with pytest.raises(ConfigError) as refused:
        ray_config_from_dict(raw)
    assert words in str(refused.value) and "\n" not in str(refused.value), refused.value


def test_a_good_autoscaling_table_passes_and_reaches_ray_unchanged(model_dir: Path) -> None:
    table = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16, "upscale_delay_s": 0}
    config = ray_config_from_dict(_raw(model_dir, ray={"num_replicas": "auto", "app_name": APP, "autoscaling": table}))
    assert config.scaling_options() == {"num_replicas": "auto", "autoscaling_config": table}


def test_a_replica_count_beside_an_autoscaling_table_is_refused_not_dropped(model_dir: Path) -> None:
    table = {"min_replicas": 1, "max_replicas": 4}
    with pytest.raises(ConfigError, match=r"^ray.num_replicas = 3 with \[ray.autoscaling\]: .*initial_replicas"):
        ray_config_from_dict(_raw(model_dir, ray={"num_replicas": 3, "app_name": APP, "autoscaling": table}))
    unset = ray_config_from_dict(_raw(model_dir, ray={"app_name": APP, "autoscaling": table}))
    assert unset.scaling_options() == {"num_replicas": "auto", "autoscaling_config": table}


def test_the_autoscaling_keys_are_rays() -> None:
    from ray.serve.config import AutoscalingConfig

    assert AUTOSCALING_KEYS == set(AutoscalingConfig.model_fields)


def test_http_port_is_refused_naming_ray_http_port(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\[http\] port: .*\[ray\] http_host / http_port"):
        ray_config_from_dict(_raw(model_dir, http={"port": 29911}))
    with pytest.raises(ConfigError, match=r"^\[http\] front_liveness_s: Ray Serve runs the ingress"):  # unused there
        ray_config_from_dict(_raw(model_dir, http={"front_liveness_s": 9.0}))


def test_an_unknown_http_key_is_refused_in_the_usual_words(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\[http\]: unknown keys \['bogus'\]; allowed: \["):
        ray_config_from_dict(_raw(model_dir, http={"bogus": 1}))


def test_a_dropped_server_address_is_said(model_dir: Path) -> None:
    config = ray_config_from_dict(_raw(model_dir, server={"address": "tcp://127.0.0.1:5555"}))
    assert len(config.warnings) == 1 and config.warnings[0].startswith("[server] address ignored: "), config.warnings
    assert ray_config_from_dict(_raw(model_dir)).warnings == []


# --- the deploy command --------------------------------------------------------------------------

@dataclass
class _Deployment:  # what serve.status() holds, reduced to what the command reads
    message: str


@pytest.fixture()
def deploy(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """deploy(sections, address, run, nodes, capture, details, init) -> (exit code, stderr lines, calls):
    the command run against stand-ins of Ray's calls (`run` is serve.run's body, `nodes`
    ray.nodes(), `details` the replica deployment's status message, `init` ray.init; stderr
    goes to `capture`)."""
    import ray
    from ray import serve

    calls: dict[str, list[Any]] = {"init": [], "run": [], "delete": []}
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # the command sets its own

    def run_deploy(sections: dict[str, Any], address: str = "auto", run: Any = None,
                   nodes: list[dict[str, Any]] | None = None, capture: Any = None,
                   details: str = "", init: Any = None) -> tuple[int, list[str], Any]:
        path = tmp_path / "ray.toml"
        path.write_text(to_toml(_raw(model_dir, **sections)))
        monkeypatch.setattr(ray, "init", init or (lambda **options: calls["init"].append(options)))
        monkeypatch.setattr(ray, "nodes", lambda: nodes if nodes is not None else [
            {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 8.0}}])
        monkeypatch.setattr(serve, "start", lambda **options: None)
        monkeypatch.setattr(serve, "run", lambda *a, **k: (calls["run"].append(k), (run or (lambda: None))())[1])
        monkeypatch.setattr(serve, "delete", lambda name: calls["delete"].append(name))
        monkeypatch.setattr(serve, "status", lambda: types.SimpleNamespace(applications={APP: types.SimpleNamespace(
            deployments={"InlaidReplica": _Deployment(details)})}))
        monkeypatch.setattr(ray_deploy, "wait_while_deployed", lambda serve, app: "")  # as if interrupted there
        stream = capture or io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        try:
            code = deploy_main(["--config", str(path), "--address", address])
        except KeyboardInterrupt:
            monkeypatch.setattr(sys, "stderr", sys.__stderr__)
            pytest.fail(f"KeyboardInterrupt escaped the command; it wrote {stream.getvalue()!r}")
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        return code, stream.getvalue().splitlines(), calls

    yield run_deploy
    signal.signal(signal.SIGINT, handlers[0])
    signal.signal(signal.SIGTERM, handlers[1])


def test_a_bad_autoscaling_table_is_one_line_exit_2_before_connecting(deploy) -> None:
    code, lines, calls = deploy({"ray": {"num_replicas": "auto", "app_name": APP},  # to_toml writes flat tables
                                 "ray.autoscaling": {"min_replicas": 3, "max_replicas": 1}})
    assert (code, calls["init"]) == (2, [])
    assert lines == ["inlaid ray: ray.autoscaling: min_replicas (3) must be <= max_replicas (1)"]


class _SignalsOnWrite(io.StringIO):
    """stderr that receives SIGINT while the command writes its first line: the second of two
    signals sent at once (`timeout -s INT` signals the command, then its process group)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return written


def test_a_second_sigint_during_the_first_ones_line_leaves_the_app_and_says_so(deploy) -> None:
    def interrupted_run() -> None:  # Ctrl-C while serve.run blocks
        os.kill(os.getpid(), signal.SIGINT)

    code, lines, calls = deploy({}, run=interrupted_run, capture=_SignalsOnWrite())
    assert code == 130
    assert calls["delete"] == []  # the second signal said: leave it
    assert lines == [f"inlaid ray: interrupted; deleting application {APP!r}",
                     f"inlaid ray: interrupted again; application {APP!r} left as it is, maybe still deployed "
                     f"(serve.delete it, or `serve shutdown`)"]


def test_one_sigint_still_deletes_the_app(deploy) -> None:
    code, lines, calls = deploy({}, run=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert (code, calls["delete"], lines) == (130, [APP], [f"inlaid ray: interrupted; deleting application {APP!r}"])


def test_a_failed_deploy_with_a_text_log_names_the_reason(deploy, server_log_text) -> None:
    log = server_log_text("text", _executor_failing_to_start)

    def failing_run() -> None:
        raise DEPLOY_ERROR

    code, lines, calls = deploy({"server": {"log_format": "text"}}, run=failing_run, details=MESSAGE_HEAD + log)
    assert (code, calls["delete"]) == (2, [APP])
    assert lines == [f"inlaid ray: application {APP!r} failed to deploy (a replica's Inlaid server cannot serve: "
                     f"{FATAL}); deleting it"]


NO_GPU_NODE = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}]
WANTS_A_GPU = {"ray": {"num_replicas": 1, "app_name": APP, "num_gpus": 1}}


def test_replicas_no_node_can_host_are_refused_on_a_cluster_started_here(deploy) -> None:
    code, lines, calls = deploy(WANTS_A_GPU, address="local", nodes=NO_GPU_NODE)
    assert (code, calls["run"]) == (2, [])
    assert lines == ["inlaid ray: no node of the cluster can host a replica (ray.num_gpus = 1, ray.num_cpus = 1; "
                     "its 1 node has at most 0 GPU, 2 CPU)"]


def test_replicas_no_node_can_host_yet_are_a_warning_on_a_running_cluster(deploy) -> None:
    # A running cluster may autoscale (its autoscaler adds the node Ray asks for): deploy anyway.
    code, lines, calls = deploy(WANTS_A_GPU, address="auto", nodes=NO_GPU_NODE)
    assert (code, len(calls["run"])) == (0, 1)
    assert len(lines) == 1 and lines[0].startswith("inlaid ray: warning: no node of the cluster can host a replica")


def test_replicas_a_node_can_host_deploy_without_a_word(deploy) -> None:
    nodes = [{"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}, *NO_GPU_NODE,
             {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]
    code, lines, calls = deploy(WANTS_A_GPU, address="local", nodes=nodes)
    assert (code, lines, len(calls["run"])) == (0, [], 1)


def test_a_dropped_server_address_is_one_warning_line(deploy) -> None:
    code, lines, _ = deploy({"server": {"address": "tcp://127.0.0.1:5555"}})
    assert code == 0 and len(lines) == 1 and lines[0].startswith("inlaid ray: warning: [server] address ignored")


def test_the_commands_signal_handlers_are_put_back_when_it_returns(deploy) -> None:
    """Its handlers only record a signal once the app is deleted: left installed, Ctrl-C during
    Ray's shutdown at exit was ignored (a review)."""
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    code, _, calls = deploy({}, run=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert (code, calls["delete"]) == (130, [APP])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_text_record_with_both_keys_gives_the_last_ones_value() -> None:
    from inlaid.integrations.ray_deploy import _log_reason

    line = "04:19:41 CRITICAL inlaid.coordinator: cannot serve; exiting  [error=first reason=the executor died]"
    assert _log_reason(line) == (2, "cannot serve; exiting", "the executor died")


TWO_CPUS = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}]


def test_replicas_and_an_ingress_that_do_not_fit_together_are_said(deploy) -> None:
    """Two 1-CPU replicas on a 2-CPU cluster: each fits a node, but the ingress (0.1 CPU) then
    has no room and the deploy waited forever, only Ray's controller log saying why."""
    two_whole = {"ray": {"num_replicas": 2, "num_cpus": 1, "app_name": APP}}
    code, lines, calls = deploy(two_whole, address="local", nodes=TWO_CPUS)
    assert (code, calls["run"]) == (2, [])
    assert lines == ["inlaid ray: the cluster cannot host the 2 replicas the deploy starts and the ingress together "
                     "(2 x ray.num_cpus 1 + 1 x ray.ingress_num_cpus 0.1 CPU, 2 x ray.num_gpus 0 GPU; its 1 node has "
                     "2 CPU, 0 GPU in all): lower ray.num_cpus (a fraction is fine), ray.num_replicas or "
                     "ray.ingress_num_cpus"]
    code, lines, calls = deploy(two_whole, address="auto", nodes=TWO_CPUS)  # nodes may join: a warning
    assert (code, len(calls["run"])) == (0, 1) and len(lines) == 1, lines
    assert lines[0].startswith("inlaid ray: warning: the cluster cannot host the 2 replicas")
    for fits in ({"num_replicas": 2, "num_cpus": 0.5}, {"num_replicas": 2, "num_cpus": 1, "ingress_num_cpus": 0},
                 {"num_replicas": "auto", "num_cpus": 1}):  # autoscaling starts min_replicas (1)
        sections = {"ray": {**fits, "app_name": APP}}
        if fits["num_replicas"] == "auto":
            sections["ray.autoscaling"] = {"min_replicas": 1, "max_replicas": 4}
        code, lines, calls = deploy(sections, address="local", nodes=TWO_CPUS)
        assert (code, lines) == (0, []), (fits, lines)
    split = [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.5}}]
    code, lines, _ = deploy(two_whole, address="local", nodes=split)  # one replica per node, the ingress beside one
    assert (code, lines) == (0, [])
    # The ingress must not take the GPU node's only CPU from the GPU replica (placed first).
    mixed = [{"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 0.5}}]
    one_gpu = {"ray": {"num_replicas": 1, "num_cpus": 1, "num_gpus": 1, "app_name": APP}}
    assert deploy(one_gpu, address="local", nodes=mixed)[:2] == (0, [])
    code, lines, _ = deploy({"ray": {"num_replicas": "auto", "num_cpus": 1, "app_name": APP},
                             "ray.autoscaling": {"initial_replicas": 2, "max_replicas": 4}}, nodes=TWO_CPUS)
    assert "[ray.autoscaling] initial_replicas / min_replicas or ray.ingress_num_cpus;" in lines[0], lines


def test_a_cluster_that_refuses_the_shells_credentials_says_so(deploy) -> None:
    """`--address HOST:PORT` on a token-auth cluster from a shell without RAY_AUTH_MODE=token
    said "no Ray cluster at ..." though one was listening."""
    from ray.exceptions import AuthenticationError

    def refused(**options: Any) -> None:  # Ray 2.60's chain: the GCS attempts' last error, as text, in a RuntimeError
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1") from RuntimeError(
            "Failed to connect to GCS within 20 seconds. Last connection error: Traceback ... "
            "ray.exceptions.AuthenticationError: Unauthenticated: InvalidAuthToken")

    def refused_directly(**options: Any) -> None:
        try:
            raise AuthenticationError("Unauthenticated")
        except AuthenticationError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1") from cause

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    address = f"127.0.0.1:{listening.getsockname()[1]}"
    try:
        for init in (refused, refused_directly):
            code, lines, calls = deploy({"ray": {"num_replicas": 1, "app_name": APP}}, address=address, init=init)
            assert (code, calls["run"]) == (2, [])
            assert lines == [f"inlaid ray: the Ray cluster at {address!r} refused this process: it uses token "
                             "authentication; set RAY_AUTH_MODE=token in this shell, with the cluster's token in "
                             "~/.ray/auth_token (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"]
    finally:
        listening.close()


def test_the_proxys_address_is_refused_by_the_keys_the_config_has(deploy) -> None:
    # It said ray.http.port / ray.http.host: no such keys.
    for key, value, words in (("http_port", 70000, "ray.http_port must be an integer in 1-65535, got 70000"),
                              ("http_host", "0.0.0.0", "ray.http_host '0.0.0.0' is not a loopback address")):
        code, lines, calls = deploy({"ray": {"num_replicas": 1, "app_name": APP, key: value}})
        assert (code, calls["init"]) == (2, []) and len(lines) == 1 and words in lines[0], lines


def test_a_server_slow_to_start_is_named_as_the_deploys_reason(deploy) -> None:
    """ray.replica_start_timeout_s = 0.5 ran out: the line said only "Failed to update the
    deployments", and the replica's own error printed 0.5 s as "0 s" (an outside probe)."""
    details = ("Failed to update the deployments ['InlaidReplica'].\nray.exceptions.RayTaskError(RuntimeError): "
               f"ray::ServeReplica:{APP}:InlaidReplica.initialize_and_get_metadata() (pid=4242)\n"
               "RuntimeError: the replica's Inlaid server was not ready in 0.5 s:\n"
               '{"level": "INFO", "msg": "executor started"}\n')

    def failing_run() -> None:
        raise DEPLOY_ERROR

    expected = [f"inlaid ray: application {APP!r} failed to deploy (a replica's Inlaid server was not ready in "
                "0.5 s (ray.replica_start_timeout_s)); deleting it"]
    code, lines, calls = deploy({}, run=failing_run, details=details)
    assert (code, calls["delete"], lines) == (2, [APP], expected)
    # a warning in its log's tail is no reason of the failure (it was named instead)
    warned = details + ('{"level": "WARNING", "msg": "could not clean up stale ipc directories", '
                        '"error": "PermissionError(13)"}\n')
    code, lines, calls = deploy({}, run=failing_run, details=warned)
    assert (code, lines) == (2, expected)
    failed = details + '{"level": "ERROR", "msg": "cannot load the model", "error": "no config.json"}\n'
    code, lines, calls = deploy({}, run=failing_run, details=failed)  # an error record says why better
    assert (code, len(lines)) == (2, 1) and "no config.json" in lines[0], lines


def test_a_serve_already_listening_elsewhere_is_refused_before_deploying(deploy, monkeypatch) -> None:
    """Serve keeps the proxy options it was first started with: a deploy asking for another
    port was served on the old one, and one asking for loopback stayed public on 0.0.0.0."""
    import ray.serve.context

    running = types.SimpleNamespace(http_config=types.SimpleNamespace(host="0.0.0.0", port=59080))
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda *a, **k: running)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as after the command's ray.init
    code, lines, calls = deploy({"ray": {"num_replicas": 1, "app_name": APP, "http_port": 59082}})
    assert (code, calls["run"]) == (2, [])
    assert lines == ["inlaid ray: Ray Serve on this cluster already listens on 0.0.0.0:59080 (started earlier, it "
                     "keeps its proxy's options); [ray] http_host / http_port ask for 127.0.0.1:59082: set them to "
                     "0.0.0.0 / 59080 (a public host also needs server.allow_public_bind), or end that Serve first "
                     "(`serve shutdown`)"]
    running.http_config = types.SimpleNamespace(host="127.0.0.1", port=59082)  # where the config asks: deployed
    code, lines, calls = deploy({"ray": {"num_replicas": 1, "app_name": APP, "http_port": 59082}})
    assert (code, lines, len(calls["run"])) == (0, [], 1)
