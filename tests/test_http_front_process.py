"""The HTTP front's process and its metrics, end to end: `/metrics` after a known workload
(parsed with `prometheus_client.parser`), a killed front restarted on the same socket, a
stopped one killed and restarted, the front alone in front of a running server, a server listening on every
interface reached over loopback, health and the SIGTERM drain.

One server (http_harness.py) serves the module; the SIGTERM test comes last because it stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import openai
import pytest
from http_harness import (MAX_TOKENS, PROMPTS, base_model, delta, http_request, scrape, server,  # noqa: F401
                          value, wait_idle)  # (base_model, server: the module's fixtures)

from inlaid.client import AsyncClient, Client, UnknownTaskError
from inlaid.serve.launcher import free_tcp_port


def test_metrics_after_a_known_workload(server, base_model):
    """Counters and histogram counts move by exactly the requests and tokens sent."""
    wait_idle(server)
    jobs = [(task, prompt) for task in (None, "attn-r8", "all-r32") for prompt in PROMPTS] + [("mlp-r16", PROMPTS[0])]
    with server.client() as client:
        # Steps run one after another: once this request is done, no step of earlier
        # (cancelled) work can still be in flight.
        client.generate("barrier", max_tokens=1)
        steps_before = client.stats().steps
        before = scrape(server)
        results = asyncio.run(_generate_all(server, jobs))
        with pytest.raises(UnknownTaskError):
            client.generate("x", task="no-such-task")
        with pytest.raises(UnknownTaskError):  # the base's metrics label, as a task name: unknown too
            client.generate("x", task="__base__")
        steps = client.stats().steps - steps_before
    after = scrape(server)
    by_task: dict[str, list] = {}
    for (task, _), result in zip(jobs, results):
        by_task.setdefault(task or "__base__", []).append(result)
    for label, done in by_task.items():
        outcomes = Counter(r.finish_reason for r in done)
        for outcome, count in outcomes.items():
            assert delta(before, after, "inlaid_requests_total", task=label, outcome=outcome) == count
        assert delta(before, after, "inlaid_prompt_tokens_total", task=label) == sum(r.num_prompt_tokens for r in done)
        generated = sum(len(r.token_ids) for r in done)
        assert delta(before, after, "inlaid_generation_tokens_total", task=label) == generated
        for histogram in ("inlaid_request_duration_seconds", "inlaid_request_queue_seconds",
                          "inlaid_time_to_first_token_seconds"):
            assert delta(before, after, f"{histogram}_count", task=label) == len(done), (label, histogram)
            assert delta(before, after, f"{histogram}_bucket", task=label, le="+Inf") == len(done)
        assert delta(before, after, "inlaid_time_per_output_token_seconds_count", task=label) == sum(
            len(r.token_ids) >= 2 for r in done)
        # Latencies are positive and no larger than the client saw.
        total = delta(before, after, "inlaid_request_duration_seconds_sum", task=label)
        assert 0 < total <= sum(r.total_seconds for r in done) + 0.05 * len(done)
    assert delta(before, after, "inlaid_requests_total", task="__unknown__", outcome="unknown_task") == 2
    assert value(after, "inlaid_requests_total", task="__base__", outcome="unknown_task") == 0
    # Per step: one observation per step; every sequence-step is one generated token (each
    # prompt fits one step), every computed token a prompt token or a fed-back sample.
    everything = [r for done in by_task.values() for r in done]
    assert delta(before, after, "inlaid_step_duration_seconds_count") == steps
    assert delta(before, after, "inlaid_step_batch_size_count") == steps
    assert delta(before, after, "inlaid_step_batch_size_sum") == sum(len(r.token_ids) for r in everything)
    assert delta(before, after, "inlaid_computed_tokens_total") == sum(
        r.num_prompt_tokens + len(r.token_ids) - 1 for r in everything)
    adapter_requests = sum(len(done) for label, done in by_task.items() if label != "__base__")
    assert (delta(before, after, "inlaid_adapter_loads_total") + delta(before, after, "inlaid_adapter_hits_total")
            == adapter_requests)
    assert delta(before, after, "inlaid_step_tasks_count") == steps
    assert 1 <= delta(before, after, "inlaid_step_tasks_sum") <= 3 * steps
    # Gauges: idle again, nothing lost, the executor never restarted.
    assert value(after, "inlaid_requests_running") == value(after, "inlaid_requests_waiting") == 0
    assert value(after, "inlaid_kv_blocks_used") == 0 and value(after, "inlaid_kv_blocks_capacity") == 1024
    assert value(after, "inlaid_executor_up") == 1 and value(after, "inlaid_executor_restarts_total") == 0
    assert value(after, "inlaid_tasks") == 3 and value(after, "inlaid_executor_rss_bytes") > 0
    assert value(after, "inlaid_server_info", model=base_model, version="0.1.0") == 1
    # The front counted its own scrape of /metrics, and nothing of the SDK's traffic.
    assert delta(before, after, "inlaid_http_requests_total", route="/metrics", status="200") == 1
    assert delta(before, after, "inlaid_http_requests_total", route="/v1/completions", status="200") == 0
    # The coordinator's own metrics port serves the same server families.
    own = scrape(server, f"http://127.0.0.1:{_metrics_port(server)}/metrics")
    assert value(own, "inlaid_generation_tokens_total", task="attn-r8") == value(
        after, "inlaid_generation_tokens_total", task="attn-r8")
    assert not any(name.startswith("inlaid_http_") for name, _ in own)


def test_the_metrics_port_and_the_front_answer_alike(server):
    """`/metrics` on either: GET and HEAD 200; another path 404 (the port served the
    exposition for any path, and refused HEAD)."""
    for base in (server.http_url, f"http://127.0.0.1:{_metrics_port(server)}"):
        for method, path, status in (("GET", "/metrics", 200), ("HEAD", "/metrics", 200), ("GET", "/foo", 404),
                                     ("POST", "/metrics", 405)):
            request = urllib.request.Request(f"{base}{path}", method=method)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    got, body = response.status, response.read()
            except urllib.error.HTTPError as error:
                got, body = error.code, error.read()
            assert got == status, (base, method, path, got, body[:200])
            if status == 200 and method == "HEAD":
                assert body == b""
            elif status != 200:
                assert json.loads(body)["error"]["code"] == ("not_found" if status == 404 else None)


async def _generate_all(server, jobs):
    async with AsyncClient(server.address, timeout_s=300) as client:
        return await asyncio.gather(*(client.generate(p, task=t, max_tokens=MAX_TOKENS) for t, p in jobs))


def test_a_reply_is_counted_on_the_metrics_port_before_it_arrives(server):
    """The coordinator answered, then counted: a scrape of its port right after a reply missed
    that request in 4 of 20 tries (an outside probe). Now each is counted before it goes."""
    wait_idle(server)
    url = f"http://127.0.0.1:{_metrics_port(server)}/metrics"

    def finished() -> float:
        samples = scrape(server, url)
        return sum(count for (name, labels), count in samples.items()
                   if name == "inlaid_requests_total" and dict(labels).get("task") == "__base__")

    with server.client() as client:
        counted = finished()
        for attempt in range(20):
            client.generate("Hi", max_tokens=1)
            now = finished()
            assert now == counted + 1, attempt
            counted = now


def _metrics_port(server) -> int:
    import tomllib

    return int(tomllib.loads(server.config_path.read_text())["metrics"]["port"])


def _front_pids(server) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.pid and b"inlaid.http" in command:
            pids.append(int(entry))
    return pids


def test_a_lost_front_is_restarted_on_the_same_socket(server):
    """Killing the front loses no new connection: the server holds the listening socket,
    so a request on a new connection waits in its backlog for the next front (connections
    the dead front had accepted are reset; clients reconnect)."""
    (first,) = _front_pids(server)
    os.kill(first, signal.SIGKILL)
    code, _, body = http_request(server, "POST", "/v1/completions", {"model": "attn-r8", "prompt": "Hi", "max_tokens": 2})
    assert code == 200 and json.loads(body)["choices"][0]["text"]
    (second,) = _front_pids(server)
    assert second != first


def test_a_stopped_front_is_killed_and_started_again(server):
    """SIGSTOP (as a stuck event loop): the process lives, so only its silence tells. The
    supervisor's GET /livez asks go unanswered for http.front_liveness_s (9 s here), it kills
    the front and starts another on the same socket. Before, nothing noticed: every request
    hung, /health included."""
    (first,) = _front_pids(server)
    os.kill(first, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while _front_pids(server) in ([first], []):
            assert time.monotonic() < deadline, "the stopped front was never replaced"
            time.sleep(0.5)
    finally:
        try:
            os.kill(first, signal.SIGCONT)
        except ProcessLookupError:
            pass
    (second,) = _front_pids(server)
    assert second != first and not os.path.exists(f"/proc/{first}")
    assert http_request(server, "GET", "/livez")[0] == 200
    code, _, body = http_request(server, "POST", "/v1/completions", {"model": "attn-r8", "prompt": "Hi", "max_tokens": 2})
    assert code == 200 and json.loads(body)["choices"][0]["text"]


def test_a_front_ended_by_sigterm_is_restarted_at_once_and_logged_as_a_warning(server):
    """A front stopped from outside drains and exits 0: that was an ERROR and a backoff (an
    outside probe); now a WARNING and a restart after a moment (0.2 s: a server stopping
    with it must not get a fresh front)."""
    (first,) = _front_pids(server)
    time.sleep(1.5)  # past the second a front must run for its exit 0 to count as clean
    os.kill(first, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _front_pids(server) in ([first], []):
        assert time.monotonic() < deadline, "the ended front was never replaced"
        time.sleep(0.2)
    records = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    [ended] = [r for r in records if r.get("pid") == first and "restarting it" in r.get("msg", "")]
    assert (ended["level"], ended["returncode"], ended["delay_s"]) == ("warning", 0, 0.2), ended
    assert ended["msg"] == "http front ended (exit code 0, stopped from outside?); restarting it"
    code, _, body = http_request(server, "POST", "/v1/completions", {"model": "attn-r8", "prompt": "Hi", "max_tokens": 2})
    assert code == 200 and json.loads(body)["choices"][0]["text"]


def test_the_front_runs_alone_in_front_of_a_running_server(server):
    port = free_tcp_port()
    front = subprocess.Popen([sys.executable, "-m", "inlaid.cli", "http", "--address", server.address,
                              "--port", str(port), "--log-format", "text"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert front.poll() is None and time.monotonic() < deadline, front.stdout.read().decode()
                time.sleep(0.1)
        alone = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        answer = alone.completions.create(model="mlp-r16", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        with server.client() as client:
            assert answer.choices[0].text == client.generate(PROMPTS[0], task="mlp-r16", max_tokens=4).text
    finally:
        front.send_signal(signal.SIGTERM)
        assert front.wait(30) == 0


def test_a_server_listening_on_every_interface_is_reached_over_loopback(model_dir, tmp_path):
    """server.address = "tcp://*:PORT": its own front and `inlaid http --config` connect over
    loopback (both failed on ZeroMQ's "Invalid argument" for a wildcard, the standalone
    front advising to change the server's address)."""
    from inlaid.serve.launcher import ServerProcess
    from serving_helpers import server_config

    config = server_config(model_dir, {}, address=f"tcp://*:{free_tcp_port()}", allow_public_bind=True)
    wildcard = ServerProcess({**config, "http": {}}, workdir=tmp_path)
    port = free_tcp_port()
    alone = None
    try:
        wildcard.wait_ready(timeout_s=300)  # its own front's /health answered 200
        assert wildcard.address.startswith("tcp://127.0.0.1:")
        alone = subprocess.Popen([sys.executable, "-m", "inlaid.cli", "http", "--config", str(wildcard.config_path),
                                  "--port", str(port), "--log-format", "text"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        for url in (wildcard.http_url, f"http://127.0.0.1:{port}"):
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
                        assert response.status == 200 and json.loads(response.read())["data"]
                        break
                except OSError:
                    if alone.poll() is not None or time.monotonic() > deadline:
                        alone.kill()  # its output's end: read with the front still running, it never came
                        pytest.fail(f"{url} did not answer: {alone.communicate()[0].decode()[-2000:]}")
                    time.sleep(0.1)
    finally:
        wildcard.terminate()
        if alone is not None and alone.poll() is None:
            alone.send_signal(signal.SIGTERM)
            alone.wait(30)


def test_health_and_sigterm_drain(server):
    """Last: SIGTERM. Health turns 503, new requests get 503 shutting_down, a long stream
    ends with OpenAI's error event, and the server (front included) exits 0."""
    # A new client: the module's may hold a connection the killed front had accepted.
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=300)
    code, _, body = http_request(server, "GET", "/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    stream = api.completions.create(model="all-r32", prompt="Count to a thousand:", max_tokens=400,
                                    extra_body={"ignore_eos": True}, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (reply := http_request(server, "GET", "/health"))[0] == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert reply[0] == 503 and json.loads(reply[2])["status"] == "shutting_down"
    with pytest.raises(openai.InternalServerError) as caught:
        api.completions.create(model="attn-r8", prompt="x", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "shutting_down"
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "shut down" in str(caught.value)
    assert server.process.wait(60) == 0
    with Client(server.address, timeout_s=1) as client, pytest.raises(TimeoutError):
        client.health()
