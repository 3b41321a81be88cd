"""`ServerProcess.wait_ready` stops a server that did not become ready in time: a caller whose
own clean-up was not armed yet (a fixture raising before its `yield`, a test asserting in a
`finally`) left `inlaid serve` and its executor running after the test run (found 2026-12-07:
five servers of failed runs still up)."""

from __future__ import annotations

import pytest

from inlaid.serve.launcher import ServerProcess
from serving_helpers import server_config


def test_a_server_not_ready_in_time_is_stopped(model_dir, tmp_path) -> None:
    server = ServerProcess(server_config(model_dir, {}), workdir=tmp_path)
    with pytest.raises(RuntimeError, match="was not ready in 0 s"):
        server.wait_ready(timeout_s=0.2)  # the model takes seconds to load
    assert server.process.poll() is not None
    assert server.terminate() == server.process.returncode  # and stopping it again is harmless
