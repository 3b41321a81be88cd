"""The Ray deployment's configuration: a server TOML (docs/serving.md) plus a `[ray]` table.

```toml
[ray]
num_replicas = 2              # or "auto" with a [ray.autoscaling] table
max_tasks_per_replica = 4     # adapters a replica keeps loaded; past it Ray evicts the LRU one
num_cpus = 1                  # Ray resources of each replica (num_gpus = 1: one GPU each)
num_gpus = 0
http_host = "127.0.0.1"       # Ray Serve's HTTP proxy
http_port = 8000

[ray.autoscaling]             # Ray Serve's autoscaling_config, checked here, then passed through
min_replicas = 1
max_replicas = 4
target_ongoing_requests = 16

[model] / [executor] / [executors] / [server] / [scheduler]   # each replica's Inlaid server, as for `inlaid serve`
[tasks]                           # the catalog: every replica loads these on demand
[http]                            # the ingress front's request_timeout_s / max_body_bytes (no host/port:
                                  # Ray Serve's proxy listens, on [ray] http_host / http_port)
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
from inlaid.serve.config_parsing import check_quantized_dir, reject_unknown, section

# Ray Serve 2.60's AutoscalingConfig fields (ray.serve.config; importing it costs ~2 s and this
# module stays ray-free), each as (lowest value, lowest excluded, integer). Ray checks them
# only when the app is built, after connecting, and says so with a pydantic traceback.
_AUTOSCALING_NUMBERS: dict[str, tuple[float, bool, bool]] = {
    "min_replicas": (0, False, True), "initial_replicas": (0, False, True), "max_replicas": (1, False, True),
    **{name: (0, True, False) for name in (
        "target_ongoing_requests", "metrics_interval_s", "look_back_period_s", "smoothing_factor",
        "upscale_smoothing_factor", "downscale_smoothing_factor", "upscaling_factor", "downscaling_factor")},
    **{name: (0, False, False) for name in ("downscale_delay_s", "downscale_to_zero_delay_s", "upscale_delay_s")},
}  # fmt: skip
_AUTOSCALING_AGGREGATIONS = ("mean", "max", "min")
AUTOSCALING_KEYS = set(_AUTOSCALING_NUMBERS) | {"aggregation_function", "policy"}  # policy: Ray's own table
# What each replica sets for its own server (its private socket; it is the server's only admin).
_REPLICA_OWN_SERVER_KEYS = ("address", "admin_token", "admin_token_env", "admin_token_file")


@dataclass
class RayDeploymentConfig:
    # The replicas' [model], [executor], [executors], [server], [scheduler] (paths resolved).
    server: dict[str, dict[str, Any]]
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
    # One line each for the deploy command to print: settings accepted but not used as written.
    warnings: list[str] = field(default_factory=list)

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


_RAY_KEYS = {f.name for f in fields(RayDeploymentConfig)} - {"server", "tasks", "http", "warnings"}


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
    ray, http = section(raw, "ray"), section(raw, "http")
    raw.pop("ray", None), raw.pop("http", None)
    _refuse_per_server_settings(raw)
    _check_http_table(http)
    unknown = set(ray) - _RAY_KEYS
    if unknown:
        raise ConfigError(f"[ray]: unknown keys {sorted(unknown)}; allowed: {sorted(_RAY_KEYS)}")
    # The replicas' server config, checked as `inlaid serve` would; each replica sets its own
    # address and admin token (it is its server's only admin), so those are dropped, with a word.
    server_raw = raw.get("server", {})
    if not isinstance(server_raw, dict):
        raise ConfigError("[server] must be a table")
    server_table = {k: v for k, v in server_raw.items() if k not in _REPLICA_OWN_SERVER_KEYS}
    dropped = [key for key in _REPLICA_OWN_SERVER_KEYS if key in server_raw]
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
    if autoscaling is not None and ray.get("num_replicas", "auto") != "auto":
        # Ray Serve refuses the pair too, but only after connecting; dropping it quietly would
        # deploy another count than the file states.
        raise ConfigError(f"ray.num_replicas = {ray['num_replicas']!r} with [ray.autoscaling]: the autoscaler sets "
                          f"the count; remove num_replicas (or set it to \"auto\") and start the count with "
                          f"[ray.autoscaling] initial_replicas")
    config = RayDeploymentConfig(server=server, tasks=checked.tasks, http=http, autoscaling=autoscaling, **ray)
    _validate(config)
    if dropped:
        config.warnings.append(f"[server] {', '.join(dropped)} ignored: each replica's server listens on a private "
                               f"socket of its own and has the replica as its only admin")
    return config


def _check_http_table(http: dict[str, Any]) -> None:
    """[http] configures the ingress front, which Ray Serve's proxy serves: a host or port
    there would be silently unused, so it is refused pointing at [ray]'s own."""
    listener = [key for key in ("host", "port") if key in http]
    if listener:
        raise ConfigError(f"[http] {', '.join(listener)}: Ray Serve's proxy is the listener in a Ray deployment; "
                          f"set [ray] http_host / http_port instead")
    if "front_liveness_s" in http:  # `inlaid serve`'s watch of its own front process: no such process here
        raise ConfigError("[http] front_liveness_s: Ray Serve runs the ingress (its health_check_period_s in [ray] "
                          "watches replicas); the key is `inlaid serve`'s, for the front process it starts")
    reject_unknown("http", http, {f.name for f in fields(HttpConfig)} - {"host", "port"})


