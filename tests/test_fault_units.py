"""Fault handling of the pieces, without a server: client frames, sampling, per-sequence
isolation in the runner and the engine (adapter files: test_fault_adapter_files.py;
disconnect detection: test_peer_watch.py).

Property tests (Hypothesis, derandomized: the same examples every run) check totality:
whatever a client can send, the answer is a result or a typed error, never another
exception.
"""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter_corruptions import copy_adapter
from inlaid.engine.sampler import RowFailure, sample_tokens
from inlaid.protocol import ClientRequest, ErrorCode, ErrorReply, SamplingParams
from inlaid.serve.frames import decode_client_frames

PROPERTY = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_FRAME = 1 << 16

# ------------------------------------------------------------------ client frames
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["type", "request_id", "prompt", "task", "sampling", "messages", "prompt_token_ids", "stream", "deadline_s",
          "protocol_version", "name", "adapter_dir", "token", "temperature", "max_tokens"]
TAGS = sorted(cls.__struct_config__.tag for cls in ClientRequest.__args__)  # type: ignore[attr-defined]


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_give_a_message_or_a_typed_error(payload):
    result = decode_client_frames([payload], MAX_FRAME)
    assert isinstance(result, (ErrorReply, *ClientRequest.__args__))  # type: ignore[attr-defined]
    if isinstance(result, ErrorReply):
        assert result.code in (ErrorCode.MALFORMED, ErrorCode.UNKNOWN_MESSAGE)


@PROPERTY
@given(st.sampled_from(TAGS + ["no_such_type"]), st.text(max_size=16),
       st.dictionaries(st.sampled_from(FIELDS), msgpack_values, max_size=6))
def test_every_error_names_the_request_it_answers(tag, request_id, fields):
    """Structured-invalid messages of every type: whatever else is wrong, a readable
    request id comes back in the error, so the SDK can match it to its call."""
    message = {**fields, "type": tag, "request_id": request_id}
    result = decode_client_frames([msgspec.msgpack.encode(message)], MAX_FRAME)
    if isinstance(result, ErrorReply):
        assert result.request_id == request_id, result
        expected = ErrorCode.UNKNOWN_MESSAGE if tag == "no_such_type" else ErrorCode.MALFORMED
        assert result.code == expected
    else:
        assert result.request_id == request_id


def test_unknown_fields_are_refused_by_name():
    for message, field in [({"type": "generate", "request_id": "g", "prompt": "x", "temprature": 0.7}, "temprature"),
                           ({"type": "generate", "request_id": "g", "prompt": "x", "sampling": {"top_pp": 0.5}},
                            "top_pp"),
                           ({"type": "health", "request_id": "h", "verbose": True}, "verbose"),
                           ({"type": "add_task", "request_id": "a", "name": "t", "adapter_dir": "/d", "force": 1},
                            "force")]:
        reply = decode_client_frames([msgspec.msgpack.encode(message)], MAX_FRAME)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.MALFORMED, reply
        assert reply.request_id == message["request_id"] and field in reply.message


# ------------------------------------------------------------------ sampling
finite_temperatures = st.one_of(st.just(0.0), st.just(5e-324), st.just(1e-300), st.just(1.7976931348623157e308),
                                st.floats(min_value=0.0, max_value=1e308, allow_nan=False))
sampling_params = st.builds(
    SamplingParams,
    temperature=finite_temperatures,
    top_k=st.integers(0, 2**63 - 1),
    top_p=st.one_of(st.just(1.0), st.just(5e-324), st.floats(min_value=5e-324, max_value=1.0)),
    seed=st.none() | st.integers(-(2**63), 2**64 - 1),
)


