"""The transformers + PEFT baseline server (bench/baselines/hf_peft_server.py): a real process
on loopback, driven through the SDK like `inlaid serve`.

Every answer is compared with transformers + PEFT `generate` run in this process for that
request alone, and with the in-process Inlaid engine (float32, token-identical to
transformers + PEFT on these prompts: tests/test_engine_parity.py). Requests are sent at
once to a server whose batch cap is 4, so they run in mixed-adapter static batches of
several sizes and left-padding widths.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from inlaid.client import (
    AsyncClient, ContextLengthError, DeadlineExceededError, InvalidRequestError, UnknownTaskError,
)
from inlaid.protocol import GenerateDone, SamplingParams
from inlaid.serve.launcher import ServerProcess

SERVER = Path(__file__).resolve().parents[1] / "bench" / "baselines" / "hf_peft_server.py"
MAX_TOKENS = 8
MAX_MODEL_LEN = 256
CHAT = [{"role": "user", "content": "Reply with one word: yes or no?"}]
# (prompt or chat messages, task, extra sampling)
REQUESTS: list[tuple[str | list[dict[str, str]], str | None, dict]] = [
    ("The capital of France is", None, {}),
    ("Write a haiku about rain.", "attn-r8", {}),
    ("def add(a, b):", "mlp-r16", {}),
    ("Q: What is 3 + 4?\nA:", "all-r32", {}),
    ("Once upon a time", "all-r32", {}),
    ("List three fruits:", "attn-r8", {}),
    (CHAT, None, {}),  # ends with EOS after a few tokens
    (CHAT, None, {"ignore_eos": True}),  # the same, past its EOS
    ("The capital of France is", None, {"stop": ["\n"]}),  # cut at a stop string
    ("Hello, my name is", "mlp-r16", {"max_tokens": 3}),
]


SETTINGS = dict(dtype="float32", threads=1, max_num_seqs=4, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def baseline(model_dir, adapter_dirs, tmp_path_factory):
    config = {"model": {"dir": str(model_dir)}, "executor": SETTINGS,
              "server": {"log_format": "json", "shutdown_grace_s": 5.0},
              "tasks": {name: str(path) for name, path in adapter_dirs.items()}}
    process = ServerProcess(config, workdir=tmp_path_factory.mktemp("baseline"),
                            command=[sys.executable, str(SERVER)])
    yield process
    process.terminate()


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.encode(tokenizer.apply_chat_template(prompt))


@pytest.fixture(scope="module")
def references(model_dir, adapter_dirs, hf_model):
    """(transformers + PEFT tokens per request, each generated alone; the Inlaid engine's outputs)."""
    from peft import PeftModel

    from inlaid.engine import Engine, EngineConfig

    engine = Engine.local(EngineConfig(model_dir=str(model_dir), max_lora_slots=3, max_lora_rank=32,
                                       num_kv_blocks=128, **SETTINGS))
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, str(path))
    params = [SamplingParams(**{"max_tokens": MAX_TOKENS, **extra}) for _, _, extra in REQUESTS]
    prompt_ids = [_prompt_ids(engine.tokenizer, prompt) for prompt, _, _ in REQUESTS]
    inlaid = engine.generate(prompt_ids, params, [task for _, task, _ in REQUESTS])

    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(hf_model, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    peft_model.eval()
    peft_tokens = []
    eos = set(engine.model_config.eos_token_ids)
    for ids, (_, task, extra), param in zip(prompt_ids, REQUESTS, params):
        with torch.no_grad():
            out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      adapter_names=[task or "__base__"], max_new_tokens=param.max_tokens,
                                      do_sample=False, pad_token_id=2,
                                      **({"eos_token_id": None} if param.ignore_eos else {}))
        tokens = out[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t in eos and not param.ignore_eos), len(tokens))
        peft_tokens.append(tokens[:cut])
    peft_model.unload()
    return peft_tokens, inlaid


