"""`python -m inlaid.integrations.ray --config FILE [--address ADDR]`: deploy Inlaid on a Ray
cluster (docs/scale-out.md) and keep it deployed until Ctrl-C or SIGTERM.

Whatever stops the command before that ends with one line on stderr and the application
deleted: a config that cannot serve is refused before connecting (exit 2); an address with
no cluster behind it is refused in seconds (exit 2), where Ray would retry forever; a
deployment that fails on the cluster (a replica's server cannot start) is deleted (exit 2),
where it would otherwise stay deployed, failing, after a traceback, with one line naming its
server's reason; replicas no node can host are refused on a cluster started here (exit 2),
where Ray would wait forever, and said in a warning line on a running one (it may autoscale).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

from inlaid.integrations.ray_config import RayDeploymentConfig, load_ray_config

_PROBE_TIMEOUT_S = 5.0  # a TCP connect to the cluster's GCS: a live one accepts at once
_WATCH_PERIOD_S = 5.0  # how often the deployed command checks that its application is still there
_WATCH_FAILURES = 3
_LOCAL_ADDRESSES = ("auto", "local", "")  # ray.init's own words, not a host:port


def gcs_address_problem(address: str, timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why nothing can be a Ray cluster at `address` (host:port, or ray://host:port for Ray
    Client), or None when something accepts TCP connections there (or the address is one
    of ray.init's own words). ray.init itself retries an explicit address forever."""
    if address in _LOCAL_ADDRESSES:
        return None
    host_port = address.removeprefix("ray://")
    host, _, port_text = host_port.rpartition(":")
    if not host or not (port_text.isascii() and port_text.isdigit()):
        return f"expected host:port (or auto / local), got {address!r}"
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s):
            return None
    except OSError as error:
        return f"nothing accepts connections at {host_port} ({error})"


# A record of the server's text log format (inlaid/serve/logs.py TextFormatter):
# "04:19:41 CRITICAL inlaid.coordinator: cannot serve; exiting  [reason=...]".
_TEXT_RECORD = re.compile(r"\b\d\d:\d\d:\d\d (?P<level>CRITICAL|ERROR)\s+inlaid[\w.]*: "
                          r"(?P<msg>.*?)(?:  \[(?P<extras>.*)\])?\s*$")
# Its extras are `key=value` joined by spaces, values unquoted: a reason (or error) runs to the
# end, which is where the server's records put it.
_TEXT_REASON = re.compile(r"^(?:.* )?(?:reason|error)=(?P<reason>.*)$")  # the last such key: greedy prefix
_LEVEL_RANK = {"critical": 2, "error": 1}  # a critical record is why the server ended


def _log_reason(line: str) -> tuple[int, str, str] | None:
    """(rank, msg, reason) of a server log line (JSON or text format) that says why something
    failed: a critical or error record with a `reason` or `error` field (a record of any
    level with an `error` ranks lowest)."""
    start = line.find("{")
    if start >= 0:
        try:
            record = json.loads(line[start:])
        except ValueError:
            record = None
        if isinstance(record, dict):
            rank = _LEVEL_RANK.get(str(record.get("level", "")).lower(), 0)
            for key in ("reason", "error") if rank else ("error",):
                if isinstance(record.get(key), str):
                    return rank, str(record.get("msg", "")), record[key]
            return None
    match = _TEXT_RECORD.search(line)
    if match is None or match["extras"] is None:
        return None
    reason = _TEXT_REASON.search(match["extras"])
    return (_LEVEL_RANK[match["level"].lower()], match["msg"], reason["reason"]) if reason else None


def deploy_failure_reason(error: BaseException, details: str = "") -> str:
    """One line for a deployment that failed on the cluster. serve.run's error says only that
    it failed; its deployments' status messages (`details`) carry the replica's traceback with
    its server's log, whose last critical record ("cannot start" with an `error`, "cannot
    serve; exiting" with a `reason`) says why best, in either log format."""
    found = [reason for line in f"{error}\n{details}".splitlines() if (reason := _log_reason(line))]
    # A server still starting when ray.replica_start_timeout_s ran out (only Ray's traceback
    # said so; the line named serve.run's "failed to update", or a warning of its log's tail).
    slow = _NOT_READY.search(f"{error}\n{details}")
    if slow and not any(rank >= _LEVEL_RANK["error"] for rank, _, _ in found):
        return f"a replica's Inlaid server was not ready in {slow.group(1)} s (ray.replica_start_timeout_s)"
    if found:
        rank = max(rank for rank, _, _ in found)
        _, msg, reason = [item for item in found if item[0] == rank][-1]
        if msg.startswith("cannot"):  # "cannot start", "cannot serve; exiting", "cannot listen"
            return f"a replica's Inlaid server {msg.split(';')[0]}: {reason}"
        return f"a replica's Inlaid server logged {msg!r}: {reason}" if msg else f"a replica's Inlaid server: {reason}"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first[:500]


