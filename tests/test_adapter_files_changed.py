"""An adapter directory whose files are replaced under the same path: registering it again
serves the new files, and a registered adapter whose files changed is never served as
something it was not checked as.

Host copies and device slots were keyed by path alone: an outside probe overwrote a
directory's files, removed and added the task (or added it under a second name, or
registered it again in-process) and got the OLD adapter's tokens, silently. The reference
for each adapter's tokens is the same engine serving that adapter from a directory of its
own, never touched (the engine itself is checked against transformers + PEFT elsewhere)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.engine.adapter_cache import HostAdapterCache
from inlaid.engine.adapter_config import AdapterError, adapter_signature
from inlaid.serve.launcher import ServerProcess

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]
MAX_TOKENS = 8
TOKEN = "files-changed-token-0123456789"
FILES = ("adapter_config.json", "adapter_model.safetensors")


def _put(source: Path, target: Path) -> None:
    """Overwrite `target`'s adapter files with `source`'s, in place (same path)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, target / name)


def _settings(model_dir: Path) -> dict:
    return dict(dtype="float32", threads=1, max_num_seqs=8, num_kv_blocks=256, block_size=16, max_lora_slots=2,
                max_lora_rank=32, max_model_len=256)


@pytest.fixture(scope="module")
def adapters(adapter_dirs, model_dir, tmp_path_factory) -> dict[str, Path]:
    """The shared adapters and a twin of attn-r8: same rank and targets (files of the same
    size), other weights, so that only the content tells them apart."""
    from transformers import AutoModelForCausalLM

    from conftest import make_peft_adapter

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    twin = make_peft_adapter(base, tmp_path_factory.mktemp("twin") / "attn-r8-twin", 8, ["q_proj", "v_proj"], 11)
    return {**adapter_dirs, "attn-r8-twin": twin}


@pytest.fixture(scope="module")
def references(model_dir, adapters) -> dict[str, list[list[int]]]:
    """Each adapter's greedy tokens, served from its own untouched directory."""
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), **_settings(model_dir)))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    answers = {}
    for name in adapters:
        answers[name] = _tokens(engine, name)
    assert answers["attn-r8"] != answers["mlp-r16"] != answers["attn-r8-twin"] != answers["attn-r8"]
    return answers


def _tokens(engine: Engine, name: str) -> list[list[int]]:
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), [name] * len(PROMPTS))
    return [output.token_ids for output in outputs]


def test_registering_a_changed_directory_again_serves_its_new_files(model_dir, adapters, references, tmp_path):
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), **_settings(model_dir)))
    swap = tmp_path / "swap"
    _put(adapters["attn-r8"], swap)
    engine.register_adapter("x", str(swap))
    assert _tokens(engine, "x") == references["attn-r8"]  # resident in a slot, with a host copy
    _put(adapters["attn-r8-twin"], swap)  # files of the same size: only their content differs
    engine.register_adapter("y", str(swap))  # a second name for the same path: the host copy was the old files
    assert _tokens(engine, "y") == references["attn-r8-twin"]
    assert _tokens(engine, "x") == references["attn-r8"]  # x was checked with the old: its copy stays its own
    engine.register_adapter("x", str(swap))  # the same name and path again: its slot held the old files
    assert _tokens(engine, "x") == references["attn-r8-twin"]
    _put(adapters["mlp-r16"], swap)
    request = engine.add_request(PROMPTS[0], sampling=SamplingParams(max_tokens=MAX_TOKENS), adapter="x")
    with pytest.raises(Exception, match="has 1 request\\(s\\) running or queued"):  # its slot would change under it
        engine.register_adapter("x", str(swap))
    assert engine.abort(request)


def test_a_copy_of_other_files_than_registered_is_refused_not_served(adapters, tmp_path):
    swap = tmp_path / "swap"
    _put(adapters["attn-r8"], swap)
    registered = adapter_signature(swap)
    cache = HostAdapterCache(num_layers=30, max_entries=4, max_bytes=1 << 30)
    first = cache.get("x", str(swap), registered)
    for name in FILES:  # metadata alone (mode, times) is not a change: content decides
        os.chmod(swap / name, 0o600)
        os.utime(swap / name, ns=(1, 1))
    assert adapter_signature(swap) == registered
    _put(adapters["attn-r8-twin"], swap)  # replaced under the registered task, which was not added again
    assert adapter_signature(swap) != registered
    assert cache.get("y", str(swap), adapter_signature(swap)).tensors[(0, "q_proj")][0].ne(
        first.tensors[(0, "q_proj")][0]).any()  # another name registered with the new files reads them
    assert cache.get("x", str(swap), registered) is first  # x's copy is the one it was checked with
    cache.forget([str(swap)])  # gone (the budget, a drop): the files now are not the registered ones
    with pytest.raises(AdapterError, match="changed after it was registered.*add \\(register\\) the task again"):
        cache.get("x", str(swap), registered)


def test_server_serves_the_new_files_after_remove_and_add_and_keeps_the_checked_copy(
        model_dir, adapters, references, tmp_path):
    swap = tmp_path / "swap"
    _put(adapters["attn-r8"], swap)
    config = {"model": {"dir": str(model_dir)}, "executor": _settings(model_dir),
              "server": {"admin_token": TOKEN, "shutdown_grace_s": 5.0},
              "tasks": {"other": str(adapters["all-r32"]), "third": str(adapters["mlp-r16"])}}
    (tmp_path / "run").mkdir()
    server = ServerProcess(config, workdir=tmp_path / "run")
    try:
        server.wait_ready(300)
        with server.client(timeout_s=120, admin_token=TOKEN) as client:
            def tokens(task: str) -> list[list[int]]:
                return [client.generate(prompt, task=task, max_tokens=MAX_TOKENS, ignore_eos=True).token_ids
                        for prompt in PROMPTS]

            client.add_task("swap", str(swap))
            assert tokens("swap") == references["attn-r8"]
            # the probe's sequence: files overwritten, removed and added with no step in between
            _put(adapters["mlp-r16"], swap)
            client.remove_task("swap")
            client.add_task("swap", str(swap))
            assert tokens("swap") == references["mlp-r16"]
            # the same name and path again, its files changed: replaced, and said so
            _put(adapters["attn-r8"], swap)
            assert "its files changed since it was added" in client.add_task("swap", str(swap))
            assert tokens("swap") == references["attn-r8"]
            # files replaced under a served task that is not added again: once its slot is
            # taken (2 slots), it is loaded again from the host copy of the files it was
            # checked with (without one it is refused: the test above), never from the new files
            _put(adapters["mlp-r16"], swap)
            assert tokens("other") == references["all-r32"] and tokens("third") == references["mlp-r16"]
            assert tokens("swap") == references["attn-r8"]
            assert "its files changed" in client.add_task("swap", str(swap))
            assert tokens("swap") == references["mlp-r16"]
    finally:
        server.terminate()
