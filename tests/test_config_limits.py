"""The server config refuses, when it is read, every value an outside probe found accepted
and failing later: memory the machine cannot hold, timers that cannot fire, a bool read
from a string, ports ZeroMQ wraps, devices and kernels only the executor knew, NaN and
infinities. Each refusal is one ConfigError naming the key; `inlaid serve` prints it in one
line and exits 2. Every case here was accepted (or crashed) before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inlaid.serve.config import ConfigError, config_from_dict, load_config
from inlaid.serve.memory_budget import check_executor_memory, host_memory_bytes

NAN, INF = float("nan"), float("inf")

CASES: list[tuple[dict[str, Any], str]] = [
    # 1. sizes the machine cannot hold (the coordinator grew to 8.8 GB; allocator failures)
    ({"executor": {"num_kv_blocks": 10**12}}, "executor.num_kv_blocks"),
    ({"executor": {"num_kv_blocks": 16_000_000}}, "executor.num_kv_blocks x block_size too large"),  # ~12 TB
    ({"executor": {"max_lora_slots": 1024, "max_lora_rank": 4096}}, "executor.max_lora_slots x max_lora_rank"),
    ({"executors": {"count": 100_000}}, "executors.count"),
    ({"executor": {"block_size": 100_000_000}}, "executor.block_size"),
    ({"executor": {"max_lora_slots": 100_000}}, "executor.max_lora_slots"),
    ({"executor": {"max_lora_rank": 1_000_000}}, "executor.max_lora_rank"),
    # 2. and 3. timers: an unstoppable server, a step timeout every step
    ({"server": {"shutdown_grace_s": NAN}}, "server.shutdown_grace_s"),
    ({"server": {"shutdown_grace_s": INF}}, "server.shutdown_grace_s"),
    ({"server": {"shutdown_grace_s": -1}}, "server.shutdown_grace_s"),
    ({"server": {"shutdown_grace_s": 1e300}}, "server.shutdown_grace_s"),
    ({"server": {"step_timeout_s": 0}}, "server.step_timeout_s"),
    ({"server": {"step_timeout_s": -1}}, "server.step_timeout_s"),
    ({"server": {"step_timeout_s": NAN}}, "server.step_timeout_s"),
    ({"server": {"step_timeout_s": INF}}, "server.step_timeout_s"),
    # 4. booleans and strings are never coerced
    ({"server": {"allow_public_bind": "false"}}, "server.allow_public_bind must be true or false"),
    ({"server": {"allow_public_bind": 1}}, "server.allow_public_bind must be true or false"),
    ({"server": {"policy": 5}}, "server.policy must be a string"),
    ({"server": {"task_histograms": "no"}}, "server.task_histograms must be true or false"),
    ({"server": {"admin_token": 12345678901234567890}}, "server.admin_token must be a string"),
    # 5. ports
    ({"server": {"address": "tcp://127.0.0.1:99999"}}, "server.address"),
    ({"server": {"address": "tcp://127.0.0.1:0"}}, "server.address"),
    ({"server": {"address": "tcp://127.0.0.1:*"}}, "server.address"),
    ({"server": {"executor_address": "tcp://127.0.0.1:70000"}}, "server.executor_address"),
    ({"server": {"executor_address": "tcp://10.1.2.3:6000"}}, "server.executor_address"),
    ({"server": {"executor_address": "ipc://"}}, "server.executor_address"),
    # 6. what only the executor found, three tracebacks later
    ({"executor": {"threads": -3}}, "executor.threads"),
    ({"executor": {"threads": 0}}, "executor.threads"),
    ({"executor": {"device": "bogus"}}, "executor.device"),
    ({"executor": {"device": "cudabogus"}}, "executor.device"),
    ({"executors": {"devices": ["bogus"]}}, "executors.devices"),
    ({"model": {"quantized_dir": "/q"}, "executor": {"quant_kernel": "bogus"}}, "executor.quant_kernel"),
    ({"executor": {"quant_kernel": "bogus"}}, "executor.quant_kernel"),
    ({"model": {"quantized_dir": "/q"}, "executor": {"quant_kernel": "triton"}}, "executor.device 'cpu'"),
    ({"model": {"quantized_dir": "/q"}, "executor": {"quant_kernel": "int4", "device": "cuda"}}, "executor.device"),
    # 7. frame sizes
    ({"server": {"max_frame_bytes": NAN}}, "server.max_frame_bytes"),
    ({"server": {"max_frame_bytes": INF}}, "server.max_frame_bytes"),
    ({"server": {"max_frame_bytes": 2048.5}}, "server.max_frame_bytes"),
    ({"server": {"max_frame_bytes": 1 << 40}}, "server.max_frame_bytes"),
    # 9. NaN, infinities, negatives
    ({"server": {"max_pending_requests": NAN}}, "server.max_pending_requests"),
    ({"server": {"max_pending_requests": INF}}, "server.max_pending_requests"),
    ({"server": {"max_pending_requests": 2.5}}, "server.max_pending_requests"),
    ({"server": {"executor_start_timeout_s": -1}}, "server.executor_start_timeout_s"),
    ({"server": {"executor_start_timeout_s": NAN}}, "server.executor_start_timeout_s"),
    ({"http": {"request_timeout_s": INF}}, "http.request_timeout_s"),
    ({"http": {"client_send_timeout_s": NAN}}, "http.client_send_timeout_s"),
    ({"executors": {"overdue_s": NAN}}, "executors.overdue_s"),
    ({"executors": {"overdue_s": INF}}, "executors.overdue_s"),
    ({"requantizer": {"change_threshold": NAN}}, "requantizer.change_threshold"),
    ({"requantizer": {"quality_tolerance": NAN}}, "requantizer.quality_tolerance"),
    ({"requantizer": {"quality_tolerance": -INF}}, "requantizer.quality_tolerance"),
    ({"requantizer": {"start_timeout_s": -1}}, "requantizer.start_timeout_s"),
    ({"requantizer": {"start_timeout_s": INF}}, "requantizer.start_timeout_s"),
    ({"requantizer": {"progress_timeout_s": INF}}, "requantizer.progress_timeout_s"),
    ({"requantizer": {"threads": 100_000}}, "requantizer.threads"),
    # 10. a context length of -5 or 0
    ({"executor": {"max_model_len": -5}}, "executor.max_model_len"),
    ({"executor": {"max_model_len": 0}}, "omit it for the model's length"),
    # 11. the key, not a Python exception
    ({"server": {"log_level": "BOGUS"}}, "server.log_level"),
    ({"server": {"log_level": 10}}, "server.log_level"),
    ({"server": {"executor_address": "bogus"}}, "server.executor_address"),
    # 12. a fourth probe's: a crash at bind (ZeroMQ's high-water mark is a C int), the float
    # model served in silence, pathlib's RuntimeError for a user without a home
    ({"server": {"max_pending_requests": 536_870_912}}, "server.max_pending_requests"),
    ({"model": {"quantized_dir": ""}}, "model.quantized_dir must be a non-empty path string"),
    ({"model": {"quantized_dir": 0}}, "model.quantized_dir must be a non-empty path string"),
    ({"server": {"state_dir": "~no-such-user-inlaid/state"}}, "server.state_dir ~no-such-user-inlaid/state: Could not determine home directory"),
    ({"tasks": {"qa": "~no-such-user-inlaid/qa"}}, "tasks.qa"),
    ({"model": {"dir": "~no-such-user-inlaid/model"}}, "model.dir"),
    ({"server": {"address": "tcp://127.0.0.1:2\u00b2"}}, "server.address"),  # int() raised: no key named
    ({"server": {"address": "tcp://127.0.0.1:\u0662\u0669\u0663"}}, "server.address"),  # failed at bind
    ({"server": {"address": "tcp://[::1]:5555"}}, "server.address 'tcp://[::1]:5555': IPv6"),  # failed at bind
    ({"server": {"address": "tcp://:::5555"}}, "server.address 'tcp://:::5555': IPv6"),  # unbracketed: the same
]


@pytest.mark.parametrize("raw, key", CASES, ids=[repr(raw) for raw, _ in CASES])
def test_a_bad_value_is_refused_naming_its_key(raw: dict[str, Any], key: str, model_dir: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict({**raw, "model": {"dir": str(model_dir), **raw.get("model", {})}})
    message = str(refused.value)
    assert key in message and "\n" not in message, message


def _bytes_per_kv_block(model_dir: Path) -> int:
    from inlaid.engine.config import ModelConfig

    model = ModelConfig.from_dir(model_dir)
    return 16 * model.num_layers * 2 * model.num_kv_heads * model.head_dim * 4  # float32 on the CPU


def test_executors_that_fit_alone_but_not_together_are_refused_by_count(model_dir: Path) -> None:
    memory = host_memory_bytes()
    assert memory is not None
    blocks = int(0.6 * memory / _bytes_per_kv_block(model_dir))  # 60% of the machine each
    one = {"model": {"dir": str(model_dir)}, "executor": {"num_kv_blocks": blocks, "max_lora_slots": 1}}
    assert config_from_dict(one).engine.num_kv_blocks == blocks
    with pytest.raises(ConfigError, match=r"^executors.count too large: 2 executors on cpu"):
        config_from_dict({**one, "executors": {"count": 2}})


def test_each_executors_weights_count_too(model_dir: Path) -> None:
    """An outside probe: 64 CPU executors of the float model were accepted on a 23 GiB machine
    (their KV caches and LoRA pools fitted) and ran it out of memory: each loads the weights.
    Four executors whose caches and pools fill all but twice a lower bound of the weights."""
    from inlaid.engine.config import ModelConfig

    memory = host_memory_bytes()
    assert memory is not None
    model = ModelConfig.from_dir(model_dir)
    q, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    projections = model.num_layers * model.hidden_size * (2 * q + 2 * kv_width + 3 * model.intermediate_size)
    weights = 2 * projections + 2 * model.vocab_size * model.hidden_size  # bf16: below any float base's
    lora = 1 * 8 * model.num_layers * (7 * model.hidden_size + 2 * q + 2 * kv_width + 3 * model.intermediate_size) * 4
    blocks = (memory // 4 - lora - weights // 2) // _bytes_per_kv_block(model_dir)
    raw = {"model": {"dir": str(model_dir)}, "executor": {"num_kv_blocks": blocks, "max_lora_slots": 1,
                                                          "max_lora_rank": 8}, "executors": {"count": 4}}
    assert 4 * (blocks * _bytes_per_kv_block(model_dir) + lora) < memory  # the caches and pools alone fit
    with pytest.raises(ConfigError, match=r"^executors.count too large: 4 executors on cpu .*weights at least"):
        config_from_dict(raw)
    assert config_from_dict({**raw, "executors": {"count": 3}}).executors.count == 3


def test_gpu_memory_is_checked_with_what_torch_reports(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the config imports no torch, so a GPU's memory is checked by `inlaid serve`'s
    torch probe (a child process), here given 1 GB devices."""
    import inlaid.serve.cli as serve_cli

    config = config_from_dict({"model": {"dir": str(model_dir)},
                               "executor": {"device": "cuda", "num_kv_blocks": 100_000}})  # ~37 GB in bf16
    with pytest.raises(ConfigError, match=r"executor.num_kv_blocks x block_size too large: 1 executor on cuda:0"):
        check_executor_memory(config, lambda pool: 10**9 if pool == "cuda:0" else None)
    probe = subprocess.CompletedProcess([], 0, stdout="2 2.9.0 1000000000 1000000000\n", stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: probe)
    problem = serve_cli.unavailable_cuda_device(config)
    assert problem is not None and "executor.num_kv_blocks" in problem and "cuda:0's 1.0 GB" in problem
    two = config_from_dict({"model": {"dir": str(model_dir)}, "executor": {"num_kv_blocks": 1000},
                            "executors": {"count": 2, "devices": ["cuda:1", "cuda:1"]}})
    probe.stdout = f"2 2.9.0 {10**12} {10**9}\n"  # cuda:1 holds one of its two executors, not both
    assert "executors.devices too large: 2 executors on cuda:1" in (serve_cli.unavailable_cuda_device(two) or "")


