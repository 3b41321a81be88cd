"""Reading a server config file: TOML, sections, paths, the admin token, and the checks of
single values (addresses, log level, directories). Torch-free; `inlaid.serve.config`
builds the ServerConfig from these."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inlaid.addresses import address_problem
from inlaid.cli_args import home_problem, writable_dir_problem
from inlaid.http.settings import LOOPBACK_HOSTS
from inlaid.protocol.client import MAX_ADMIN_TOKEN_CHARS
from inlaid.quant.checkpoint_files import quantized_dir_problem
from inlaid.quant.unfinished import unfinished_problem

if TYPE_CHECKING:
    from inlaid.serve.config import ServerConfig


class ConfigError(ValueError):
    """The server configuration file is missing, malformed or inconsistent."""


def expand_user(value: str, what: str) -> Path:
    """`value` with a leading ~ or ~user expanded: a ConfigError naming `what` where that
    user or the home directory is unknown (`home_problem`)."""
    if problem := home_problem(Path(value), what):
        raise ConfigError(problem)
    return Path(value).expanduser()


def read_toml(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A config file's contents and its directory (relative paths resolve against it)."""
    path = expand_user(str(path), "config file")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; name the TOML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = read_text(path, "config file")
    try:
        return tomllib.loads(text), path.parent
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from error


def read_text(path: Path, what: str) -> str:
    """A text file the config names (or is), UTF-8; what: how a refusal names it. A leading
    byte-order mark (Windows editors write one) is dropped: tomllib read it as an "Invalid
    statement", and in a token file it became part of the token."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read: {error.strerror or error}") from None


def section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return dict(value)


def typed_value(values: dict[str, Any], section_name: str, key: str, default: Any,
                kind: type[bool] | type[str]) -> Any:
    """values[key] (else `default`) where it is a `kind`: TOML's true/false or a string. Never
    coerced: bool("false") is True, and str(5) would pass a number off as a name."""
    value = values.get(key, default)
    if not isinstance(value, kind):
        wanted = "true or false" if kind is bool else "a string"
        raise ConfigError(f"{section_name}.{key} must be {wanted}, got {value!r}")
    return value


def reject_unknown(section_name: str, values: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(values) - allowed
    if unknown:
        raise ConfigError(f"[{section_name}]: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def resolve_path(value: Any, base_dir: Path, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty path string")
    path = expand_user(value, what)
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it, symbolic links resolved."""
    resolved, root = os.path.realpath(path), os.path.realpath(directory)
    return resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep)