@PROPERTY
@given(st.lists(sampling_params, min_size=1, max_size=4), st.integers(0, 2**32 - 1), st.integers(0, 10**6))
def test_sampling_is_total_over_what_validation_accepts(params, logits_seed, generated):
    for param in params:
        param.validate()  # everything generated here is accepted...
    logits = torch.randn(len(params), 97, generator=torch.Generator().manual_seed(logits_seed)) * 10
    tokens = sample_tokens(logits, params, [generated] * len(params))
    for row, (token, param) in enumerate(zip(tokens, params)):  # ...and served
        assert isinstance(token, int) and 0 <= token < 97, (param, token)
        gap = float(logits[row].max() - logits[row].topk(2).values[1])
        if param.temperature == 0.0 or param.top_k == 1 or gap / max(param.temperature, 1e-320) > 800:
            # exp(-800) is 0 in float64: every other token has probability exactly 0.
            assert token == int(logits[row].argmax()), (param, gap)


def test_validation_refuses_what_no_sampler_can_honour():
    for bad in (dict(temperature=math.inf), dict(temperature=math.nan), dict(temperature=-1e-300),
                dict(top_p=math.nan), dict(top_p=0.0), dict(top_p=math.inf), dict(top_p=1.0000001),
                dict(top_k=-1), dict(max_tokens=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


def test_stop_rules_are_bounded():
    """Stop rules are checked on the coordinator's loop for every token: one request's
    24,000 stop strings slowed every other stream 30-fold. Past the bounds: refused."""
    from inlaid.protocol.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

    SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)], stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)),
                   max_tokens=4).validate()
    SamplingParams(stop=["x" * MAX_STOP_CHARS]).validate()
    for bad, message in [(dict(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), "at most 16 strings"),
                         (dict(stop=["x" * (MAX_STOP_CHARS + 1)]), "at most 256 characters"),
                         (dict(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))), "at most 256 ids")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad).validate()


def test_a_row_with_broken_logits_fails_alone():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(4)]
    clean = sample_tokens(logits, params, [5] * 4)
    for poison in (math.nan, math.inf):
        broken = logits.clone()
        broken[1, 7] = poison
        tokens = sample_tokens(broken, params, [5] * 4)
        assert isinstance(tokens[1], RowFailure) and "NaN or infinite" in tokens[1].reason
        assert [tokens[i] for i in (0, 2, 3)] == [clean[i] for i in (0, 2, 3)]
    greedy = logits.clone()
    greedy[2] = -math.inf
    tokens = sample_tokens(greedy, [SamplingParams()] * 4, [0] * 4)
    assert isinstance(tokens[2], RowFailure) and tokens[0] == int(logits[0].argmax())


# ------------------------------------------------------------------ per-sequence isolation
def test_engine_fails_only_the_sequence_whose_adapter_cannot_load(model_dir, adapter_dirs, tmp_path):
    """One step holds a base request, a good-adapter request and a request whose adapter's
    weights broke after registration: only the last fails; the others equal a run
    without it, and the broken adapter holds no slot afterwards."""
    from inlaid.engine import Engine, EngineConfig

    broken = copy_adapter(adapter_dirs["attn-r8"], tmp_path, "broken")
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=8,
                                       num_kv_blocks=64, max_lora_slots=2, max_lora_rank=32, max_model_len=256))
    engine.register_adapter("good", str(adapter_dirs["mlp-r16"]))
    engine.register_adapter("broken", str(broken))
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 32)
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    mixed = engine.generate(prompts, sampling, [None, "broken", "good"])
    assert [o.finish_reason for o in mixed] == ["length", "error", "length"]
    assert mixed[1].error is not None and "could not be loaded" in mixed[1].error  # it said nothing of why
    assert mixed[0].error is None and mixed[2].error is None
    assert engine.scheduler.adapters.slot_of("broken") is None
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks
    alone = engine.generate([prompts[0], prompts[2]], sampling, [None, "good"])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [alone[0].token_ids, alone[1].token_ids]
    # The runner reports why, per sequence.
    engine.add_request(prompts[1], sampling=sampling, adapter="broken", request_id="again")
    result = engine.runner.execute(engine.begin_step())
    assert [(f.code, "could not be loaded" in f.message) for f in result.failed] == [(ErrorCode.ADAPTER_FAILED, True)]
    assert result.failed_adapters == ["broken"] and not result.sampled
    outputs = engine.finish_step(result)
    assert outputs[0].finish_reason == "error" and outputs[0].error.code == ErrorCode.ADAPTER_FAILED


