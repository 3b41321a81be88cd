"""Start `inlaid serve` as a child process on free loopback ports (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from inlaid.addresses import local_address
from inlaid.client import Client


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    """The flat-table TOML our config uses (strings, numbers, booleans)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        raise TypeError(f"cannot write {type(item).__name__} to the config")

    lines = []
    for section, table in config.items():
        lines.append(f"[{section}]")
        lines.extend(f'"{key}" = {value(item)}' for key, item in table.items())
        lines.append("")
    return "\n".join(lines)


class ServerProcess:
    """A running `inlaid serve` (or `command`, given the same `--config FILE`: another server
    speaking the protocol, such as bench/baselines/hf_peft_server.py); logs go to `log_path`.
    A config with an `[http]` section gets a free port for the front unless it names one
    (`http_url` is its base URL)."""

    def __init__(self, config: dict[str, dict[str, Any]], workdir: str | Path | None = None,
                 command: list[str] | None = None) -> None:
        self._owns_workdir = workdir is None  # removed after a clean exit; kept for post-mortems
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="inlaid-server-"))
        server = dict(config.get("server", {}))
        server.setdefault("address", f"tcp://127.0.0.1:{free_tcp_port()}")
        config = {**config, "server": server}
        self.http_url: str | None = None
        if "http" in config:
            http = {"port": free_tcp_port(), **config["http"]}
            config["http"] = http
            self.http_url = f"http://{http.get('host', '127.0.0.1')}:{http['port']}"
        self.address: str = local_address(server["address"])  # where this machine's clients reach it
        self.admin_token: str | None = server.get("admin_token")
        self.config_path = self.workdir / "server.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = self.workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "inlaid.cli", "serve"]), "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("admin_token", self.admin_token)
        return Client(self.address, **kwargs)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Until the server (and its front, with `[http]`) answers as ready; RuntimeError with
        its log's tail when it exits first or is not ready in `timeout_s`, then stopped (a
        caller that raised on, before its own clean-up was armed, left it running)."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
                try:
                    client.wait_ready(timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
                    if self.http_url is None or self._http_ready():
                        return
                    time.sleep(0.1)
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    stop_process(self.process, 10.0)
                    raise RuntimeError(f"the server was not ready in {timeout_s:.0f} s:\n{self.logs()[-4000:]}")

    def _http_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful shutdown); returns the exit code. Kills after `timeout_s`."""
        stop_process(self.process, timeout_s)
        self._log.close()
        if self._owns_workdir and self.process.returncode == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return int(self.process.returncode)

    def remove_workdir(self) -> None:
        """Remove the working folder (its config holds the admin token) whatever the exit code:
        `terminate` keeps it after a failure, for a post-mortem."""
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a server finishes its in-flight requests), SIGKILL past `timeout_s`; returns
    once the process has exited."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM again while it stops: no more waiting, nothing left running
            process.kill()
            process.wait()
            raise