_NOT_READY = re.compile(r"the replica's Inlaid server was not ready in ([0-9.e+-]+) s")


def proxy_mismatch(config: RayDeploymentConfig) -> str | None:
    """Why the cluster's Serve proxy does not listen where [ray] http_host / http_port say, or
    None. Serve, once started, keeps its proxy's options: a later deploy asking for another
    port was served on the old one, and one asking for loopback stayed on a public 0.0.0.0,
    with only an INFO line of Ray's ("will not be applied"; an outside probe)."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        if not ray.is_initialized():  # (the client would call ray.init itself)
            return None
        options = _get_global_client().http_config
        host, port = options.host, int(options.port)
    except Exception:  # noqa: BLE001 (Ray's internals moved, or no client: Ray's own behaviour stands)
        return None
    if (host, port) == (config.http_host, config.http_port):
        return None
    if host is None:
        return (f"Ray Serve on this cluster runs without an HTTP proxy (started earlier, it keeps its proxy's "
                f"options); [ray] http_host / http_port ask for {config.http_host}:{config.http_port}: end that "
                f"Serve first (`serve shutdown`)")
    return (f"Ray Serve on this cluster already listens on {host}:{port} (started earlier, it keeps its proxy's "
            f"options); [ray] http_host / http_port ask for {config.http_host}:{config.http_port}: set them to "
            f"{host} / {port} (a public host also needs server.allow_public_bind), or end that Serve first "
            f"(`serve shutdown`)")


def unplaceable_replica(num_cpus: float, num_gpus: float, nodes: list[dict[str, Any]]) -> str | None:
    """Why no live node of `nodes` (ray.nodes()) can host one replica, or None. Ray would
    wait for such a node forever (replica_start_timeout_s bounds a replica's server start,
    not its placement), logging only "No available node types can fulfill resource request"."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
    if any(res.get("CPU", 0.0) >= num_cpus and res.get("GPU", 0.0) >= num_gpus for res in alive):
        return None
    most_gpus = max((res.get("GPU", 0.0) for res in alive), default=0.0)
    most_cpus = max((res.get("CPU", 0.0) for res in alive), default=0.0)
    return (f"no node of the cluster can host a replica (ray.num_gpus = {num_gpus:g}, ray.num_cpus = {num_cpus:g}; "
            f"its {len(alive)} node{' has' if len(alive) == 1 else 's have'} at most {most_gpus:g} GPU, "
            f"{most_cpus:g} CPU)")


def unplaceable_deployment(config: RayDeploymentConfig, nodes: list[dict[str, Any]]) -> str | None:
    """Why the live nodes of `nodes` cannot host one replica, or the replicas the deploy starts
    and the ingress together (placed first-fit as whole actors, GPU ones first, then by CPUs), or
    None. Two 1-CPU replicas on a 2-CPU cluster left the ingress (0.1 CPU) unplaced: the
    deploy waited forever, and only Ray's controller log said why (an outside probe)."""
    if problem := unplaceable_replica(config.num_cpus, config.num_gpus, nodes):
        return problem
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
    free = [[res.get("CPU", 0.0), res.get("GPU", 0.0)] for res in alive]
    table = config.autoscaling or {}
    starting = int(config.num_replicas) if config.autoscaling is None else int(
        table.get("initial_replicas", table.get("min_replicas", 1)))
    fewer = "ray.num_replicas" if config.autoscaling is None else "[ray.autoscaling] initial_replicas / min_replicas"
    ingress = [(0.0, config.ingress_num_cpus)] * config.ingress_replicas
    actors = [(config.num_gpus, config.num_cpus)] * starting + ingress
    for gpus, cpus in sorted(actors, reverse=True):
        node = next((node for node in free if node[0] >= cpus - 1e-9 and node[1] >= gpus - 1e-9), None)
        if node is None:
            return (f"the cluster cannot host the {starting} replicas the deploy starts and the ingress together "
                    f"({starting} x ray.num_cpus {config.num_cpus:g} + {config.ingress_replicas} x "
                    f"ray.ingress_num_cpus {config.ingress_num_cpus:g} CPU, {starting} x ray.num_gpus "
                    f"{config.num_gpus:g} GPU; its {len(alive)} node{' has' if len(alive) == 1 else 's have'} "
                    f"{sum(res.get('CPU', 0.0) for res in alive):g} CPU, {sum(res.get('GPU', 0.0) for res in alive):g}"
                    f" GPU in all): lower ray.num_cpus (a fraction is fine), {fewer} or ray.ingress_num_cpus")
        node[0] -= cpus
        node[1] -= gpus
    return None