# ------------------------------------------------------------------ executor loss
def test_a_request_lost_with_its_executor_before_its_first_token_is_queued_again_once(model_dir, tmp_path):
    """The coordinator's loss handler on its real engine (no process): requests planned to an
    executor that died before answering have given their clients nothing, so they are
    computed again from their prompts on the next executor, in their arrival order, not
    failed; a second loss fails them (a request that kills executors must not kill them
    all); a request with output fails at once; a step timeout and a failed step fail them
    too. KV blocks all come back."""
    from inlaid.protocol import Generate
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    replies: list = []
    coordinator.in_flight._send = lambda identity, message: replies.append(message)
    shard, in_flight = coordinator.pool.shards[0], coordinator.in_flight
    engine = shard.engine
    total_blocks = engine.scheduler.blocks.num_free_blocks

    def admit(*names: str) -> list:
        for name in names:
            in_flight.generate(b"client", Generate(request_id=name, prompt=f"Say {name}",
                                                   sampling=SamplingParams(max_tokens=8)))
        return [in_flight.requests[(b"client", name)] for name in names]

    first, started, second = admit("first", "started", "second")
    plan = engine.begin_step()
    assert plan is not None and [c.seq_id for c in plan.chunks] == [first.seq_id, started.seq_id, second.seq_id]
    started.token_ids.append(42)  # as the coordinator records a streamed token
    seqs = [engine.sequence(r.engine_id) for r in (first, second)]
    assert all(seq.block_table and seq.num_computed_tokens == seq.num_prompt_tokens for seq in seqs)

    coordinator._on_executor_lost(shard, "executor (pid 1) died with signal SIGKILL")
    assert [(r.request_id, r.code) for r in replies] == [("started", ErrorCode.EXECUTOR_FAILED)]
    assert first.restarted and second.restarted and len(in_flight.requests) == 2
    assert all((seq.status.name, seq.block_table, seq.num_computed_tokens) == ("WAITING", [], 0) for seq in seqs)
    assert engine.scheduler.blocks.num_free_blocks == total_blocks
    again = engine.begin_step()  # the whole prompts, from their first tokens, in arrival order
    assert [(c.seq_id, c.start_pos, c.token_ids) for c in again.chunks] == [
        (first.seq_id, 0, seqs[0].prompt_token_ids), (second.seq_id, 0, seqs[1].prompt_token_ids)]

    coordinator._on_executor_lost(shard, "executor (pid 2) died with signal SIGKILL")
    assert [(r.request_id, r.code) for r in replies][1:] == [("second", ErrorCode.EXECUTOR_FAILED),
                                                            ("first", ErrorCode.EXECUTOR_FAILED)]
    assert not in_flight.requests and engine.scheduler.blocks.num_free_blocks == total_blocks

    # A step past the step timeout, and a step the executor failed: nothing is run again.
    for lose in (lambda: coordinator._on_executor_lost(shard, "ran a step past the step timeout", False),
                 lambda: coordinator._fail_running(shard, "the executor failed this step")):
        (fresh,) = admit(f"fresh-{len(replies)}")
        assert engine.begin_step() is not None
        lose()
        assert replies[-1].request_id == fresh.request_id and not fresh.restarted and not in_flight.requests
    assert engine.scheduler.blocks.num_free_blocks == total_blocks