def test_baseline_answers_like_transformers_peft_and_inlaid(baseline, references):
    peft_tokens, inlaid = references
    baseline.wait_ready(timeout_s=300)

    async def send_all():
        async with AsyncClient(baseline.address, timeout_s=300) as client:
            calls = []
            for prompt, task, extra in REQUESTS:
                text = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
                calls.append(client.generate(**text, task=task, **{"max_tokens": MAX_TOKENS, **extra}))
            return await asyncio.gather(*calls)

    results = asyncio.run(send_all())
    identical = 0
    for index, (result, reference, ours) in enumerate(zip(results, peft_tokens, inlaid)):
        assert isinstance(result, GenerateDone), result
        extra = REQUESTS[index][2]
        if "stop" in extra:  # transformers + PEFT has no per-request stop strings: a prefix of its tokens
            assert result.token_ids == reference[: len(result.token_ids)] and result.finish_reason == "stop"
            assert "\n" not in result.text and result.text
        else:
            assert result.token_ids == reference, f"request {index}: tokens differ from transformers + PEFT"
        assert result.num_prompt_tokens == len(ours.prompt_token_ids)
        if ours.token_ids == result.token_ids:
            identical += 1
            assert (result.text, result.finish_reason) == (ours.text, ours.finish_reason), f"request {index}"
    assert identical >= len(REQUESTS) - 1  # where the engine is token-identical, so is the whole answer
    finish = [r.finish_reason for r in results]
    assert finish[6] == "stop" and len(results[6].token_ids) < MAX_TOKENS  # its EOS ended it
    assert finish[7] == "length" and results[7].token_ids[: len(results[6].token_ids)] == results[6].token_ids
    assert len(results[9].token_ids) == 3 and finish[9] == "length"
    assert len({tuple(r.token_ids) for r in results[:6]}) == 6  # the adapters change the outputs

    with baseline.client() as client:
        stats = client.stats()
        assert stats.requests_finished == len(REQUESTS) and stats.requests_running == stats.requests_waiting == 0
        assert stats.tokens_generated == sum(len(r.token_ids) for r in results)
        stream = client.stream(REQUESTS[1][0], task=REQUESTS[1][1], max_tokens=MAX_TOKENS)
        chunks = list(stream)  # no streaming: the whole text arrives as one chunk, then the result
        assert len(chunks) == 1 and chunks[0].text == stream.result.text == results[1].text
        assert chunks[0].token_ids == results[1].token_ids


def test_baseline_bad_requests_get_typed_errors(baseline, references, adapter_dirs):
    baseline.wait_ready(timeout_s=300)
    with baseline.client(timeout_s=60) as client:
        assert sorted(t.name for t in client.list_tasks()) == sorted(adapter_dirs)
        assert client.health().status == "ok"
        with pytest.raises(UnknownTaskError):
            client.generate("hi", task="nope")
        with pytest.raises(InvalidRequestError):
            client.generate("hi", top_p=0.0)
        with pytest.raises(InvalidRequestError):
            client.generate(prompt_token_ids=[10 ** 9])
        with pytest.raises(ContextLengthError):
            client.generate(prompt_token_ids=[1] * MAX_MODEL_LEN)
        with pytest.raises(InvalidRequestError):
            client.add_task("new", str(adapter_dirs["attn-r8"]))
        with pytest.raises(DeadlineExceededError):  # no generate of 64 tokens finishes in 1 ms
            client.generate("Once upon a time", max_tokens=64, ignore_eos=True, deadline_s=0.001)
        # Still serving, and the failed requests are forgotten.
        assert client.generate("Hello", max_tokens=2).finish_reason == "length"
        stats = client.stats()
        assert stats.requests_running == stats.requests_waiting == 0
    assert baseline.terminate() == 0


def test_baseline_adds_adapters_like_load_adapter(model_dir, adapter_dirs, monkeypatch):
    """The baseline's start-up path (add_lora_adapter: PEFT's per-module calls on the targeted
    modules only) builds the same PeftModel as PEFT's `load_adapter`: the same modules, the same
    weights bit for bit, the same configs and active adapter; adapters of different target sets
    and ranks, rsLoRA included, in an order where later adapters target modules no earlier one
    did."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(SERVER.parent))
    from hf_peft_batch import add_lora_adapter

    names = ["attn-r8", "mlp-r16", "all-r32"]
    built = []
    for fast in (False, True):
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            if fast:
                assert add_lora_adapter(model, name, str(adapter_dirs[name]))
            else:
                model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        built.append(model)
    reference, fast = built
    assert [(key, type(m).__name__) for key, m in reference.named_modules()] == \
        [(key, type(m).__name__) for key, m in fast.named_modules()]
    expected, got = reference.state_dict(), fast.state_dict()
    assert list(expected) == list(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [(key, p.requires_grad) for key, p in reference.named_parameters()] == \
        [(key, p.requires_grad) for key, p in fast.named_parameters()]
    for key, module in reference.named_modules():
        if hasattr(module, "scaling"):
            assert module.scaling == fast.get_submodule(key).scaling, key
    assert reference.active_adapters == fast.active_adapters == [names[0]]
    assert {n: c.to_dict() for n, c in reference.peft_config.items()} == \
        {n: c.to_dict() for n, c in fast.peft_config.items()}
    assert fast.base_model.targeted_module_names == reference.base_model.targeted_module_names
    # An adapter already there is refused, so the caller's fallback raises PEFT's own error.
    assert not add_lora_adapter(fast, names[1], str(adapter_dirs[names[1]]))
    # A PEFT whose internals take other arguments (a GPU image's version): refused before
    # anything changes, so the caller takes load_adapter.
    monkeypatch.setattr(type(fast.base_model), "_create_and_replace",
                        lambda self, config, adapter_name, target, target_name, parent: None)
    assert not add_lora_adapter(fast, "other", str(adapter_dirs[names[1]]))
    assert "other" not in fast.peft_config