def _connection_refusal(address: str, error: ConnectionError) -> str:
    """Why `ray.init(address)` failed, in one line. A cluster with token authentication (Ray
    2.60's default) refuses a shell without RAY_AUTH_MODE=token: that was "no Ray cluster at
    ..." after 20 lines of GCS errors, though one was listening (`auto` reads the mode from
    the local session, an explicit address does not)."""
    if _refused_credentials(error):
        return (f"the Ray cluster at {address!r} refused this process: it uses token authentication; set "
                "RAY_AUTH_MODE=token in this shell, with the cluster's token in ~/.ray/auth_token (or "
                "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)")
    return (f"no Ray cluster at {address!r} ({error}); start one with `ray start --head`, or pass --address local "
            "for a cluster inside this process")


def _refused_credentials(error: BaseException) -> bool:
    """Whether `error` or what caused it is the cluster refusing this process's token. Ray 2.60
    retries the GCS connection for ~20 s, then raises ConnectionError from a RuntimeError whose
    text holds the last attempt's traceback ("Unauthenticated ... InvalidAuthToken")."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in seen and len(seen) < 8:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return any(type(link).__name__ == "AuthenticationError" or "Unauthenticated" in str(link)
               or "InvalidAuthToken" in str(link) for link in seen)


def _cluster_nodes() -> list[dict[str, Any]] | None:
    import ray

    try:
        return list(ray.nodes())
    except Exception:  # noqa: BLE001 (only the early warning is lost; Ray still places the replicas)
        return None


def _deployment_messages(app_name: str) -> str:
    """The status messages of the application's deployments ("" when Serve cannot say)."""
    from ray import serve

    try:
        application = serve.status().applications[app_name]
        return "\n".join(deployment.message for deployment in application.deployments.values())
    except Exception:  # noqa: BLE001 (only an explanation is lost; the failure is reported anyway)
        return ""