def test_admission_refuses_cheaply_and_every_generate_is_counted_once(model_dir, tmp_path):
    """On the coordinator's real engine (no process): a frame-sized text prompt is refused as
    too long after tokenizing only its beginning (the whole text took ~0.5 s on the loop
    every client shares); a long text that fits is still tokenized whole and admitted; an
    empty request id is refused; and received = finished + failed + overloaded + rejected +
    abandoned + in flight."""
    from inlaid.protocol import Generate
    from inlaid.serve.config import config_from_dict
    from inlaid.serve.coordinator import Coordinator

    coordinator = Coordinator(config_from_dict({"model": {"dir": str(model_dir)}}, base_dir=tmp_path))
    replies: list = []
    coordinator.in_flight._send = lambda identity, message: replies.append(message)
    engine = coordinator.pool.shards[0].engine
    encoded: list[int] = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text: encoded.append(len(text)) or encode(text)  # type: ignore[method-assign]
    limit = engine.max_model_len

    def generate(request_id: str, prompt: str) -> None:
        coordinator.in_flight.generate(b"c", Generate(request_id=request_id, prompt=prompt,
                                                      sampling=SamplingParams(max_tokens=4)))

    generate("huge", "hello world " * (2 * limit * 16 // 12))  # ~2x the prefix, ~2.7 tokens per 12 characters
    assert replies[-1].code == ErrorCode.CONTEXT_LENGTH and "more than" in replies[-1].message
    assert max(encoded) <= limit * 16 < len("hello world " * (2 * limit * 16 // 12))
    fits = "#" * 80 * (limit // 4)  # 80 characters a token: longer than the prefix, a quarter of the context
    assert len(fits) > limit * 16
    generate("long-but-fits", fits)
    assert (b"c", "long-but-fits") in coordinator.in_flight.requests and max(encoded) == len(fits)
    generate("", "hi")
    assert replies[-1].code == ErrorCode.INVALID_REQUEST and "request_id" in replies[-1].message
    generate("no-task", "hi")  # fine
    counters = coordinator.counters
    assert counters["received"] == 4 and counters["rejected"] == 2
    assert counters["received"] == (counters["finished"] + counters["failed"] + counters["overloaded"]
                                    + counters["rejected"] + counters["abandoned"] + len(coordinator.in_flight))


def test_a_sequence_cannot_outgrow_the_kv_cache_and_hold_the_queue(model_dir):
    # Found by an outside probe: with 8 blocks of 16 and max_model_len 256, a 100-token prompt
    # asking for 60 tokens went silent at token 129 (it preempted itself and could never be
    # admitted again), and every request behind it waited for ever. The context is capped at
    # the cache: the sequence ends with "context" there, and the queue moves on.
    from inlaid.engine import Engine, EngineConfig

    def engine(num_kv_blocks: int) -> Engine:
        return Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=4,
                                         num_kv_blocks=num_kv_blocks, block_size=16, max_model_len=256))

    small = engine(8)
    assert small.max_model_len == 8 * 16
    prompts = [[7 + i % 50 for i in range(100)], [5, 6, 7]]
    sampling = [SamplingParams(max_tokens=60, ignore_eos=True), SamplingParams(max_tokens=3, ignore_eos=True)]
    long, short = small.generate(prompts, sampling)
    assert long.finish_reason == "context" and len(long.prompt_token_ids) + len(long.token_ids) == 128
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    reference = engine(64).generate(prompts, sampling)  # room for everything: the same greedy tokens
    assert long.token_ids == reference[0].token_ids[: len(long.token_ids)] and short.token_ids == reference[1].token_ids


def test_only_a_second_signal_during_the_drain_ends_it(caplog: pytest.LogCaptureFixture) -> None:
    """The first signal starts the grace period, a second ends it; after the drain a signal
    changes nothing, and a shutdown begun without one (a fatal error) counts none of its own."""
    import signal

    from inlaid.serve.shutdown_signals import ShutdownSignals

    signals = ShutdownSignals()
    signals.on_signal(signal.SIGINT, in_flight=3)
    assert not signals.stop_now and not caplog.records
    with caplog.at_level("WARNING", logger="inlaid.coordinator"):
        signals.on_signal(signal.SIGTERM, in_flight=3)
    assert signals.stop_now
    assert [r.message for r in caplog.records] == ["second signal: stopping now; in-flight requests fail with "
                                                   "shutting_down"] and caplog.records[0].signal == "SIGTERM"
    drained = ShutdownSignals(drained=True)
    for _ in range(3):
        drained.on_signal(signal.SIGINT, in_flight=0)
    assert not drained.stop_now
    after_a_fatal_error = ShutdownSignals()  # request_shutdown() without a signal counts none
    after_a_fatal_error.on_signal(signal.SIGINT, in_flight=1)
    assert not after_a_fatal_error.stop_now
