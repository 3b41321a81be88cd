"""Shared by the server's end-to-end tests (test_serve_server.py, test_serve_server_faults.py): a real
`inlaid serve` process on a free loopback port, the in-process engine's reference answers, and the
comparison. The fixtures are module-scoped: each test module that imports them starts its own server."""

from __future__ import annotations

import pytest

from inlaid.protocol import GenerateDone
from inlaid.serve.launcher import ServerProcess

PROMPTS = [
    "The capital of France is",
    "Write a haiku about rain.",
    "def add(a, b):",
    "List three fruits:",
    "Q: What is 3 + 4?\nA:",
    "Hello, my name is",
    "The sky is blue because",
    "Translate to French: good morning",
    "Once upon a time",
    "import numpy as",
    "The best way to learn is",
    "Name a planet:",
    "2, 4, 6, 8,",
    "A cat and a dog",
    "Summarize: the meeting moved to Monday.",
    "My favourite colour is",
    "Water boils at",
    "The opposite of hot is",
    "In the morning I",
    "Python is a",
]
TASKS = [None, "attn-r8", "mlp-r16", "all-r32"]
MAX_TOKENS = 8
ADMIN_TOKEN = "test-admin-token-0123456789"
MAX_PENDING = 240  # nine tenths (216) hold the 200-request test from one client
MAX_MODEL_LEN = 512


def _engine_settings(model_dir) -> dict:
    return dict(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=64, num_kv_blocks=1024,
                block_size=16, max_lora_slots=4, max_lora_rank=32, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    executor = {k: v for k, v in _engine_settings(model_dir).items() if k != "model_dir"}
    config = {
        "model": {"dir": str(model_dir)},
        "executor": executor,
        "server": {"admin_token": ADMIN_TOKEN, "max_pending_requests": MAX_PENDING, "shutdown_grace_s": 5.0,
                   "log_format": "json"},
        "tasks": {name: str(path) for name, path in adapter_dirs.items()},
    }
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("server"))
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def reference(model_dir, adapter_dirs):
    """The in-process engine's greedy answers: (prompt, task) -> GenerationOutput."""
    from inlaid.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.local(EngineConfig(**_engine_settings(model_dir)))
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, str(path))
    pairs = [(prompt, task) for prompt in PROMPTS for task in TASKS]
    outputs = engine.generate([p for p, _ in pairs], SamplingParams(max_tokens=MAX_TOKENS), [t for _, t in pairs])
    return dict(zip(pairs, outputs))


@pytest.fixture(scope="module")
def ready_server(server, reference):
    # The reference is computed while the executor loads; then wait for it.
    server.wait_ready(timeout_s=300)
    return server


def _assert_matches(result, expected, what: str) -> None:
    assert isinstance(result, GenerateDone), f"{what}: {result!r}"
    assert result.token_ids == expected.token_ids, f"{what}: tokens differ"
    assert result.text == expected.text, f"{what}: text differs"
    assert result.finish_reason == expected.finish_reason, what
