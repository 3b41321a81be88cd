"""The Ray deployment's configuration: a server TOML (docs/serving.md) plus a `[ray]` table.

```toml
[ray]
num_replicas = 2              # or "auto" with a [ray.autoscaling] table
max_tasks_per_replica = 4     # adapters a replica keeps loaded; past it Ray evicts the LRU one
num_cpus = 1                  # Ray resources of each replica (num_gpus = 1: one GPU each)
num_gpus = 0
http_host = "127.0.0.1"       # Ray Serve's HTTP proxy
http_port = 8000

[ray.autoscaling]             # Ray Serve's autoscaling_config, passed through unchanged
min_replicas = 1
max_replicas = 4
target_ongoing_requests = 16

[model] / [executor] / [executors] / [server] / [scheduler]   # each replica's Inlaid server, as for `inlaid serve`
[tasks]                           # the catalog: every replica loads these on demand
[http]                            # the ingress front's request_timeout_s / max_body_bytes
```

Torch-free and ray-free: the file is checked before anything starts. `load_ray_config` (the
deploy command's) also checks every catalog adapter in full, as a server's AddTask does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from inlaid.http.settings import HttpConfig, check_listen_address
from inlaid.cli_args import model_dir_problem
from inlaid.engine.adapter_config import AdapterError
from inlaid.engine.adapter_weights import check_servable_adapter
from inlaid.engine.config import ModelConfig, check_range
from inlaid.serve.config import ConfigError, config_from_dict, read_toml
from inlaid.serve.config_parsing import check_quantized_dir


@dataclass
class RayDeploymentConfig:
    server: dict[str, dict[str, Any]]  # the replicas' [model], [executor], [executors], [server], [scheduler] (paths resolved)
    tasks: dict[str, str]  # task name -> adapter directory, the same path on every node
    http: dict[str, Any] = field(default_factory=dict)  # HttpConfig fields for the ingress front
    num_replicas: int | str = 2
    autoscaling: dict[str, Any] | None = None
    max_tasks_per_replica: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ingress_num_cpus: float = 0.1
    ingress_replicas: int = 1
    max_ongoing_requests: int = 64
    health_check_period_s: float = 10.0
    replica_start_timeout_s: float = 600.0
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    app_name: str = "inlaid"
    route_prefix: str = "/"

    def replica_actor_options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def scaling_options(self) -> dict[str, Any]:
        if self.autoscaling is not None:
            return {"num_replicas": "auto", "autoscaling_config": dict(self.autoscaling)}
        return {"num_replicas": self.num_replicas}

    def max_replicas(self) -> int:
        if self.autoscaling is not None:
            return int(self.autoscaling.get("max_replicas", 1))
        return int(self.num_replicas)


_RAY_KEYS = {f.name for f in fields(RayDeploymentConfig)} - {"server", "tasks", "http"}


def load_ray_config(path: str | Path) -> RayDeploymentConfig:
    """The deploy command's config, its catalog's adapters checked in full."""
    raw, base_dir = read_toml(path)
    config = ray_config_from_dict(raw, base_dir=base_dir)
    check_catalog_adapters(config)
    return config


def check_catalog_adapters(config: RayDeploymentConfig) -> None:
    """Every catalog task's adapter, checked here as a replica's server checks it when a
    request first names it (`check_servable_adapter`: its config, rank <= max_lora_rank, every
    weight): else a bad one deploys fine and every request for it gets 400. A node whose copy
    differs is still caught by its replica (the same check, at load)."""
    server = config.server
    engine = config_from_dict({**server, "server": {**server["server"], "address": "ipc:///tmp/inlaid-check.ipc"}}
                              ).engine  # fmt: skip
    model = ModelConfig.from_dir(engine.model_dir)
    for name, adapter_dir in sorted(config.tasks.items()):
        try:
            check_servable_adapter(name, adapter_dir, model, engine.max_lora_rank)
        except AdapterError as error:
            raise ConfigError(f"[tasks] {name}: {error}") from None


def ray_config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> RayDeploymentConfig:
    raw = dict(raw)
    ray = dict(raw.pop("ray", {}))
    http = dict(raw.pop("http", {}))
    _refuse_per_server_settings(raw)
    unknown = set(ray) - _RAY_KEYS
    if unknown:
        raise ConfigError(f"[ray]: unknown keys {sorted(unknown)}; allowed: {sorted(_RAY_KEYS)}")
    # The replicas' server config, checked as `inlaid serve` would; each replica sets its own
    # address and admin token (it is its server's only admin).
    server_table = {k: v for k, v in raw.get("server", {}).items()
                    if k not in ("address", "admin_token", "admin_token_env", "admin_token_file")}
    checked = config_from_dict({**raw, "server": {**server_table, "address": "ipc:///tmp/inlaid-check.ipc"}},
                               base_dir=base_dir)
    _check_cuda_devices(checked.executor_devices(), ray.get("num_gpus", 0.0))
    missing = {name: p for name, p in checked.tasks.items() if not Path(p).is_dir()}
    if missing:
        raise ConfigError(f"[tasks]: adapter directories not found here: {missing} (every node needs the same paths)")
    # `inlaid serve` finds a missing model only when it loads it; here that would be each
    # replica's start failing (Ray retries them), so check it before any cluster work.
    problem = model_dir_problem(Path(checked.engine.model_dir))
    if problem:
        raise ConfigError(f"model.dir: {problem} (every node needs the same path)")
    if checked.engine.quantized_dir:
        check_quantized_dir(checked.engine.quantized_dir)
    server = {"model": {"dir": checked.engine.model_dir}, "executor": dict(raw.get("executor", {})),
              "executors": dict(raw.get("executors", {})), "server": server_table,
              "scheduler": _replica_scheduler(checked)}
    if checked.engine.quantized_dir:
        server["model"]["quantized_dir"] = checked.engine.quantized_dir
    autoscaling = ray.pop("autoscaling", None)
    config = RayDeploymentConfig(server=server, tasks=checked.tasks, http=http, autoscaling=autoscaling, **ray)
    _validate(config)
    return config


def _check_cuda_devices(devices: list[str], num_gpus: Any) -> None:
    """A replica sees only the GPUs Ray gives it (CUDA_VISIBLE_DEVICES: `num_gpus` of them,
    numbered from 0): a CUDA executor on a replica given none, or on a GPU number past those,
    cannot start, and Ray would retry every replica before the deploy fails. (Whether the
    cluster has the GPUs is Ray's to say when it places the replicas.)"""
    wanted = [device for device in devices if device.startswith("cuda")]
    number = isinstance(num_gpus, (int, float)) and not isinstance(num_gpus, bool)
    if not wanted or not number or not 0 <= num_gpus < math.inf:
        return  # no GPU wanted, or num_gpus itself is refused by _validate
    if num_gpus == 0:
        raise ConfigError(f"executor device {wanted[0]!r} needs a GPU, but each replica gets none (ray.num_gpus = 0): "
                          f"set [ray] num_gpus, or device = \"cpu\"")
    visible = max(1, math.ceil(num_gpus))
    for device in wanted:
        if int(device.partition(":")[2] or 0) >= visible:
            gpus = f"{visible} GPU{'' if visible == 1 else 's'}"
            raise ConfigError(f"executor device {device!r}: each replica sees {gpus} (ray.num_gpus = {num_gpus}), "
                              f"numbered from cuda:0")


def _refuse_per_server_settings(raw: dict[str, Any]) -> None:
    """What one server owns and every replica would share (the replicas of a node write
    beside each other), or what a replica never uses: refused, never silently dropped."""
    if "metrics" in raw:
        raise ConfigError("[metrics] is per server; in a Ray deployment use Ray's metrics (docs/scale-out.md)")
    if "requantizer" in raw:
        raise ConfigError("[requantizer]: a Ray replica adds its tasks without calibration (they come from [tasks]), "
                          "so it never re-quantizes; remove the section")
    if "state_dir" in raw.get("server", {}):
        raise ConfigError("server.state_dir is one server's own registry; the replicas would share it: remove it "
                          "(a Ray deployment's tasks come from [tasks])")
    if "step_log" in raw.get("scheduler", {}):
        raise ConfigError("scheduler.step_log is one server's log; the replicas would append to the same file: "
                          "remove it (run `inlaid serve` alone to record steps)")


def _replica_scheduler(checked: Any) -> dict[str, Any]:
    """The replicas' [scheduler] table with its files as absolute paths (a replica's
    config lives in its own temporary folder). A predictor state is loaded by every replica
    and saved by each, atomically: the last save wins."""
    table = dict(checked.scheduler)
    if checked.autotune_cost_model is not None:
        table["autotune_cost_model"] = checked.autotune_cost_model
    if checked.autotune_lengths is not None:
        table["autotune_lengths"] = checked.autotune_lengths
    return table


def _validate(config: RayDeploymentConfig) -> None:
    try:
        HttpConfig(**config.http).validate(allow_public_bind=True)  # the proxy binds, not the front
    except TypeError as error:
        raise ConfigError(f"[http]: {error}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.autoscaling is not None and not isinstance(config.autoscaling, dict):
        raise ConfigError("[ray.autoscaling] must be a table")
    # Ray checks these numbers only after connecting, with a pydantic traceback: check them first.
    try:
        if config.autoscaling is None:
            check_range("ray.num_replicas", config.num_replicas, 1, integer=True,
                        what="an integer, or use [ray.autoscaling]")
        for name in ("max_tasks_per_replica", "ingress_replicas", "max_ongoing_requests"):
            check_range(f"ray.{name}", getattr(config, name), 1, integer=True)
        for name in ("num_cpus", "num_gpus", "ingress_num_cpus"):
            check_range(f"ray.{name}", getattr(config, name), 0)
        for name in ("health_check_period_s", "replica_start_timeout_s"):
            check_range(f"ray.{name}", getattr(config, name), 0, low_open=True)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for name in ("app_name", "route_prefix"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ConfigError(f"ray.{name} must be a non-empty string, got {getattr(config, name)!r}")
    if not config.route_prefix.startswith("/"):
        raise ConfigError(f"ray.route_prefix must start with '/', got {config.route_prefix!r}")
    try:
        check_listen_address("ray.http", config.http_host, config.http_port,
                             bool(config.server["server"].get("allow_public_bind", False)))
    except ValueError as error:
        raise ConfigError(str(error)) from None
