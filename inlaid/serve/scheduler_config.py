"""The server config's scheduling part: `server.policy`, `[scheduler]` and the autotuning
files, checked at start-up (one line each, never a traceback later), and the policy they
make. Torch-free."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inlaid.serve.config_parsing import ConfigError, check_writable_file

if TYPE_CHECKING:
    from inlaid.serve.config import ServerConfig

log = logging.getLogger("inlaid.coordinator")


def check_scheduler(config: ServerConfig) -> None:
    """`server.policy` names a policy, its `[scheduler]` options parse, and the files they
    name can be written (and a predictor state read); the autotuning inputs load."""
    from inlaid.scheduling.registry import COMMON_OPTIONS, POLICY_NAMES, parse_options

    if config.policy in POLICY_NAMES:
        try:
            options = parse_options(config.policy, config.scheduler)
        except ValueError as error:
            raise ConfigError(f"[scheduler]: {error}") from None
        _check_scheduler_files(config, options)
        if config.autotune_cost_model is not None:
            _check_autotune(config)
        elif config.autotune_lengths is not None:
            raise ConfigError("scheduler.autotune_lengths needs scheduler.autotune_cost_model (it feeds the tuning)")
    elif ":" not in config.policy:
        raise ConfigError(f"server.policy must be one of {', '.join(POLICY_NAMES)} or 'package.module:factory', "
                          f"got {config.policy!r}")
    elif config.autotune_cost_model is not None or config.autotune_lengths is not None:
        # taken out of [scheduler] before the check below saw them: accepted, then tuned for nothing
        key = "autotune_cost_model" if config.autotune_cost_model is not None else "autotune_lengths"
        raise ConfigError(f"scheduler.{key} tunes the inlaid policy; server.policy is the plug-in {config.policy!r}")
    elif set(config.scheduler) - COMMON_OPTIONS:
        raise ConfigError(f"[scheduler] {', '.join(sorted(set(config.scheduler) - COMMON_OPTIONS))}: a plug-in policy "
                          "takes no options but step_log (the others are the built-in policies')")
    elif config.scheduler:
        _check_scheduler_files(config, None)


def _check_scheduler_files(config: ServerConfig, options: Any) -> None:
    """The files the policy writes while serving can be written, and a predictor state
    it would load at start-up is one (else: refused now, one line, not a traceback)."""
    if config.scheduler.get("step_log"):
        _check_written_file(config, config.scheduler["step_log"], "scheduler.step_log", appended=True)
    from inlaid.scheduling.srtf import InlaidOptions

    # Only the learned predictor ("model") loads and saves the state file.
    if not isinstance(options, InlaidOptions) or options.predictor != "model" or not options.predictor_state:
        return
    state = options.predictor_state
    _check_written_file(config, state, "scheduler.predictor_state")
    if Path(state).exists():
        from inlaid.predictor import OnlineLengthPredictor

        try:
            OnlineLengthPredictor.load(state, tokenizer=predictor_tokenizer(config.engine.model_dir))
        except ValueError as error:  # PredictorStateError: names the file and what to do
            raise ConfigError(f"scheduler.predictor_state: {error}") from None


def _check_written_file(config: ServerConfig, path: str, what: str, appended: bool = False) -> None:
    if config.state_dir is not None and Path(path).parent == Path(config.state_dir) and not Path(path).is_dir():
        return  # the server creates its state directory at start-up, before anything is written
    check_writable_file(path, what, appended=appended)


def _check_autotune(config: ServerConfig) -> None:
    from inlaid.scheduling.autotune import load_cost_model

    if config.policy != "inlaid":
        raise ConfigError(f"scheduler.autotune_cost_model tunes the inlaid policy; server.policy is {config.policy!r}")
    try:
        load_cost_model(str(config.autotune_cost_model), config.engine.max_num_seqs)
    except ValueError as error:
        raise ConfigError(f"scheduler.autotune_cost_model {error}") from None
    if config.autotune_lengths is not None:
        from inlaid.scheduling.suite import load_tuning_records

        try:
            load_tuning_records(config.autotune_lengths)
        except (OSError, ValueError) as error:
            raise ConfigError(f"scheduler.autotune_lengths: {error}") from None


def load_policy(spec: str, options: dict[str, Any] | None = None, announce: bool = True,
                tokenizer: Any = None) -> Any:
    """The scheduling policy named by server.policy with its [scheduler] options; None means
    the engine's FIFO. `announce`: log the policy and its options (once a server, not once
    an executor); `tokenizer`: the served model's (`predictor_tokenizer`)."""
    policy = _make_policy(spec, options, tokenizer)
    if announce:
        from inlaid.scheduling.registry import describe_policy

        described = describe_policy(policy) if policy is not None else {"policy": "fifo", "class": "engine default"}
        log.info("scheduling policy", extra={**described, "configured_as": spec})
    return policy


def predictor_tokenizer(model_dir: str) -> Any:
    """Whose token ids the length predictor learns from: the served base's tokenizer, by the
    sha256 of what decides a text's ids (tokenizer.json's model, added tokens, normalizer and
    pre-tokenizer, as the tokenizers library reads them, in canonical JSON: a re-save or a new
    padding setting changes nothing); None where there is no tokenizer.json it can read."""
    import hashlib
    import json

    from tokenizers import Tokenizer

    from inlaid.predictor import TokenizerIdentity

    path = Path(model_dir) / "tokenizer.json"
    try:  # the library's own form: it writes older files' fields anew (merges "a b" as ["a", "b"]: a reviewer)
        tokenizer = json.loads(Tokenizer.from_file(str(path)).to_str())
    except Exception:  # noqa: BLE001 (unreadable or no tokenizer: nothing to check a state against)
        return None
    deciding = {key: tokenizer.get(key) for key in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    digest = hashlib.sha256(json.dumps(deciding, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return TokenizerIdentity(model=str(Path(model_dir).resolve()), sha256=digest)


def _make_policy(spec: str, options: dict[str, Any] | None, tokenizer: Any = None) -> Any:
    from inlaid.scheduling.registry import POLICY_NAMES, make_policy, with_common_options

    if spec == "fifo" and not options:
        return None
    if spec in POLICY_NAMES:
        try:
            return make_policy(spec, options, tokenizer=tokenizer)
        except ValueError as error:
            raise ConfigError(f"[scheduler]: {error}") from None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"server.policy {spec!r}: a plug-in policy is 'package.module:factory'")
    # The module and its factory are the user's code: whatever they raise is the config's
    # problem, said in one line naming the key (a traceback would point into Inlaid).
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    # SystemExit too: a module that calls sys.exit() on import (a script's guard) ended the
    # server with its code and no word of why.
    except (Exception, SystemExit) as error:  # noqa: BLE001  (ImportError, AttributeError, SyntaxError, its own)
        raise ConfigError(f"server.policy {spec!r}: cannot import it: {_one_line(error)}") from error
    if not callable(factory):
        raise ConfigError(f"server.policy {spec!r}: {attribute} is not callable ({type(factory).__name__}); "
                          "name a factory that returns a SchedulingPolicy")
    try:
        policy = factory()
    except (Exception, SystemExit) as error:  # noqa: BLE001
        raise ConfigError(f"server.policy {spec!r}: {attribute}() (called with no arguments) raised "
                          f"{_one_line(error)}") from error
    from inlaid.engine.scheduler import SchedulingPolicy

    if not isinstance(policy, SchedulingPolicy):
        raise ConfigError(f"server.policy {spec!r} did not give a SchedulingPolicy (inlaid.engine.scheduler), "
                          f"got {type(policy).__name__}")
    return with_common_options(policy, options)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
