"""Serving pieces that need no model process: protocol, config, errors, client purity."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import pytest

from inlaid import protocol
from inlaid.client import errors as client_errors
from inlaid.protocol import (
    AdapterLoad,
    AddTask,
    BatchPlan,
    ChatMessage,
    ChunkPlan,
    ClientRequest,
    ErrorCode,
    ErrorReply,
    ExecutorFailure,
    ExecutorHello,
    ExecutorInbound,
    ExecutorOutbound,
    ExecutorShutdown,
    ExecutorStats,
    Generate,
    GenerateDone,
    SampledToken,
    SamplingParams,
    SequenceFailure,
    ServerReply,
    StepResult,
    TextChunk,
)
from inlaid.serve.config import ConfigError, config_from_dict, load_config
from inlaid.serve.scheduler_config import load_policy
from inlaid.serve.launcher import to_toml


def _roundtrip(message, union):
    return msgspec.msgpack.Decoder(union).decode(msgspec.msgpack.encode(message))


def test_every_message_survives_msgpack_roundtrip():
    sampling = SamplingParams(max_tokens=5, temperature=0.7, top_k=3, top_p=0.9, seed=11, stop=["\n"])
    plan = BatchPlan(
        step_id=3,
        chunks=[ChunkPlan(seq_id=1, token_ids=[5, 6], start_pos=0, block_table=[0, 9], adapter_slot=-1,
                          sample=True, sampling=sampling, num_generated=0)],
        adapter_loads=[AdapterLoad(slot=2, name="a", path="/x")],
    )
    for message in (plan, ExecutorShutdown()):
        assert _roundtrip(message, ExecutorInbound) == message
    for message in (
        ExecutorHello(protocol_version=1, generation=2, pid=3, device="cpu", num_kv_blocks=4, load_seconds=0.5),
        StepResult(step_id=3, sampled=[SampledToken(seq_id=1, token_id=7)], num_tokens=2, compute_seconds=0.1),
        StepResult(step_id=4, sampled=[], num_tokens=2, compute_seconds=0.1, failed_adapters=["a"],
                   failed=[SequenceFailure(seq_id=2, code=ErrorCode.ADAPTER_FAILED, message="unreadable")]),
        ExecutorFailure(step_id=3, error_type="RuntimeError", message="boom"),
        ExecutorStats(rss_bytes=10),
    ):
        assert _roundtrip(message, ExecutorOutbound) == message
    requests = [
        Generate(request_id="g", task="t", messages=[ChatMessage("user", "hi")], sampling=sampling, stream=True,
                 deadline_s=2.5),
        AddTask(request_id="a", name="t", adapter_dir="/d", token="secret"),
    ]
    for message in requests:
        assert _roundtrip(message, ClientRequest) == message
    replies = [
        TextChunk(request_id="g", text="x", token_ids=[1]),
        GenerateDone(request_id="g", text="x", token_ids=[1], finish_reason="stop", num_prompt_tokens=2,
                     queue_seconds=0.0, first_token_seconds=0.1, total_seconds=0.2),
        ErrorReply(request_id="g", code=ErrorCode.OVERLOADED, message="busy"),
    ]
    for message in replies:
        assert _roundtrip(message, ServerReply) == message


def test_tags_are_unique_within_each_union():
    for union in (ClientRequest, ServerReply, ExecutorInbound, ExecutorOutbound):
        tags = [cls.__struct_config__.tag for cls in union.__args__]
        assert len(tags) == len(set(tags)), union


def test_every_error_code_maps_to_its_own_exception_class():
    codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    classes = set()
    for code in codes:
        error = client_errors.error_from_reply(ErrorReply(request_id="r", code=code, message="m"))
        assert type(error) is not client_errors.InlaidError, code
        assert error.code == code and error.request_id == "r"
        classes.add(type(error))
    assert len(classes) == len(codes)
    unknown = client_errors.error_from_reply(ErrorReply(request_id="r", code="from_the_future", message="m"))
    assert type(unknown) is client_errors.InlaidError and unknown.code == "from_the_future"


def test_client_sdk_imports_no_torch_or_transformers():
    code = textwrap.dedent("""
        import sys
        import inlaid.client, inlaid.client.cli
        heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'tokenizers', 'numpy')]
        engine = [m for m in sys.modules if m.startswith(('inlaid.engine', 'inlaid.serve'))]
        print(heavy, engine)
        sys.exit(1 if heavy or engine else 0)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_coordinator_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import inlaid.serve.coordinator, inlaid.serve.cli, inlaid.serve.supervisor, inlaid.serve.demo
        sys.exit(1 if any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules) else 0)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_protocol_package_imports_nothing_else_of_inlaid():
    import re
    from pathlib import Path

    modules = sorted(Path(protocol.__file__).parent.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "client", "executor", "requantizer", "sampling"}
    for module in modules:
        imported = re.findall(r"^\s*(?:from|import)\s+(inlaid[\w.]*)", module.read_text(), flags=re.M)
        assert all(name == "inlaid.protocol" or name.startswith("inlaid.protocol.") for name in imported), (module, imported)