def test_quant_kernel_names_are_the_kernel_layers(model_dir: Path) -> None:
    from typing import get_args

    from inlaid.engine.config import QUANT_KERNELS
    from inlaid.kernels.quant_linear import Mode

    assert QUANT_KERNELS == get_args(Mode)
    config = config_from_dict({"model": {"dir": str(model_dir), "quantized_dir": "/q"},
                               "executor": {"quant_kernel": "triton", "device": "cuda:1"}})
    assert (config.engine.quant_kernel, config.engine.device) == ("triton", "cuda:1")


def test_unreadable_files_are_named(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xff\xfe-not-utf-8-token-bytes")
    with pytest.raises(ConfigError, match="server.admin_token_file .*token is not UTF-8 text"):
        config_from_dict({"model": {"dir": str(model_dir)}, "server": {"admin_token_file": "token"}}, base_dir=tmp_path)
    (tmp_path / "server.toml").write_bytes(b'[server]\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError, match="config file .*server.toml is not UTF-8 text"):
        load_config(tmp_path / "server.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "file").write_text("x")
    for state_dir in ("file", "file/state"):
        with pytest.raises(ConfigError, match="server.state_dir .* a file"):
            config_from_dict({"model": {"dir": str(model_dir)}, "server": {"state_dir": state_dir}}, base_dir=tmp_path)


def test_a_byte_order_mark_is_read_past_and_a_model_file_is_named(model_dir: Path, tmp_path: Path) -> None:
    """Windows editors start UTF-8 files with a byte-order mark: the config read as "Invalid
    statement (at line 1, column 1)", and a token file's mark became part of the token (the
    server then refused its admin's every call). model.dir naming a file said "not found"."""
    (tmp_path / "token").write_text("\ufeff0123456789abcdef-token\n", encoding="utf-8")
    (tmp_path / "server.toml").write_bytes("\ufeff".encode() + f'[model]\ndir = "{model_dir}"\n'
                                           '[server]\nadmin_token_file = "token"\n'.encode())
    config = load_config(tmp_path / "server.toml")
    assert config.engine.model_dir == str(model_dir) and config.admin_token == "0123456789abcdef-token"
    from inlaid.engine.config import ModelConfig, ModelLoadError

    with pytest.raises(ModelLoadError, match=r"config.json is a file, not a model directory"):  # serve, generate, ...
        ModelConfig.from_dir(model_dir / "config.json")


POLICY_MODULE = '''
def raises():
    raise RuntimeError("the factory broke")
def needs_arguments(options):
    return options
NOT_CALLABLE = 3
'''


@pytest.mark.parametrize("spec, words", [
    (":", "package.module:factory"),
    ("plugin_policy:", "package.module:factory"),
    ("plugin_policy:raises", "RuntimeError: the factory broke"),
    ("plugin_policy:needs_arguments", "called with no arguments"),
    ("plugin_policy:NOT_CALLABLE", "is not callable"),
    ("plugin_syntax:factory", "SyntaxError"),
])
def test_a_plugin_policy_that_cannot_be_made_is_named(spec: str, words: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from inlaid.serve.scheduler_config import load_policy

    (tmp_path / "plugin_policy.py").write_text(POLICY_MODULE)
    (tmp_path / "plugin_syntax.py").write_text("def factory(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        load_policy(spec)
    message = str(refused.value)
    assert message.startswith(f"server.policy {spec!r}: ") and words in message and "\n" not in message, message


def _serve(tmp_path: Path, config_text: str, *extra: str) -> str:
    """`inlaid serve` on a config that must be refused: exit 2, one line, no traceback."""
    config = tmp_path / "server.toml"
    config.write_text('[server]\naddress = "tcp://127.0.0.1:5596"\n' + config_text)
    (tmp_path / "plugin_policy.py").write_text(POLICY_MODULE)
    done = subprocess.run([sys.executable, "-m", "inlaid.cli", "serve", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (done.returncode, err)
    return err


def test_serve_refuses_timers_that_would_make_it_unstoppable(tmp_path: Path) -> None:
    assert "server.shutdown_grace_s" in _serve(tmp_path, "shutdown_grace_s = nan\n")
    assert "server.step_timeout_s" in _serve(tmp_path, "step_timeout_s = 0\n")


def test_serve_checks_its_own_options_and_the_files_it_loads(tmp_path: Path) -> None:
    assert "--log-level must be one of" in _serve(tmp_path, "", "--log-level", "BOGUS")
    (tmp_path / "empty").mkdir()
    err = _serve(tmp_path, '[model]\nquantized_dir = "empty"\n')
    assert "model.quantized_dir" in err and "has no config.json and no .safetensors weights" in err
    err = _serve(tmp_path, "", "--config", str(tmp_path))  # the last --config wins: a directory
    assert "is a directory" in err


def test_serve_names_the_policy_whose_factory_fails(tmp_path: Path) -> None:
    err = _serve(tmp_path, 'policy = "plugin_policy:raises"\n')
    assert "server.policy 'plugin_policy:raises'" in err and "the factory broke" in err


def test_more_cpu_executor_threads_than_cores_is_warned_of(tmp_path):
    """Nothing said so when the CPU executors' threads outnumbered the cores (torch's default:
    a thread per core in each executor), and each step waited on the others'."""
    from inlaid.serve.cli import cpu_oversubscription
    from inlaid.serve.config import config_from_dict

    def why(raw: dict, cores: int) -> str | None:
        return cpu_oversubscription(config_from_dict(raw, base_dir=tmp_path), cores)

    assert why({}, 2) is None and why({"executor": {"threads": 2}}, 2) is None
    assert why({"executors": {"count": 2}, "executor": {"threads": 1}}, 2) is None
    three = why({"executors": {"count": 3}, "executor": {"threads": 1}}, 2)
    assert "3 CPU executors x executor.threads 1 = 3 threads on 2 cores" in three
    assert "lower executors.count to at most 2" in three
    assert why({"executor": {"threads": 4}}, 2) == ("1 CPU executor x executor.threads 4 = 4 threads on 2 cores "
                                                    "contend for them: lower executor.threads to 2")
    unset = why({"executors": {"count": 2}}, 4)
    assert "2 CPU executors each use all 4 cores" in unset and "set executor.threads to 2" in unset
    # one core: one thread each is still too many, so fewer executors too (a reviewer)
    assert "lower executors.count to at most 1" in why({"executors": {"count": 2}}, 1)
    # executors on CUDA devices do not count against the host's cores
    assert why({"executors": {"count": 2, "devices": ["cuda:0", "cuda:1"]}}, 1) is None
    mixed = {"executors": {"count": 3, "devices": ["cuda:0", "cpu", "cpu"]}, "executor": {"threads": 1}}
    assert why(mixed, 2) is None


def test_cpu_lora_pools_count_their_float16_copies_where_the_native_kernel_makes_them(model_dir: Path,
                                                                                      monkeypatch) -> None:
    """On an AVX-512 CPU a float32 executor keeps float16 copies of its LoRA pools (half their
    bytes again): 1,024 slots at rank 16 on the default model were accepted at 20 GB on a
    24 GiB machine whose executor measured 29 MB a slot (an outside probe). The budget here
    lies between the pools alone and the pools with their copies."""
    from inlaid.engine.config import ModelConfig

    config = config_from_dict({"model": {"dir": str(model_dir)},
                               "executor": {"max_lora_slots": 512, "max_lora_rank": 16, "num_kv_blocks": 16}})
    model = ModelConfig.from_dir(str(model_dir))
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    pools = 512 * 16 * model.num_layers * (7 * model.hidden_size + 2 * q + 2 * kv + 3 * model.intermediate_size) * 4
    budget = lambda pool: int(pools * 1.25) if pool == "cpu" else None  # noqa: E731
    monkeypatch.setenv("INLAID_NATIVE_LORA_HALF", "0")
    check_executor_memory(config, budget)  # no copies: the pools fit
    monkeypatch.delenv("INLAID_NATIVE_LORA_HALF")
    # What the executor does (the kernel built, AVX-512 or not), not what the budget guessed
    from inlaid.kernels.lora_native import native_half_copies_worth_it
    from inlaid.serve.memory_budget import _half_pool_copies

    assert _half_pool_copies(config.engine, "float32", "cpu") == native_half_copies_worth_it()
    if not native_half_copies_worth_it():
        check_executor_memory(config, budget)
        return
    with pytest.raises(ConfigError, match=r"max_lora_slots x max_lora_rank too large: .* x \(4 \+ 2\) bytes "
                                          r"\(float32 and its float16 copy, AVX-512\)"):
        check_executor_memory(config, budget)
