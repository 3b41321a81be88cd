"""Engine pieces checked against known answers: detokenizer, sampler, scheduler, loaders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from inlaid.engine.adapter_config import AdapterError, read_adapter_spec
from inlaid.engine.adapter_slots import AdapterSlots
from inlaid.engine.block_manager import BlockManager
from inlaid.engine.config import EngineConfig, ModelConfig, ModelLoadError
from inlaid.engine.sampler import sample_tokens
from inlaid.engine.scheduler import Scheduler, SchedulerLimits
from inlaid.engine.sequence import FinishReason, Sequence
from inlaid.engine.tokenizer import StreamingDetokenizer, Tokenizer
from inlaid.protocol import SampledToken, SamplingParams, StepResult


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


def test_streaming_detokenizer_handles_multibyte_utf8(tokenizer):
    text = "Café 世界 🎉 naïve — ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    detok = StreamingDetokenizer(tokenizer, stop=[])
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_truncates_and_never_streams(tokenizer):
    detok = StreamingDetokenizer(tokenizer, stop=["END"])
    streamed = []
    for token in tokenizer.encode("alpha beta ENDING gamma"):
        streamed.append(detok.add(token))
        if detok.stopped:
            break
    assert detok.stopped
    assert "".join(streamed) + detok.finish() == "alpha beta "
    assert all("E" not in piece for piece in streamed)


def test_chat_template_matches_transformers(tokenizer, model_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.encode(expected) == reference(expected, add_special_tokens=False)["input_ids"]


def test_sampler_greedy_topk_and_seeds():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = sample_tokens(logits, [SamplingParams()] * 4, [0] * 4)
    assert greedy == logits.argmax(-1).tolist()
    top1 = sample_tokens(logits, [SamplingParams(temperature=1.5, top_k=1)] * 4, [0] * 4)
    assert top1 == greedy
    seeded = [SamplingParams(temperature=1.0, seed=7)] * 4
    assert sample_tokens(logits, seeded, [3] * 4) == sample_tokens(logits, seeded, [3] * 4)


def test_distinct_seeds_draw_distinct_streams():
    # Found by an outside probe: seeds s and s + 2**63 (e.g. -1 and 2**63 - 1) drew the same
    # tokens, as did (s, step k + 1_000_003) and (s + 1, step k), under the old arithmetic mix.
    flat = torch.zeros(1, 1000)  # uniform over 1000 tokens: two streams agree on 24 draws with chance ~0
    def stream(seed: int, first_step: int = 0) -> list[int]:
        return [sample_tokens(flat, [SamplingParams(temperature=1.0, seed=seed)], [first_step + k])[0]
                for k in range(24)]
    assert stream(-1) != stream(2**63 - 1)
    assert stream(5) != stream(5 + 2**63)
    assert stream(0, first_step=1_000_003) != stream(1)
    assert stream(-1) == stream(-1) and stream(2**64 - 1) == stream(2**64 - 1)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04], dtype=torch.float64)
    logits = probs.log().float()[None].repeat(400, 1)
    params = [SamplingParams(temperature=1.0, top_p=0.8, seed=i) for i in range(400)]
    drawn = sample_tokens(logits, params, [0] * 400)
    # Nucleus for 0.8: {0, 1, 2} (0.5 + 0.25 < 0.8 <= 0.9), renormalised to 0.5/0.9, 0.25/0.9, 0.15/0.9.
    assert set(drawn) <= {0, 1, 2}
    frequency = drawn.count(0) / 400
    assert abs(frequency - 0.5 / 0.9) < 0.08


def test_sampling_params_are_validated():
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


def test_engine_config_is_validated():
    for bad in (dict(pack_weights="yes"), dict(weight_dtype="int8"), dict(max_lora_rank=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(model_dir="unused", **bad).validate()


def _scheduler(num_blocks=8, block_size=4, budget=10, max_seqs=4) -> Scheduler:
    return Scheduler(SchedulerLimits(max_seqs, budget, 1000), BlockManager(num_blocks, block_size),
                     AdapterSlots(2), eos_token_ids=(2,))


def test_scheduler_respects_token_budget_and_chunks_prefill():
    scheduler = _scheduler(num_blocks=32, budget=10)
    long = Sequence(seq_id=0, prompt_token_ids=list(range(10, 35)), sampling=SamplingParams(max_tokens=3))
    short = Sequence(seq_id=1, prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=3))
    scheduler.add(long)
    scheduler.add(short)
    plan = scheduler.schedule()
    assert sum(len(c.token_ids) for c in plan.chunks) == 10
    assert [c.seq_id for c in plan.chunks] == [0] and not plan.chunks[0].sample
    plans = [plan]
    while long.num_pending_tokens:
        plans.append(scheduler.schedule())
        assert sum(len(c.token_ids) for c in plans[-1].chunks) <= 10
    last = next(c for c in plans[-1].chunks if c.seq_id == 0)
    assert last.sample and last.start_pos + len(last.token_ids) == 25


def test_scheduler_finishes_on_eos_and_max_tokens_and_frees_blocks():
    scheduler = _scheduler()
    seqs = {i: Sequence(seq_id=i, prompt_token_ids=[7, 8, 9], sampling=SamplingParams(max_tokens=2)) for i in range(2)}
    for seq in seqs.values():
        scheduler.add(seq)
    plan = scheduler.schedule()
    update = scheduler.process_result(
        StepResult(step_id=plan.step_id, sampled=[SampledToken(seq_id=0, token_id=2), SampledToken(seq_id=1, token_id=11)],
                   num_tokens=6, compute_seconds=0.0), seqs)
    assert [s.seq_id for s in update.finished] == [0] and seqs[0].finish_reason is FinishReason.STOP
    plan = scheduler.schedule()
    update = scheduler.process_result(
        StepResult(step_id=plan.step_id, sampled=[SampledToken(seq_id=1, token_id=12)], num_tokens=1,
                   compute_seconds=0.0), seqs)
    assert seqs[1].finish_reason is FinishReason.LENGTH
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_blocks


def test_adapter_slots_evict_lru_but_never_pinned():
    slots = AdapterSlots(2)
    for name in "abc":
        slots.register(name, f"/adapters/{name}")
    assert slots.acquire("a", set()).loaded_now
    assert slots.acquire("b", set()).loaded_now
    assert not slots.acquire("a", set()).loaded_now  # a is now most recent
    third = slots.acquire("c", pinned=set())
    assert third.loaded_now and slots.slot_of("b") is None  # b was least recent
    assert slots.acquire("b", pinned={"a", "c"}) is None


def _write_adapter(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def test_adapter_config_validation(tmp_path):
    spec = read_adapter_spec("ok", _write_adapter(tmp_path / "ok", use_rslora=True, r=16, lora_alpha=32))
    assert spec.scale == pytest.approx(32 / 4)
    cases = {
        "dora": ({"use_dora": True}, "DoRA"),
        "embed": ({"target_modules": ["embed_tokens", "q_proj"]}, "embed_tokens"),
        "ia3": ({"peft_type": "IA3"}, "IA3"),
        "pattern": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    }
    for name, (config, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            read_adapter_spec(name, _write_adapter(tmp_path / name, **config))
    with pytest.raises(AdapterError, match="not found"):
        read_adapter_spec("missing", tmp_path / "nowhere")


def test_lora_scales_that_would_overflow_are_refused_negative_ones_kept(tmp_path):
    """lora_alpha finite in Python but a scale no pool dtype can hold (1e308 overflowed float32:
    every request of the task failed; 1e38 and -1e30 gave NaN logits) is an AdapterError at
    AddTask; the bound is the scale's magnitude (PEFT allows any lora_alpha, negative too)."""
    from inlaid.engine.adapter_config import MAX_LORA_SCALE

    for name, config in {"huge": {"lora_alpha": 1e308}, "float32_max": {"lora_alpha": 1e38},
                         "negative": {"lora_alpha": -1e30}, "just_over": {"r": 2, "lora_alpha": 2 * 65505},
                         "rslora": {"r": 4, "lora_alpha": 2 * 65505, "use_rslora": True}}.items():
        with pytest.raises(AdapterError, match=r"LoRA scale lora_alpha / (sqrt\(r\)|r) = .* over 65504 in magnitude"):
            read_adapter_spec(name, _write_adapter(tmp_path / name, **config))
    with pytest.raises(AdapterError, match="rank is out of range"):  # alpha / r overflows: still an AdapterError
        read_adapter_spec("rank", _write_adapter(tmp_path / "rank", r=10**400))
    for name, config, scale in [("limit", {"r": 2, "lora_alpha": 2 * 65504}, MAX_LORA_SCALE),
                                ("rs_limit", {"r": 4, "lora_alpha": 2 * 65504, "use_rslora": True}, MAX_LORA_SCALE),
                                ("negated", {"r": 8, "lora_alpha": -16}, -2.0), ("off", {"lora_alpha": 0}, 0.0)]:
        assert read_adapter_spec(name, _write_adapter(tmp_path / name, **config)).scale == scale


