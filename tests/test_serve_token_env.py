"""The admin token read from `server.admin_token_env` stays in `inlaid serve`'s own process:
the executor and the HTTP front inherited the variable, where /proc/<pid>/environ shows it
to anyone who may read it (an outside probe; neither needs it: the front passes on each
caller's own token). Admin calls still work, through the SDK and over HTTP. The same server
reads `server.task_histograms = false` from its file: /metrics' histograms carry no task."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from inlaid.serve.launcher import ServerProcess
from serving_helpers import server_config

TOKEN = "env-token-for-this-test-0123456789"


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_the_token_variable_is_not_inherited_by_the_servers_processes(model_dir: Path, adapter_dirs, tmp_path,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("INLAID_TEST_ADMIN_TOKEN", TOKEN)
    config = server_config(model_dir, {"attn-r8": adapter_dirs["attn-r8"]},
                           admin_token_env="INLAID_TEST_ADMIN_TOKEN", shutdown_grace_s=2.0, task_histograms=False)
    config["http"] = {}
    server = ServerProcess(config, workdir=tmp_path)
    try:
        server.wait_ready(timeout_s=300)
        children = _children(server.pid)
        commands = []
        for child in children:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                commands.append(cmdline.read())
            with open(f"/proc/{child}/environ", "rb") as environ:
                assert TOKEN.encode() not in environ.read(), commands[-1]
        assert any(b"inlaid.serve.executor" in command for command in commands), commands
        assert any(b"inlaid.http" in command for command in commands), commands
        with server.client(admin_token=TOKEN) as client:  # the coordinator holds it
            assert client.remove_task("attn-r8")
        request = urllib.request.Request(
            f"{server.http_url}/v1/load_lora_adapter", method="POST",
            data=json.dumps({"lora_name": "again", "lora_path": str(adapter_dirs["attn-r8"])}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
        # server.task_histograms = false read from the file reaches the coordinator's metrics
        with server.client() as client:
            client.generate("Hello", task="again", max_tokens=2)
        with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=60) as response:
            exposition = response.read().decode()
        assert 'inlaid_generation_tokens_total{task="again"}' in exposition
        counts = [line for line in exposition.splitlines() if line.startswith("inlaid_request_duration_seconds_count")]
        assert counts == ["inlaid_request_duration_seconds_count 1.0"], counts
    finally:
        server.terminate()