def check_autoscaling(table: Any) -> None:
    """[ray.autoscaling] as Ray Serve's AutoscalingConfig checks it (its keys, their ranges,
    min_replicas <= initial_replicas <= max_replicas with Ray's defaults of 1), in one line."""
    if not isinstance(table, dict):
        raise ConfigError("[ray.autoscaling] must be a table")
    reject_unknown("ray.autoscaling", table, AUTOSCALING_KEYS)
    try:
        for name, (low, low_open, integer) in _AUTOSCALING_NUMBERS.items():
            if name in table:
                check_range(f"ray.autoscaling.{name}", table[name], low, integer=integer, low_open=low_open)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    aggregation = table.get("aggregation_function", "mean")
    if aggregation not in _AUTOSCALING_AGGREGATIONS:
        raise ConfigError(f"ray.autoscaling.aggregation_function must be one of {list(_AUTOSCALING_AGGREGATIONS)}, "
                          f"got {aggregation!r}")
    if not isinstance(table.get("policy", {}), dict):
        raise ConfigError("ray.autoscaling.policy must be a table (Ray Serve's AutoscalingPolicy)")
    low, high = table.get("min_replicas", 1), table.get("max_replicas", 1)
    if low > high:
        default = "" if "max_replicas" in table else ", Ray's default"
        raise ConfigError(f"ray.autoscaling: min_replicas ({low}) must be <= max_replicas ({high}{default})")
    initial = table.get("initial_replicas")
    if initial is not None and not low <= initial <= high:
        raise ConfigError(f"ray.autoscaling.initial_replicas ({initial}) must be from min_replicas ({low}) "
                          f"to max_replicas ({high})")


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
        HttpConfig(**config.http).validate(allow_public_bind=True)  # keys checked by _check_http_table
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.autoscaling is not None:
        check_autoscaling(config.autoscaling)
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
    prefix = config.route_prefix
    if not prefix.startswith("/") or (prefix != "/" and prefix.endswith("/")) or "{" in prefix or "}" in prefix:
        # Ray Serve's own rule: refused there with a traceback after connecting (an outside probe)
        raise ConfigError(f"ray.route_prefix must start with '/', not end with one (unless it is '/') and hold no "
                          f"'{{' or '}}', got {prefix!r}")
    try:
        check_listen_address("ray.http", config.http_host, config.http_port,
                             bool(config.server["server"].get("allow_public_bind", False)), key_joint="_")
    except ValueError as error:
        raise ConfigError(str(error)) from None