def check_writable_file(path: str, what: str, *, appended: bool = False) -> None:
    """Refuse a file the server writes while serving (a state saved by rename, or a log
    `appended` to) where it cannot be written: found at start-up, not as a traceback at the
    first save (or at shutdown, after everything learned is lost). A symbolic link is
    checked where it leads: a link into a missing folder read as "starts untrained", and the
    first save replaced the link with a file of its own."""
    file = Path(path)
    if file.is_symlink():
        file = Path(os.path.realpath(path))
        if file.is_symlink():
            raise ConfigError(f"{what} {path} is a symbolic link that never ends in a file (a loop)")
    parent = file.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        link = f" (it links to {file})" if file != Path(path) else ""
        raise ConfigError(f"{what} {path}{link}: its directory {parent} {problem}")
    if not os.access(parent, os.W_OK | os.X_OK):  # a rename, like a new file, needs the directory
        raise ConfigError(f"{what} {path}: its directory {parent} is not writable")
    if file.is_dir():
        raise ConfigError(f"{what} {path} is a directory; name a file in it")
    if appended and file.exists() and not os.access(file, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")


def admin_token_from(server: dict[str, Any], base_dir: Path) -> str | None:
    sources = [k for k in ("admin_token", "admin_token_env", "admin_token_file") if k in server]
    if len(sources) > 1:
        raise ConfigError(f"[server]: give only one of {sources}")
    if not sources:
        return None
    if "admin_token" in server:
        token = typed_value(server, "server", "admin_token", None, str)
    elif "admin_token_env" in server:
        token = os.environ.get(typed_value(server, "server", "admin_token_env", None, str), "")
        if not token:
            raise ConfigError(f"environment variable {server['admin_token_env']} (server.admin_token_env) is empty")
    else:
        token_path = Path(resolve_path(server["admin_token_file"], base_dir, "server.admin_token_file"))
        if not token_path.is_file():
            found = "is a directory, not a file" if token_path.is_dir() else "not found"
            raise ConfigError(f"server.admin_token_file {token_path}: {found}")
        token = read_text(token_path, "server.admin_token_file").strip()
    if not 16 <= len(token) <= MAX_ADMIN_TOKEN_CHARS:
        raise ConfigError(f"the admin token must have 16 to {MAX_ADMIN_TOKEN_CHARS} characters, not {len(token)}")
    return token


def check_bind_address(key: str, address: str, allow_public_bind: bool) -> None:
    """A ZeroMQ address this server can bind (`addresses.address_problem`) and, unless
    allowed, on a loopback host."""
    if problem := address_problem(key, address):
        raise ConfigError(problem)
    host = address[len("tcp://"):].rpartition(":")[0] if address.startswith("tcp://") else ""
    if host and host not in LOOPBACK_HOSTS and not allow_public_bind:
        raise ConfigError(f"{key} {address!r} is not a loopback address; set server.allow_public_bind = true "
                          "to listen beyond this machine")


def check_log_level(what: str, level: Any) -> None:
    # logging.setLevel raises "Unknown level" only once the server is starting.
    if not isinstance(level, str) or level not in logging.getLevelNamesMapping():
        raise ConfigError(f"{what} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {level!r}")


def check_state_dir(path: str) -> None:
    """The server creates the state directory at start-up: refuse one it could not."""
    problem = writable_dir_problem(Path(path), "server.state_dir")
    if problem:
        raise ConfigError(problem)


def check_quantized_dir(path: str, float_hint: str = "give the float model as model.dir") -> None:
    """A GPTQ checkpoint's directory as the executors load it: checked before any starts (the
    loader needs config.json and .safetensors weights; else three executor tracebacks)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"model.quantized_dir {path} is not a directory")
    # The mark first: a run still writing the directory (or one interrupted) has no config.json or
    # weights yet, and "not a checkpoint written by `inlaid quantize`" hid that it is one, unfinished.
    if (unfinished := unfinished_problem(directory)) is not None:  # else each executor fails at its model load
        raise ConfigError(f"model.quantized_dir: {unfinished}")
    missing = [what for what, there in (("config.json", (directory / "config.json").is_file()),
                                        (".safetensors weights", next(directory.glob("*.safetensors"), None)))
               if not there]
    if missing:
        raise ConfigError(f"model.quantized_dir {path} has no {' and no '.join(missing)} "
                          "(not a checkpoint written by `inlaid quantize`)")
    # The executors' own checks, made here: a float model folder, or a truncated weights file,
    # failed each executor's start (three tracebacks) or, before, served unquantized.
    if (problem := quantized_dir_problem(directory, float_hint)) is not None:
        raise ConfigError(f"model.quantized_dir: {problem}")


ADMIN_TOKEN_KEYS = ("admin_token", "admin_token_env", "admin_token_file")


def without_admin_token(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw config without the server's admin token, for the tools that read a server's
    config but make no admin call (the HTTP front, the scheduler tuning): an unset
    admin_token_env must not refuse them."""
    server = raw.get("server")
    if not isinstance(server, dict):
        return raw
    return {**raw, "server": {key: value for key, value in server.items() if key not in ADMIN_TOKEN_KEYS}}


_ANY_HOST = ("0.0.0.0", "*", "::", "")
_SAME_HOST = {"localhost": "127.0.0.1"}  # two names of one address: both listen on one port


def check_port_clashes(config: ServerConfig) -> None:
    """ConfigError for two of a ServerConfig's own listeners on one port where their hosts
    overlap: `[http] port` equal to server.address's was "cannot listen on server.address
    ...: Address already in use", which sent the user looking for another process (an
    outside probe). `[metrics]` and `[http]` cannot share one even by design."""
    executor = [] if config.executor_address == "auto" else _tcp_listener("server.executor_address",
                                                                          config.executor_address)
    fronts = [(f"{key}.port", front.host, front.port) for key, front in (("http", config.http),
                                                                        ("metrics", config.metrics)) if front]
    listeners = [*_tcp_listener("server.address", config.address), *executor, *fronts]
    listeners = [(key, _SAME_HOST.get(host, host), port) for key, host, port in listeners]
    for index, (key, host, port) in enumerate(listeners):
        for other_key, other_host, other_port in listeners[:index]:
            if port == other_port and (host == other_host or host in _ANY_HOST or other_host in _ANY_HOST):
                why = " (the front serves /metrics itself)" if {key, other_key} == {"metrics.port", "http.port"} else ""
                raise ConfigError(f"{key} and {other_key} cannot share port {port}: the server listens on both{why}")


def _tcp_listener(key: str, address: str) -> list[tuple[str, str, int]]:
    """[(key, host, port)] of a tcp:// address (checked already), [] of an ipc:// one."""
    if not address.startswith("tcp://"):
        return []
    host, _, port = address[len("tcp://"):].rpartition(":")
    return [(key, host, int(port))]