def _write(tmp_path, text: str):
    path = tmp_path / "server.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_config_reads_every_section_and_resolves_relative_paths(tmp_path, model_dir):
    (tmp_path / "token").write_text("a-very-secret-token-value\n")
    path = _write(tmp_path, f"""
        [model]
        dir = "{model_dir}"
        [executor]
        threads = 1
        num_kv_blocks = 128
        [server]
        address = "tcp://127.0.0.1:6001"
        admin_token_file = "token"
        max_pending_requests = 7
        [tasks]
        sentiment = "adapters/sentiment"
    """)
    config = load_config(path)
    assert config.engine.model_dir == str(model_dir)
    assert config.engine.threads == 1 and config.engine.num_kv_blocks == 128
    assert config.admin_token == "a-very-secret-token-value"
    assert config.limits.max_pending_requests == 7
    assert config.tasks == {"sentiment": str(tmp_path / "adapters" / "sentiment")}


def test_config_defaults_bind_loopback_and_disable_admin(model_dir):
    config = config_from_dict({"model": {"dir": str(model_dir)}})
    assert config.address == "tcp://127.0.0.1:5555"
    assert config.admin_token is None


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"server": {"address": "tcp://0.0.0.0:5555"}}, "not a loopback address"),
        ({"server": {"address": "http://127.0.0.1:1"}}, "must start with tcp://"),
        ({"server": {"admin_token": "short"}}, "must have 16 to 1024 characters, not 5"),
        ({"server": {"admin_token": "x" * 1025}}, "must have 16 to 1024 characters, not 1025"),
        ({"server": {"admin_token": "x" * 20, "admin_token_env": "X"}}, "only one of"),
        ({"server": {"max_pending_requests": "many"}}, "must be a number"),
        ({"server": {"max_pending_requests": 0}}, "max_pending_requests must be >= 1"),
        ({"server": {"bogus": 1}}, "unknown keys"),
        ({"executor": {"num_kv_blocks": 0}}, "num_kv_blocks must be >= 1"),
        # accepted, then every executor start died allocating its decode graphs' shapes (a probe)
        ({"executor": {"max_num_seqs": 1_000_000_000}},
         r"max_num_seqs must be >= 1 and <= 65536 \(an integer\), got 1000000000"),
        ({"executor": {"max_num_batched_tokens": 10**14}}, r"max_num_batched_tokens must be .*<= 4194304"),
        ({"executor": {"warp_drive": True}}, "unknown keys"),
        ({"tasks": {"bad name!": "/x"}}, "task name"),
        # Found by an outside probe: these were accepted (look-alike letters; '..' a path
        # component; '-x' an option to any command line that names it).
        ({"tasks": {"ünï": "/x"}}, "task name 'ünï': use 1-128 ASCII"),
        ({"tasks": {"..": "/x"}}, "task name '..'"),
        ({"tasks": {"-x": "/x"}}, "task name '-x'"),
        ({"tasks": {"n" * 10_000: "/x"}}, r"task name 'n{60}'\.\.\. \(10000 characters\)"),
        ({"extra": {}}, "unknown config sections"),
    ],
)
def test_config_errors_are_clear(raw, message, model_dir):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"dir": str(model_dir)}, **raw})


