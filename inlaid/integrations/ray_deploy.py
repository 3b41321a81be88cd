"""`python -m inlaid.integrations.ray --config FILE [--address ADDR]`: deploy Inlaid on a Ray
cluster (docs/scale-out.md) and keep it deployed until Ctrl-C or SIGTERM.

Whatever stops the command before that ends with one line on stderr and the application
deleted: a config that cannot serve is refused before connecting (exit 2); an address with
no cluster behind it is refused in seconds (exit 2), where Ray would retry forever; a
deployment that fails on the cluster (a replica's server cannot start) is deleted (exit 2),
where it would otherwise stay deployed, failing, after a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys

from inlaid.integrations.ray_config import load_ray_config

_PROBE_TIMEOUT_S = 5.0  # a TCP connect to the cluster's GCS: a live one accepts at once
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


def deploy_failure_reason(error: BaseException, details: str = "") -> str:
    """One line for a deployment that failed on the cluster. serve.run's error says only that
    it failed; its deployments' status messages (`details`) carry the replica's traceback with
    its server's log, whose "cannot start" record (JSON with an `error`) says why best."""
    reasons = []
    for line in f"{error}\n{details}".splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("error"), str):
            reasons.append(record["error"])
    if reasons:
        return f"a replica's Inlaid server cannot start: {reasons[-1]}"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first[:500]


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
    parser.add_argument("--address", default="auto", help="the Ray cluster (ray.init address)")
    args = parser.parse_args(argv)

    from inlaid.serve.config import ConfigError

    try:
        config = load_ray_config(args.config)
    except ConfigError as error:
        print(f"inlaid ray: {error}", file=sys.stderr)
        return 2
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
        print(f"inlaid ray: no Ray cluster at {args.address!r} ({error}); start one with `ray start --head`, or "
              "pass --address local for a cluster inside this process", file=sys.stderr)
        return 2
    terminated: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    def delete_application() -> bool:
        try:
            serve.delete(config.app_name)
            return True
        except KeyboardInterrupt:
            print(f"inlaid ray: interrupted again; application {config.app_name!r} may still be deployed "
                  f"(serve.delete it, or `serve shutdown`)", file=sys.stderr)
            return False

    # SIGTERM (`kill`, a process manager's stop) ends the deployment as Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        serve.start(http_options={"host": config.http_host, "port": config.http_port})
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=True)
    except KeyboardInterrupt:
        # Ctrl-C ends the deployment this command made: without the delete, the app would
        # keep serving (and holding GPUs) on the cluster after the command is gone.
        how = "terminated" if terminated else "interrupted"
        print(f"inlaid ray: {how}; deleting application {config.app_name!r}", file=sys.stderr)
        delete_application()
        return 128 + (terminated[0] if terminated else signal.SIGINT)  # the shell's convention
    except RuntimeError as error:
        # serve.run's "Deploying application ... failed" (Ray has retried the replicas): the
        # failed app would stay deployed, its controller retrying it, after the command exits.
        reason = deploy_failure_reason(error, _deployment_messages(config.app_name))
        print(f"inlaid ray: application {config.app_name!r} failed to deploy ({reason}); deleting it",
              file=sys.stderr)
        delete_application()
        return 2
    return 0
