"""`inlaid serve` configuration: one TOML file. Torch-free.

```toml
[model]
dir = "~/.cache/inlaid/models/SmolLM2-135M-Instruct"
quantized_dir = "/srv/inlaid/smollm2-mlgptq-4bit"   # optional GPTQ checkpoint

[executor]
device = "cpu"            # or "cuda", "cuda:1"
threads = 2               # torch threads (CPU)
num_kv_blocks = 2048
max_num_seqs = 64

[server]
address = "tcp://127.0.0.1:5555"
policy = "inlaid"         # fifo | inlaid | mlfq | vtc, or "package.module:factory"
admin_token_env = "INLAID_ADMIN_TOKEN"     # or admin_token_file / admin_token
max_pending_requests = 1024

[scheduler]               # the policy's options (docs/scheduling.md)
max_adapters_per_step = 4
predictor_state = "/var/lib/inlaid/predictor.npz"
# autotune_cost_model = "sched_cost_model.json"   # inlaid: choose the other options at start-up
# autotune_lengths = "my_requests.jsonl"          # the tuning's workload (default: the base's suite lengths)

[executors]               # optional: several executors, one per device (docs/scale-out.md)
count = 2
devices = ["cuda:0", "cuda:1"]

[tasks]
sentiment = "/srv/inlaid/adapters/sentiment"

[http]                    # optional: the OpenAI-compatible front (docs/http.md), /metrics included
port = 8000

[metrics]                 # optional: /metrics on a port of its own (e.g. when there is no [http])
port = 9464

[requantizer]             # dynamic task addition (docs/dynamic-tasks.md); needs server.state_dir
threads = 1
quality_tolerance = 1.0
```

Relative paths are resolved against the file's directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from inlaid.cli_args import type_words
from inlaid.engine.config import EngineConfig
from inlaid.http.settings import HttpConfig, check_listen_address
from inlaid.serve.config_parsing import (ConfigError, admin_token_from, check_bind_address, check_log_level,
                                         check_port_clashes, check_state_dir, inside, read_toml, reject_unknown,
                                         resolve_path, section, typed_value, without_admin_token)
from inlaid.serve.config_sections import ExecutorsConfig, MetricsConfig, RequantizerSettings, ServerLimits
from inlaid.serve.scheduler_config import check_scheduler


@dataclass
class ServerConfig:
    engine: EngineConfig
    address: str = "tcp://127.0.0.1:5555"
    # Where the executor connects; "auto" = an ipc socket in a private temporary directory.
    executor_address: str = "auto"
    tasks: dict[str, str] = field(default_factory=dict)
    admin_token: str | None = None  # None: every admin call is refused
    limits: ServerLimits = field(default_factory=ServerLimits)
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    allow_public_bind: bool = False
    # fifo | inlaid | mlfq | vtc (inlaid.scheduling), or "package.module:factory" returning a
    # SchedulingPolicy (called with no arguments)
    policy: str = "fifo"
    scheduler: dict[str, Any] = field(default_factory=dict)  # the built-in policy's options
    # A fitted step-cost model (bench/sched_cost.py): the inlaid policy's options are chosen
    # on it at start-up (inlaid/scheduling/autotune.py); [scheduler] options set explicitly stay.
    autotune_cost_model: str | None = None
    # The recorded requests the tuning simulates (inlaid/scheduling/suite.py's JSONL format);
    # None: the packaged ones of the base served (`tuning_lengths_file`).
    autotune_lengths: str | None = None
    http: HttpConfig | None = None  # the OpenAI-compatible front, started with the server
    metrics: MetricsConfig | None = None
    task_histograms: bool = True  # False: the latency histograms without a `task` label (serving.md)
    executors: ExecutorsConfig = field(default_factory=ExecutorsConfig)

    # Where added tasks, their adapters and the re-quantized layers persist; None: nowhere
    # (added tasks are forgotten at exit and the base is never re-quantized).
    state_dir: str | None = None
    requantizer: RequantizerSettings = field(default_factory=RequantizerSettings)
    # Whether the config has a [requantizer] section, even one restating the defaults: without
    # a state directory (or a quantized base) the section is named as unused, whatever it says.
    requantizer_section: bool = False

    def executor_devices(self) -> list[str]:
        """One device per executor: [executors] devices, else [executor] device for each."""
        return self.executors.devices or [self.engine.device] * self.executors.count

    def planning_engine(self) -> EngineConfig:
        """[executor] on an executor's device, a CUDA one if any (as `policy_options` starts
        from the GPU defaults then): the limits the scheduler tuning simulates. `[executor]
        device = "cpu"` beside CUDA `[executors] devices` gave it the CPU's cap on prompt
        tokens beside decodes, which no executor applied."""
        devices = self.executor_devices()
        return replace(self.engine, device=next((d for d in devices if d.startswith("cuda")), devices[0]))

    def policy_options(self) -> dict[str, Any]:
        """The options the policy starts with: [scheduler], over the inlaid policy's GPU
        defaults (srtf.CUDA_DEFAULTS) where the executors run on CUDA devices."""
        if self.policy == "inlaid" and any(device.startswith("cuda") for device in self.executor_devices()):
            from inlaid.scheduling.srtf import CUDA_DEFAULTS

            return {**CUDA_DEFAULTS, **self.scheduler}
        return dict(self.scheduler)

    def validate(self) -> None:
        try:
            self.engine.validate()
        except ValueError as error:  # EngineConfig names its fields, which are [executor]'s keys
            raise ConfigError(f"executor.{error}") from None
        self.executors.validate(self.engine.quant_kernel if self.engine.quantized_dir else None)
        self.requantizer.validate()
        self.limits.validate()
        if self.executors.count > 1 and self.executor_address != "auto":
            raise ConfigError("server.executor_address must be 'auto' with several executors (each gets its own socket)")
        check_bind_address("server.address", self.address, self.allow_public_bind)
        if self.executor_address != "auto":  # it is bound too: whoever connects there gets the plans
            check_bind_address("server.executor_address", self.executor_address, self.allow_public_bind)
        check_log_level("server.log_level", self.log_level)
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"server.log_format must be 'json' or 'text', got {self.log_format!r}")
        if self.state_dir is not None:
            check_state_dir(self.state_dir)
        for name, adapter_dir in self.tasks.items():
            check_task_name(name, self.engine.model_dir)
            if self.state_dir is not None and inside(adapter_dir, self.state_dir):
                raise ConfigError(f"tasks.{name}: {adapter_dir} is inside server.state_dir, whose files the server "
                                  "manages (it deletes the copies no task uses): keep the adapter elsewhere")
        check_scheduler(self)
        if self.http is not None:
            self.http.validate(self.allow_public_bind)
            try:  # a body the front accepts must fit the frame it becomes
                self.http.fit_to_frames(self.limits.max_frame_bytes)
            except ValueError as error:
                raise ConfigError(str(error)) from None
            try:  # the prompts of one request must fit what the server admits from the front
                self.http.fit_to_pending_requests(self.limits.max_pending_requests)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.metrics is not None:
            check_listen_address("metrics", self.metrics.host, self.metrics.port, self.allow_public_bind)
        check_port_clashes(self)
        from inlaid.serve.memory_budget import check_executor_memory, memory_known_without_torch

        check_executor_memory(self, memory_known_without_torch)

    def tuning_lengths_file(self) -> str:
        """The recorded requests the scheduler tuning draws its workloads from: the configured
        file, else the packaged lengths of the base this server serves (a quantized checkpoint's
        answers, and so their lengths, differ from the full-precision model's)."""
        from inlaid.scheduling.suite import lengths_file_for

        return self.autotune_lengths or str(lengths_file_for(self.engine.quantized_dir))


_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def base_model_id(model_dir: str) -> str:
    """The base model's name as clients see it (hello, `/v1/models`): its directory's name."""
    return os.path.basename(os.path.normpath(model_dir))


def check_task_name(name: str, model_dir: str | None = None) -> None:
    """Refuse (ConfigError) a name no task may have; with `model_dir`, also the base model's
    id, which a task would shadow (the SDK reached the adapter, HTTP the base, by one name)."""
    # ASCII only (look-alike names are not two tasks), and no leading '-' (a command line
    # would read it as an option) or '.' ('.', '..': path components).
    if not _TASK_NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"
        raise ConfigError(f"task name {shown}: use 1-128 ASCII letters, digits, '-', '_' or '.', "
                          "starting with a letter, a digit or '_'")
    if name.startswith("__") and name.endswith("__"):
        # The metrics label the base model and unknown tasks `__base__` and `__unknown__`.
        raise ConfigError(f"task name {name!r}: names of the form '__name__' are reserved")
    if model_dir is not None and name == base_model_id(model_dir):
        raise ConfigError(f"task name {name!r} is the base model's id; choose another name")


_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)} - {"model_dir", "quantized_dir"}
_LIMIT_FIELDS = {f.name for f in fields(ServerLimits)}
_SERVER_KEYS = _LIMIT_FIELDS | {
    "address",
    "executor_address",
    "admin_token",
    "admin_token_env",
    "admin_token_file",
    "log_level",
    "log_format",
    "allow_public_bind",
    "policy",
    "state_dir",
    "task_histograms",
}
_REQUANTIZER_FIELDS = {f.name: f for f in fields(RequantizerSettings)}