def test_public_bind_needs_an_explicit_opt_in(model_dir):
    config = config_from_dict({"model": {"dir": str(model_dir)},
                               "server": {"address": "tcp://0.0.0.0:5555", "allow_public_bind": True}})
    assert config.address == "tcp://0.0.0.0:5555"


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[model\n"))


def test_launcher_toml_writer_reads_back(tmp_path):
    import tomllib

    data = {"model": {"dir": 'C:\\odd "path"'}, "server": {"x": 1, "y": 2.5, "z": True}}
    assert tomllib.loads(to_toml(data)) == data


def test_serve_cli_rejects_a_bad_config_with_exit_code_2(tmp_path):
    path = _write(tmp_path, "[server]\naddress = \"tcp://8.8.8.8:1\"\n")
    done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr


def test_serve_cli_names_a_missing_quantized_dir_or_cuda_device_before_starting(tmp_path):
    """Configs every executor start would fail on (three tracebacks, then "exit code 1"):
    refused at once with the reason, exit code 2."""
    import torch

    cases = [('[model]\nquantized_dir = "nowhere"\n', "is not a directory"),
             ('[executor]\ndevice = "cuda:7"\n' if torch.cuda.is_available() else '[executor]\ndevice = "cuda"\n',
              "inlaid serve: executor.device 'cuda"),  # the key named (an outside probe: it was not)
             ('[executors]\ncount = 2\ndevices = ["cpu", "cuda:9"]\n', "executors.devices 'cuda:9': this machine has"),
             (f'[tasks]\nsentiment = "{tmp_path / "no-adapter"}"\n', "task 'sentiment' in the config: "),
             (f'[model]\ndir = "{tmp_path / "no-model"}"\n', "model directory not found")]
    for text, message in cases:
        path = _write(tmp_path, '[server]\naddress = "tcp://127.0.0.1:5597"\n' + text)
        done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(path)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (text, done.stderr[-2000:])
        assert message in done.stderr and "Traceback" not in done.stderr, (text, done.stderr[-2000:])
        # one plain line besides the JSON log records, as a config's refusals are
        plain = [line for line in done.stderr.splitlines() if line.startswith("inlaid serve: ")]
        assert len(plain) == 1 and message in plain[0], (text, done.stderr[-2000:])
    # The in-process engine too (the runner checks its device before loading anything).
    done = subprocess.run([sys.executable, "-m", "inlaid.cli", "generate", "--device", "cuda:99", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "'cuda:99': this machine has" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_scheduling_policy_is_pluggable_by_name():
    from inlaid.engine.scheduler import FifoPolicy

    assert load_policy("fifo") is None  # the engine's default FIFO
    assert isinstance(load_policy("inlaid.engine.scheduler:FifoPolicy"), FifoPolicy)
    with pytest.raises(ConfigError, match="No module named"):
        load_policy("no_such_module_xyz:Policy")
    with pytest.raises(ConfigError, match="did not give a SchedulingPolicy"):
        load_policy("collections:OrderedDict")
    with pytest.raises(ConfigError, match="server.policy"):
        config_from_dict({"server": {"policy": "lottery"}})


@pytest.mark.parametrize(
    "body, code, request_id",
    [
        ([b"\xc1"], "malformed", ""),
        ([b""], "malformed", ""),
        ([b"x", b"y"], "malformed", ""),
        ([], "malformed", ""),
        ([msgspec.msgpack.encode({"type": "nope", "request_id": "q"})], "unknown_message_type", "q"),
        ([msgspec.msgpack.encode({"type": "health"})], "malformed", ""),  # no request_id
        ([msgspec.msgpack.encode({"type": "health", "request_id": 5})], "malformed", ""),
        ([b"\x81\xa4type\xa1\x9a"], "malformed", ""),  # invalid UTF-8
        ([b"\x91" * 1000], "malformed", ""),  # nested too deep
        ([b"\x00" * 2048], "frame_too_large", ""),
    ],
)
def test_frames_decode_to_the_right_error(body, code, request_id):
    from inlaid.serve.frames import decode_client_frames

    reply = decode_client_frames(body, max_frame_bytes=1024)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.request_id) == (code, request_id)


def test_a_too_large_generate_is_still_named():
    from inlaid.serve.frames import decode_client_frames

    frame = msgspec.msgpack.encode(Generate(request_id="big", prompt="x" * 5000))
    reply = decode_client_frames([frame], max_frame_bytes=1024)
    assert (reply.code, reply.request_id) == ("frame_too_large", "big")


def test_frames_decode_a_good_request():
    from inlaid.serve.frames import decode_client_frames

    message = Generate(request_id="ok", prompt="hi")
    assert decode_client_frames([msgspec.msgpack.encode(message)], 1024) == message


def test_the_sdk_refuses_integers_msgpack_cannot_carry_before_sending():
    """max_tokens, seeds or token ids past 64 bits: an InvalidRequestError naming the range
    from every SDK call, before any socket is touched (no server listens at this address),
    nothing left registered (it was an OverflowError from inside the encoder)."""
    import asyncio

    from inlaid.client import AsyncClient, Client, InvalidRequestError

    with Client("tcp://127.0.0.1:9", timeout_s=1) as client:
        for param, call in (("max_tokens", lambda: client.generate("x", max_tokens=2**64)),
                            ("seed", lambda: client.stream("x", seed=2**64)),
                            ("top_k", lambda: client.generate("x", top_k=2**64)),
                            ("prompt_token_ids", lambda: client.generate(prompt_token_ids=[1, -(2**63) - 1])),
                            ("stop_token_ids", lambda: client.generate("x", stop_token_ids=[2**70]))):
            with pytest.raises(InvalidRequestError, match="out of range") as refused:
                call()
            # named, as every other refusal of the SDK is (the HTTP front's error names `param`)
            assert refused.value.param == param and param in refused.value.message, refused.value.message
        assert client.server is None and not client._inbox

    async def run() -> None:
        async with AsyncClient("tcp://127.0.0.1:9", timeout_s=1) as client:
            for call in (lambda: client.generate("x", max_tokens=2**64), lambda: client.stream("x", seed=2**64)):
                with pytest.raises(InvalidRequestError, match="out of range") as refused:
                    await call()
                assert refused.value.param in ("max_tokens", "seed")
            assert client.server is None and not client._queues

    asyncio.run(run())


def test_remove_task_counts_its_requests_in_flight_running_or_queued():
    """RemoveTask's reply counts every request still to run (4 running and 8 queued said
    "its 12 running requests"); the adapter goes when the last of them ends."""
    from types import SimpleNamespace

    from inlaid.serve.task_registry import TaskRegistry

    unregistered: list[str] = []
    paths = {"busy": "/a", "single": "/b", "idle": "/c"}  # the engine's registered adapters
    adapters = SimpleNamespace(paths=paths, unregister=unregistered.append)
    registry = TaskRegistry([SimpleNamespace(scheduler=SimpleNamespace(adapters=adapters))],  # type: ignore[list-item]
                            admin_token=None)
    registry.tasks.update(paths)
    for _ in range(12):
        registry.request_started("busy")
    registry.request_started("single")
    assert registry.remove("busy") == ("task 'busy' removed; its 12 requests in flight (running or queued) "
                                       "finish first")
    assert registry.remove("single") == ("task 'single' removed; its 1 request in flight (running or queued) "
                                         "finishes first")
    assert registry.remove("idle") == "task 'idle' removed" and unregistered == ["idle"]
    for _ in range(12):
        registry.request_ended("busy")
    assert unregistered == ["idle", "busy"] and registry.draining == {"single"}


def test_settings_a_server_never_uses_are_named_not_taken_silently(tmp_path):
    """`quant_kernel` without a quantized base and a `[requantizer]` section without a state
    directory (or a quantized base) were accepted and ignored without a word (an outside
    probe following docs/serving.md)."""
    from inlaid.serve.cli import ignored_settings
    from inlaid.serve.config import config_from_dict

    def ignored(raw: dict) -> list[str]:
        return [setting for setting, _ in ignored_settings(config_from_dict(raw, base_dir=tmp_path))]

    assert ignored({"executor": {"quant_kernel": "dequant"}}) == ["executor.quant_kernel"]
    assert ignored({"requantizer": {"duty_cycle": 0.2}}) == ["[requantizer]"]
    # A section restating only defaults is as unused (it said nothing of it).
    assert ignored({"requantizer": {"duty_cycle": 0.5}}) == ["[requantizer]"]
    assert ignored({"requantizer": {}}) == ["[requantizer]"]
    assert ignored({"requantizer": {"duty_cycle": 0.2}, "server": {"state_dir": "state"}}) == ["[requantizer]"]
    assert ignored({"executor": {"quant_kernel": "auto"}, "server": {"state_dir": "state"}}) == []
    quantized = tmp_path / "q"
    quantized.mkdir()
    assert ignored({"model": {"quantized_dir": str(quantized)}, "executor": {"quant_kernel": "dequant"},
                    "requantizer": {"duty_cycle": 0.2}, "server": {"state_dir": "state"}}) == []


def test_a_max_model_len_past_what_is_served_is_named(tmp_path, model_dir):
    """Past the model's max_position_embeddings (8192) or the KV cache it was shrunk without a word."""
    from inlaid.serve.cli import ignored_settings
    from inlaid.serve.config import config_from_dict

    def ignored(executor: dict) -> list[tuple[str, str]]:
        return ignored_settings(config_from_dict({"model": {"dir": str(model_dir)}, "executor": executor},
                                                 base_dir=tmp_path))

    (setting, why), = ignored({"max_model_len": 10_000_000})
    assert setting == "executor.max_model_len" and "sequences end at 8192 tokens" in why, why
    (_, why), = ignored({"max_model_len": 4096, "num_kv_blocks": 100, "block_size": 16})
    assert "sequences end at 1600 tokens" in why and "= 1600" in why, why
    assert ignored({"max_model_len": 1024}) == []


def test_a_quantized_dir_missing_its_weights_is_told_so(tmp_path):
    """It said "has no config.json and .safetensors weights" of a directory with a config.json."""
    from inlaid.serve.config_parsing import ConfigError, check_quantized_dir

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no \.safetensors weights \(not a checkpoint") as refused:
        check_quantized_dir(str(tmp_path))
    assert "config.json" not in str(refused.value)