def test_model_loading_errors(tmp_path, model_dir):
    from inlaid.engine.weights import load_model

    with pytest.raises(ModelLoadError, match="not found"):
        ModelConfig.from_dir(tmp_path / "absent")
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        ModelConfig.from_dir(bad)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(model_dir / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(ModelConfig.from_dir(corrupt), corrupt, torch.float32, torch.device("cpu"))


def test_adapter_with_non_finite_weights_is_rejected(tmp_path):
    from safetensors.torch import save_file

    from inlaid.engine.lora import load_adapter_tensors

    path = _write_adapter(tmp_path / "nan")
    a = torch.randn(8, 576)
    b = torch.randn(576, 8)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(path / "adapter_model.safetensors"))
    spec = read_adapter_spec("nan", path)
    assert (0, "q_proj") in load_adapter_tensors(spec, num_layers=30)
    b[3, 2] = float("nan")
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_adapter_tensors(spec, num_layers=30)


def test_a_long_prompt_beside_decoding_sequences_takes_capped_chunks():
    """A long prompt's 2,048-token chunks paused every stream 9-12 s a step on a 2-core CPU (an
    outside probe): beside decoding sequences a step takes at most
    `max_prefill_tokens_beside_decodes` prompt tokens; alone, the whole budget."""
    scheduler = Scheduler(SchedulerLimits(4, 64, 1000, max_prefill_tokens_beside_decodes=16),
                          BlockManager(64, 4), AdapterSlots(2), eos_token_ids=(2,))
    stream = Sequence(seq_id=0, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=50))
    scheduler.add(stream)
    plan = scheduler.schedule()
    scheduler.process_result(StepResult(step_id=plan.step_id, sampled=[SampledToken(seq_id=0, token_id=11)],
                                        num_tokens=3, compute_seconds=0.0), {0: stream})
    long = Sequence(seq_id=1, prompt_token_ids=list(range(10, 110)), sampling=SamplingParams(max_tokens=3))
    scheduler.add(long)
    seqs = {0: stream, 1: long}
    sizes = []
    while long.num_pending_tokens > 1:
        plan = scheduler.schedule()
        chunks = {chunk.seq_id: len(chunk.token_ids) for chunk in plan.chunks}
        assert chunks[0] == 1  # the stream decodes every step
        sizes.append(chunks[1])
        sampled = [SampledToken(seq_id=0, token_id=11)] + (
            [SampledToken(seq_id=1, token_id=12)] if any(c.seq_id == 1 and c.sample for c in plan.chunks) else [])
        scheduler.process_result(StepResult(step_id=plan.step_id, sampled=sampled, num_tokens=sum(chunks.values()),
                                            compute_seconds=0.0), seqs)
    assert sizes == [16] * 6 + [4]
    alone = _scheduler(num_blocks=64, budget=64)
    alone.limits.max_prefill_tokens_beside_decodes = 16
    alone.add(Sequence(seq_id=2, prompt_token_ids=list(range(10, 110)), sampling=SamplingParams(max_tokens=3)))
    assert [len(chunk.token_ids) for chunk in alone.schedule().chunks] == [64]  # nobody decodes: the whole budget
    tail = _scheduler(num_blocks=64, budget=64)
    tail.limits.max_prefill_tokens_beside_decodes = 16
    first = Sequence(seq_id=3, prompt_token_ids=list(range(10, 75)), sampling=SamplingParams(max_tokens=3))
    tail.add(first)
    assert [len(chunk.token_ids) for chunk in tail.schedule().chunks] == [64]
    tail.add(Sequence(seq_id=4, prompt_token_ids=list(range(10, 110)), sampling=SamplingParams(max_tokens=3)))
    # the first prompt's last token is a prefill, not a decode: the second takes the rest of the budget
    assert [len(chunk.token_ids) for chunk in tail.schedule().chunks] == [1, 63]