def deploy_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inlaid.integrations.ray",
                                     description="deploy Inlaid on a running Ray cluster (docs/scale-out.md)")
    parser.add_argument("--config", required=True, help="server TOML with a [ray] section")
    parser.add_argument("--address", default="auto",
                        help="the Ray cluster (ray.init's address; default auto: the cluster this node runs; "
                        "'local': a cluster of this machine alone, started for the deploy; or HOST:PORT)")
    args = parser.parse_args(argv)

    from inlaid.serve.config import ConfigError

    try:
        config = load_ray_config(args.config)
    except ConfigError as error:
        print(f"inlaid ray: {error}", file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"inlaid ray: warning: {warning}", file=sys.stderr)
    problem = gcs_address_problem(args.address)
    if problem is not None:
        print(f"inlaid ray: no Ray cluster at {args.address!r}: {problem}; start one with `ray start --head`, or "
              "pass --address local for a cluster inside this process", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from inlaid.integrations.ray import build_app

    try:
        ray.init(address=args.address)
    except ConnectionError as error:  # "auto" with no cluster running here
        print(f"inlaid ray: {_connection_refusal(args.address, error)}", file=sys.stderr)
        return 2
    nodes = _cluster_nodes()
    problem = unplaceable_deployment(config, nodes) if nodes is not None else None
    if problem is not None and args.address == "local":  # started here: no autoscaler adds a node to it
        print(f"inlaid ray: {problem}", file=sys.stderr)
        return 2
    if problem is not None:  # an autoscaling cluster may add such a node: Ray waits for one
        print(f"inlaid ray: warning: {problem}; the deploy waits until nodes that have room join", file=sys.stderr)
    return _serve(config, serve, build_app)


def wait_while_deployed(serve: Any, app_name: str, period_s: float = _WATCH_PERIOD_S) -> str:
    """Block while the application is deployed on the cluster; why it is not any more. It
    blocked forever after `serve shutdown` or a delete by someone else, and a Ctrl-C then
    ended in a traceback (an outside probe). Serve answering with an error `_WATCH_FAILURES`
    checks in a row counts as stopped (its controller restarting fails a check or two). A
    controller that does not answer at all (slow, failing over) is waited on, one question at
    a time: the command keeps its application, as Ctrl-C still does (ending the command on a
    slow answer left the application serving with no owner: a reviewer)."""
    failures = 0
    asking: _StatusQuestion | None = None
    while True:
        time.sleep(period_s)
        asking = asking or _StatusQuestion(serve)
        if not asking.answered(max(period_s, _PROBE_TIMEOUT_S)):
            continue  # Ray's status call has no time limit: the same question, waited on again
        error, applications, asking = asking.error, asking.applications, None
        if error is not None:  # no Serve instance on the cluster any more (its controller is gone)
            failures += 1
            if failures >= _WATCH_FAILURES:
                return f"Ray Serve stopped on the cluster ({type(error).__name__}: {str(error).strip()[:160]})"
            continue
        failures = 0
        if app_name not in applications:
            return f"application {app_name!r} was deleted on the cluster, not by this command"


class _StatusQuestion:
    """serve.status() asked in a daemon thread (one left waiting does not hold the exit)."""

    def __init__(self, serve: Any) -> None:
        self.applications: Any = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._ask, args=(serve,), name="serve-status", daemon=True)
        self._thread.start()

    def _ask(self, serve: Any) -> None:
        try:
            self.applications = serve.status().applications
        except Exception as error:  # handed to the watch
            self.error = error

    def answered(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def _serve(config: RayDeploymentConfig, serve: Any, build_app: Any) -> int:
    """Deploy and block until a signal or a failed deploy; the first SIGINT/SIGTERM deletes the
    application, a second one leaves it as it is, and says so, wherever it arrives: a handler
    raises only at the points that can take it, so no traceback escapes from a print."""
    signals: list[int] = []
    phase = ["running"]  # running -> ending -> deleting -> done

    def interrupt(signum: int, frame: object) -> None:
        signals.append(signum)
        if phase[0] == "running":  # ends serve.run; a signal that follows only counts
            phase[0] = "ending"
            raise KeyboardInterrupt
        if phase[0] == "deleting":  # interrupts serve.delete, once
            phase[0] = "done"
            raise KeyboardInterrupt

    def delete_application(announce: str) -> None:
        print(announce, file=sys.stderr)
        try:
            phase[0] = "deleting"
            if len(signals) > 1:  # the second signal came before the delete began
                phase[0] = "done"
                raise KeyboardInterrupt
            try:
                serve.delete(config.app_name)
            except Exception as error:  # Serve (its controller) gone under the command: a traceback was all
                print(f"inlaid ray: application {config.app_name!r} could not be deleted (Ray Serve stopped on the "
                      f"cluster?): {type(error).__name__}: {str(error).strip()[:200]}", file=sys.stderr)
            phase[0] = "done"  # deleted: a signal from here on must not say "left as it is"
        except KeyboardInterrupt:
            phase[0] = "done"
            print(f"inlaid ray: interrupted again; application {config.app_name!r} left as it is, maybe still "
                  f"deployed (serve.delete it, or `serve shutdown`)", file=sys.stderr)
        phase[0] = "done"

    # SIGTERM (`kill`, a process manager's stop) ends the deployment as Ctrl-C does. The
    # handlers are this function's: restored when it returns, so that Ray's own shutdown at
    # exit can be interrupted as any program can.
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": config.http_host, "port": config.http_port})
        if mismatch := proxy_mismatch(config):
            print(f"inlaid ray: {mismatch}", file=sys.stderr)
            return 2
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        if gone := wait_while_deployed(serve, config.app_name):
            print(f"inlaid ray: {gone}; exiting", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        # Ctrl-C ends the deployment this command made: without the delete, the app would
        # keep serving (and holding GPUs) on the cluster after the command is gone.
        phase[0] = "ending"
        first = signals[0] if signals else signal.SIGINT
        how = "terminated" if first == signal.SIGTERM else "interrupted"
        delete_application(f"inlaid ray: {how}; deleting application {config.app_name!r}")
        return 128 + first  # the shell's convention
    except RuntimeError as error:
        # serve.run's "Deploying application ... failed" (Ray has retried the replicas): the
        # failed app would stay deployed, its controller retrying it, after the command exits.
        phase[0] = "ending"
        reason = deploy_failure_reason(error, _deployment_messages(config.app_name))
        delete_application(f"inlaid ray: application {config.app_name!r} failed to deploy ({reason}); deleting it")
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
