"""`inlaid serve --config FILE`: run the coordinator (which starts its executor), and the
HTTP front and the metrics port when the config asks for them."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inlaid.serve.config import ServerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="server TOML file (see docs/serving.md)")
    parser.add_argument("--log-level", default=None, help="override server.log_level (DEBUG, INFO, ...)")
    parser.add_argument("--log-format", choices=["json", "text"], default=None, help="override server.log_format")


def run(args: argparse.Namespace) -> int:
    from inlaid.cli_args import model_dir_problem
    from inlaid.models.prepare import default_model_dir
    from inlaid.serve.config import ConfigError, load_config
    from inlaid.serve.config_parsing import check_log_level, check_quantized_dir
    from inlaid.serve.logs import setup_logging

    try:
        config = load_config(args.config)
        # Here, not as the config is read: configs are also built (tests, the requantization
        # checks) naming checkpoints nothing loads.
        # before three executors fail on it; the weights only where they are served
        if problem := model_dir_problem(Path(config.engine.model_dir), weights=config.engine.quantized_dir is None):
            default = Path(config.engine.model_dir) == default_model_dir()
            raise ConfigError(f"the default model (no model.dir): {problem}; `inlaid models prepare` makes it"
                              if default else f"model.dir: {problem}")
        if config.engine.quantized_dir is not None:
            check_quantized_dir(config.engine.quantized_dir)
        if args.log_level is not None:  # "" too: refused below, not ignored
            config.log_level = args.log_level.upper()
            check_log_level("--log-level", config.log_level)
    except ConfigError as error:
        print(f"inlaid serve: {error}", file=sys.stderr)
        return 2
    _forget_token_variable(args.config)
    if args.log_format:
        config.log_format = args.log_format
    setup_logging(config.log_level, config.log_format)
    for setting, why in ignored_settings(config):
        logging.getLogger("inlaid.coordinator").warning("a setting of the config has no effect",
                                                        extra={"setting": setting, "why": why})
    oversubscribed = cpu_oversubscription(config, usable_cores())
    if oversubscribed is not None:
        logging.getLogger("inlaid.coordinator").warning("more CPU threads than cores", extra={"why": oversubscribed})
    created = _first_missing(Path(config.state_dir)) if config.state_dir is not None else None
    code = _start(config)
    if code == 2 and created is not None:  # it never served: what this start made is nobody's state
        # (a registry.json naming its base refused the next start, on another base, the config corrected)
        shutil.rmtree(created, ignore_errors=True)
    return code


def _forget_token_variable(config_path: str) -> None:
    """Drop `server.admin_token_env`'s variable from this process's environment once the
    token is read: every process the server starts (executors, the HTTP front, the
    requantizer) inherited it, where `/proc/<pid>/environ` shows it, and none needs it (an
    outside probe; the front passes on each caller's own token)."""
    from inlaid.serve.config_parsing import read_toml

    server = read_toml(config_path)[0].get("server")
    name = server.get("admin_token_env") if isinstance(server, dict) else None
    if isinstance(name, str):
        os.environ.pop(name, None)


def _first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet, or None."""
    from inlaid.cli_args import nearest_existing

    chain = (path, *path.parents)
    existing = nearest_existing(path)
    return chain[chain.index(existing) - 1] if existing != path and existing in chain else None


def _start(config) -> int:  # type: ignore[no-untyped-def]
    """Lock the state directory, make the policies, serve; 2 where the server could not start."""
    if config.state_dir is not None:
        from inlaid.serve.state_dir_lock import StateDirError, lock_state_dir

        try:
            # Before anything starts (the executors, the start-up tuning that caches into the
            # directory): a second server on a running one's state directory is one line. The
            # coordinator's TaskStore then finds the directory locked by this process.
            lock_state_dir(config.state_dir)
        except StateDirError as error:
            print(f"inlaid serve: {error}", file=sys.stderr)
            return 2
    try:
        # Made here, before anything starts: a plug-in policy that cannot be imported or made
        # (server.policy = "package.module:factory") is the config's error, said as one
        # "inlaid serve: ..." line with exit 2 like the others, not a CRITICAL log line after
        # the CUDA probe.
        policies = _policies(config)
    except ValueError as error:  # ConfigError, or a policy's own refusal of its options or state
        print(f"inlaid serve: {error}", file=sys.stderr)
        return 2
    return serve(config, policies)


def ignored_settings(config) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Settings the config sets that this server never uses, and why (accepted: a config
    may be shared by servers that differ in that; but never silently)."""
    from inlaid.serve.config_sections import RequantizerSettings

    ignored = []
    if config.engine.quant_kernel != "auto" and config.engine.quantized_dir is None:
        ignored.append(("executor.quant_kernel", "it chooses the kernel of a quantized base; model.quantized_dir "
                                                 "is not set, so the model is served as it is"))
    if config.requantizer_section or config.requantizer != RequantizerSettings():
        if config.state_dir is None:
            ignored.append(("[requantizer]", "it re-quantizes the base for tasks added live, which needs "
                                             "server.state_dir: nothing is re-quantized without it"))
        elif config.engine.quantized_dir is None:
            ignored.append(("[requantizer]", "the base is not quantized (no model.quantized_dir): there is "
                                             "nothing to re-quantize"))
    if config.engine.max_model_len is not None and (served := _served_length(config.engine)) is not None \
            and served < config.engine.max_model_len:
        ignored.append(("executor.max_model_len",
                        f"sequences end at {served} tokens: the model's own length (max_position_embeddings, a "
                        f"sliding window) and the KV cache (num_kv_blocks x block_size = "
                        f"{config.engine.num_kv_blocks * config.engine.block_size}) cap the "
                        f"{config.engine.max_model_len} asked for"))
    return ignored


def _served_length(engine) -> int | None:  # type: ignore[no-untyped-def]
    """The context length the engine will serve (EngineConfig.context_length), or None where
    the model's config.json cannot be read here (the executor's load reports that)."""
    from inlaid.engine.config import ModelConfig

    try:
        return engine.context_length(ModelConfig.from_dir(engine.quantized_dir or engine.model_dir))
    except Exception:  # noqa: BLE001 - any problem of the model directory is the load's to name
        return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_oversubscription(config: ServerConfig, cores: int) -> str | None:
    """Why the CPU executors' threads exceed `cores`, or None. Accepted (a user may mean
    it), but not silently: two CPU executors on a 2-core machine each ran torch's default
    of a thread per core, and nothing said why each step took twice as long (an outside probe).
    The requantizer's threads are not counted: it runs at idle priority (docs/dynamic-tasks.md)."""
    executors = sum(device.startswith("cpu") for device in config.executor_devices())
    threads = config.engine.threads
    fewer = f"; lower executors.count to at most {cores}" if executors > cores else ""
    if threads is None:  # torch's default: one thread per core, in every executor
        if executors < 2:
            return None
        return (f"{executors} CPU executors each use all {cores} cores (executor.threads is not set): set "
                f"executor.threads to {max(1, cores // executors)}{fewer}")
    if executors * threads <= cores:
        return None
    return (f"{executors} CPU executor{'s' if executors > 1 else ''} x executor.threads {threads} = "
            f"{executors * threads} threads on {cores} cores contend for them: lower executor.threads to "
            f"{max(1, cores // max(executors, 1))}{fewer}")


def _policies(config, options: dict | None = None):  # type: ignore[no-untyped-def]
    """A policy for each executor's engine, with `options` (default: the configured
    [scheduler] options, `ServerConfig.policy_options`). The first is made at once (a bad policy fails the start with its
    reason); the others share its length model, so that predictions learn from every
    executor's finished requests and one state file is saved."""
    from inlaid.scheduling.registry import POLICY_NAMES, make_policy
    from inlaid.serve.scheduler_config import load_policy, predictor_tokenizer

    options = config.policy_options() if options is None else options
    tokenizer = predictor_tokenizer(config.engine.model_dir) if config.policy == "inlaid" else None
    made = [load_policy(config.policy, options, tokenizer=tokenizer)]
    shared = getattr(made[0], "length_model", None)

    def factory():  # type: ignore[no-untyped-def]
        if made:
            return made.pop()
        if shared is not None and config.policy in POLICY_NAMES:
            return make_policy(config.policy, options, length_model=shared)
        return load_policy(config.policy, options, announce=False, tokenizer=tokenizer)  # (the first one's log)

    return factory


def _tuned_policies(config):  # type: ignore[no-untyped-def]
    """The policy factory with the start-up tuning's options (run in a thread while the
    executors load their model; the coordinator swaps it in before serving)."""
    return _policies(config, _autotuned_options(config))


def _autotuned_options(config) -> dict:  # type: ignore[no-untyped-def]
    """The start-up tuning's [scheduler] options (`tuned_options_for` the configured tasks);
    if it fails, the configured options."""
    try:
        return tuned_options_for(config, len(config.tasks))
    except Exception as error:  # noqa: BLE001  (tuning is an optimisation: the server starts without it)
        logging.getLogger("inlaid.coordinator").error("scheduler tuning failed; starting with the configured options",
                                                      extra={"error": f"{type(error).__name__}: {error}"})
        return config.policy_options()


def tuned_options_for(config, num_tasks: int, progress=None) -> dict:  # type: ignore[no-untyped-def]
    """[scheduler] options chosen on the configured cost model for `num_tasks` tasks
    (inlaid/scheduling/autotune.py); cached in server.state_dir, so a restart or a return to
    a count tuned before does not simulate again. At start-up and on live task changes
    (inlaid/serve/retuning.py)."""
    from inlaid.scheduling.autotune import tuned_options
    from inlaid.scheduling.simulator import EngineShape

    log = logging.getLogger("inlaid.coordinator")
    options, _ = tuned_options(config.autotune_cost_model, EngineShape.of(config.planning_engine()), max(1, num_tasks),
                               config.scheduler, cache_dir=config.state_dir, log=log.info, progress=progress,
                               lengths_file=config.tuning_lengths_file())
    log.info("scheduler options", extra={"options": options, "tasks": num_tasks})
    return options


_CUDA_PROBE = ("import torch; n = torch.cuda.device_count(); "
               "print(n, torch.__version__, *(torch.cuda.get_device_properties(i).total_memory for i in range(n)))")


def unavailable_cuda_device(config) -> str | None:  # type: ignore[no-untyped-def]
    """Why a configured CUDA device ([executor] device, [executors] devices) cannot be used on
    this machine, or None: it is missing, or its memory cannot hold the KV caches and LoRA
    slot pools of the executors on it. torch answers in a child process: the coordinator
    stays torch-free. (The config has checked the device names.)"""
    import subprocess

    from inlaid.serve.config import ConfigError
    from inlaid.serve.memory_budget import check_executor_memory

    wanted = [device for device in config.executor_devices() if device.startswith("cuda")]
    if not wanted:
        return None
    probe = subprocess.run([sys.executable, "-c", _CUDA_PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"cannot ask torch which CUDA devices this machine has: {last}"
    count_text, version, *memory = probe.stdout.split()
    count = int(count_text)
    # which key names the device: [executors] devices where the config lists them
    key = "executors.devices" if config.executors.devices else "executor.device"
    for device in wanted:
        if int(device.partition(":")[2] or 0) >= count:
            return (f"{key} {device!r}: this machine has {count} CUDA device{'' if count == 1 else 's'} "
                    f"(torch {version})")
    try:
        check_executor_memory(config, lambda pool: int(memory[int(pool.partition(":")[2])])
                              if pool.startswith("cuda") else None)  # the host's: checked with the config
    except ConfigError as error:
        return str(error)
    return None


def _cannot_start(reason: str) -> int:
    """A refusal found as the server starts (the model, a task's adapter, the device): logged
    for the log's readers, and one `inlaid serve: ...` line as the config's refusals are (a
    JSON record alone read as a crash to whoever started it by hand). Exit code 2."""
    logging.getLogger("inlaid.coordinator").critical("cannot start", extra={"error": reason})
    print(f"inlaid serve: {reason}", file=sys.stderr)
    return 2


def serve(config, policies=None) -> int:  # type: ignore[no-untyped-def]
    """Run a server until SIGTERM/SIGINT; returns the process exit code. `policies`: the
    policy factory `run` made (default: made here)."""
    from inlaid.engine.config import ModelLoadError
    from inlaid.serve.coordinator import Coordinator

    log = logging.getLogger("inlaid.coordinator")

    async def main() -> int:
        # Simulating the tuning's candidates takes ~25 s: done while the executors load the model.
        tune = functools.partial(_tuned_policies, config) if config.autotune_cost_model is not None else None
        retune = functools.partial(tuned_options_for, config) if config.autotune_cost_model is not None else None
        missing = unavailable_cuda_device(config)  # else three executor tracebacks, then "exit code 1"
        if missing is not None:
            return _cannot_start(missing)
        try:
            coordinator = Coordinator(config, policy_factory=policies or _policies(config), tune_policies=tune,
                                      retune_options=retune)
        except (ModelLoadError, ValueError) as error:
            return _cannot_start(str(error))
        metrics_server = front = None

        def close_metrics_port() -> None:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

        try:
            # Bound before serving, so that a port in use fails the start with its reason.
            if config.metrics is not None:
                from inlaid.serve.metrics_server import start_metrics_server

                metrics_server = start_metrics_server(config.metrics.port, config.metrics.host,
                                                      coordinator.metrics.registry)
            if config.http is not None:
                from inlaid.http.process import HttpFrontProcess

                from inlaid.addresses import local_address

                front = HttpFrontProcess(local_address(config.address), config.http, config.log_level,
                                         config.log_format, server_stopping=coordinator.shutdown_begun)
                front.bind()
        except OSError as error:
            ports = {"metrics": config.metrics and f"{config.metrics.host}:{config.metrics.port}",
                     "http": config.http and f"{config.http.host}:{config.http.port}"}
            log.critical("cannot listen", extra={"error": str(error), **{k: v for k, v in ports.items() if v}})
            print(f"inlaid serve: cannot listen on {' or '.join(f'[{k}] {v}' for k, v in ports.items() if v)}: "
                  f"{error.strerror or error}", file=sys.stderr)
            close_metrics_port()
            return 2
        if front is not None:
            front.start()
        try:
            code = await coordinator.run()
            if coordinator.start_error is not None:  # besides its log record: one line, as every refusal
                print(f"inlaid serve: {coordinator.start_error}", file=sys.stderr)
            return code
        finally:  # after the drain: the front's in-flight responses have their answers
            if front is not None:
                await front.stop()
            close_metrics_port()

    try:
        import uvloop
    except ImportError:  # uvloop is optional (the `serve` extra); asyncio works, slower
        return asyncio.run(main())
    return uvloop.run(main())