def test_the_cap_holds_while_a_decoding_sequence_sits_out_the_step():
    """A stream the step pauses (here β = 1, the prompt ranked first) waits for the whole step
    all the same: the prompt's chunk stays within the cap, as beside a stream in the step
    (β = 2). A version that widened such chunks to the budget made those pauses 5-12 s again
    (a review); within the cap a long prompt takes 4-9 % longer (bench/prefill_stalls.py)."""
    from inlaid.engine.scheduler import SchedulingPolicy

    class PromptsFirst(SchedulingPolicy):
        def order(self, running, waiting, now):
            return sorted(running + waiting, key=lambda seq: seq.num_pending_tokens == 1)

    for beta, want in ((1, {1: 16}), (2, {1: 16, 0: 1})):
        policy = PromptsFirst()
        policy.max_adapters_per_step = beta
        slots = AdapterSlots(2)
        for name in "ab":
            slots.register(name, f"/adapters/{name}")
        scheduler = Scheduler(SchedulerLimits(4, 64, 1000, max_prefill_tokens_beside_decodes=16), BlockManager(64, 4),
                              slots, eos_token_ids=(2,), policy=policy)
        stream = Sequence(seq_id=0, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=50), adapter="a")
        scheduler.add(stream)
        plan = scheduler.schedule()
        scheduler.process_result(StepResult(step_id=plan.step_id, sampled=[SampledToken(seq_id=0, token_id=11)],
                                            num_tokens=3, compute_seconds=0.0), {0: stream})
        long = Sequence(seq_id=1, prompt_token_ids=list(range(10, 110)), sampling=SamplingParams(max_tokens=3),
                        adapter="b")
        scheduler.add(long)
        plan = scheduler.schedule()
        assert {chunk.seq_id: len(chunk.token_ids) for chunk in plan.chunks} == want, beta