def load_config(path: str | Path, *, admin_token: bool = True) -> ServerConfig:
    """admin_token False: read without it (`without_admin_token`)."""
    raw, base_dir = read_toml(path)
    return config_from_dict(raw if admin_token else without_admin_token(raw), base_dir=base_dir)


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> ServerConfig:
    base_dir = base_dir or Path.cwd()
    unknown_sections = set(raw) - {"model", "executor", "executors", "server", "tasks", "scheduler", "http", "metrics",
                                   "requantizer"}
    if unknown_sections:
        raise ConfigError(f"unknown config sections: {sorted(unknown_sections)}")
    model = section(raw, "model")
    executor = section(raw, "executor")
    server = section(raw, "server")
    tasks = section(raw, "tasks")
    scheduler = section(raw, "scheduler")
    for key in ("predictor_state", "step_log"):
        if key in scheduler:  # "" is refused by name, not taken silently for "none": omit the key for that
            scheduler[key] = resolve_path(scheduler[key], base_dir, f"scheduler.{key}")
    autotune = scheduler.pop("autotune_cost_model", None)
    autotune_lengths = scheduler.pop("autotune_lengths", None)
    requantizer = section(raw, "requantizer")
    reject_unknown("model", model, {"dir", "quantized_dir"})
    reject_unknown("requantizer", requantizer, set(_REQUANTIZER_FIELDS))
    for key, value in requantizer.items():
        kind = type(_REQUANTIZER_FIELDS[key].default)
        accepted = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
            raise ConfigError(f"requantizer.{key} must be {type_words(kind)}, got {value!r}")
    reject_unknown("executor", executor, _ENGINE_FIELDS)
    reject_unknown("server", server, _SERVER_KEYS)
    executors = section(raw, "executors")
    reject_unknown("executors", executors, {f.name for f in fields(ExecutorsConfig)})
    http = section(raw, "http") if "http" in raw else None
    metrics = section(raw, "metrics") if "metrics" in raw else None
    if http is not None:
        reject_unknown("http", http, {f.name for f in fields(HttpConfig)})
    if metrics is not None:
        reject_unknown("metrics", metrics, {f.name for f in fields(MetricsConfig)})
        if "port" not in metrics:
            raise ConfigError("[metrics] needs a port")

    if "dir" not in model:
        from inlaid.models.prepare import default_model_dir

        model_dir = str(default_model_dir())
    else:
        model_dir = resolve_path(model["dir"], base_dir, "model.dir")
    quantized = model.get("quantized_dir")
    try:
        engine = EngineConfig(
            model_dir=model_dir,
            quantized_dir=resolve_path(quantized, base_dir, "model.quantized_dir") if quantized is not None else None,
            **executor,
        )
    except TypeError as error:
        raise ConfigError(f"[executor]: {error}") from error

    limit_values = {k: v for k, v in server.items() if k in _LIMIT_FIELDS}
    for key, value in limit_values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"server.{key} must be a number, got {value!r}")
    limits = ServerLimits(**limit_values)
    config = ServerConfig(
        engine=engine,
        address=typed_value(server, "server", "address", ServerConfig.address, str),
        executor_address=typed_value(server, "server", "executor_address", "auto", str),
        tasks={str(name): resolve_path(adapter, base_dir, f"tasks.{name}") for name, adapter in tasks.items()},
        admin_token=admin_token_from(server, base_dir),
        limits=limits,
        log_level=typed_value(server, "server", "log_level", "INFO", str).upper(),
        log_format=typed_value(server, "server", "log_format", "json", str),
        allow_public_bind=typed_value(server, "server", "allow_public_bind", False, bool),
        policy=typed_value(server, "server", "policy", "fifo", str),
        scheduler=scheduler,
        autotune_cost_model=(resolve_path(autotune, base_dir, "scheduler.autotune_cost_model")
                             if autotune is not None else None),
        autotune_lengths=(resolve_path(autotune_lengths, base_dir, "scheduler.autotune_lengths")
                          if autotune_lengths is not None else None),
        http=HttpConfig(**http) if http is not None else None,
        metrics=MetricsConfig(**metrics) if metrics is not None else None,
        task_histograms=typed_value(server, "server", "task_histograms", True, bool),
        executors=ExecutorsConfig(**executors),
        state_dir=resolve_path(server["state_dir"], base_dir, "server.state_dir") if "state_dir" in server else None,
        requantizer=RequantizerSettings(**requantizer),
        requantizer_section="requantizer" in raw,
    )
    try:
        config.validate()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return config