def test_engine_config_caps_prefill_beside_decodes_on_the_cpu_only():
    from inlaid.engine.config import CPU_PREFILL_BESIDE_DECODES

    assert EngineConfig(model_dir="m").prefill_tokens_beside_decodes() == CPU_PREFILL_BESIDE_DECODES
    assert EngineConfig(model_dir="m", device="cuda:0").prefill_tokens_beside_decodes() is None
    assert EngineConfig(model_dir="m", device="cuda", max_prefill_tokens_beside_decodes=256
                        ).prefill_tokens_beside_decodes() == 256
    for bad in (0, -1, 2.5, "x", True):
        with pytest.raises(ValueError, match="max_prefill_tokens_beside_decodes"):
            EngineConfig(model_dir="m", max_prefill_tokens_beside_decodes=bad).validate()


def test_the_engine_and_the_simulator_plan_with_the_configured_cap(model_dir):
    """The coordinator's engine and the simulator's shape of a config take its cap."""
    from inlaid.engine.config import CPU_PREFILL_BESIDE_DECODES
    from inlaid.engine.engine import Engine
    from inlaid.scheduling.simulator import EngineShape

    default = EngineConfig(model_dir=str(model_dir))
    told = EngineConfig(model_dir=str(model_dir), max_prefill_tokens_beside_decodes=100)
    assert Engine(default).scheduler.limits.max_prefill_tokens_beside_decodes == CPU_PREFILL_BESIDE_DECODES
    assert Engine(told).scheduler.limits.max_prefill_tokens_beside_decodes == 100
    assert EngineShape.of(told).max_prefill_tokens_beside_decodes == 100
