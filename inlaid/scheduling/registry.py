"""Policies by name, with their options: what `[server] policy` and `[scheduler]` choose."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from inlaid.cli_args import MAX_SECONDS, type_words
from inlaid.engine.policy import FifoOptions, FifoPolicy, SchedulingPolicy
from inlaid.scheduling.estimates import LengthModel
from inlaid.scheduling.mlfq import MlfqOptions, MlfqPolicy
from inlaid.scheduling.srtf import InlaidOptions, InlaidPolicy
from inlaid.scheduling.step_log import StepLogPolicy
from inlaid.scheduling.vtc import VtcOptions, VtcPolicy

if TYPE_CHECKING:  # the predictor (numpy) loads only where a policy needs it
    from inlaid.predictor import TokenizerIdentity

# The server's logger: these lines belong to its start-up and shutdown story.
log = logging.getLogger("inlaid.coordinator")


OPTIONS: dict[str, type] = {"fifo": FifoOptions, "inlaid": InlaidOptions, "mlfq": MlfqOptions, "vtc": VtcOptions}
POLICY_NAMES = tuple(OPTIONS)
COMMON_OPTIONS = {"step_log"}  # any policy: write every step to this JSON-lines file


def parse_options(name: str, raw: Mapping[str, Any] | None) -> Any:
    """The policy's options dataclass from a config table; ValueError names what is wrong."""
    if name not in OPTIONS:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    cls = OPTIONS[name]
    raw = {k: v for k, v in (raw or {}).items() if k not in COMMON_OPTIONS}
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; its options: {sorted(allowed) + sorted(COMMON_OPTIONS)}")
    values = {}
    for key, value in raw.items():
        kind = type(allowed[key].default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"scheduler option {key!r} must be {type_words(kind)}, got {value!r}")
        if kind is float and not math.isfinite(value):
            # TOML has nan and inf; NaN fails every comparison, so max_wait_s = nan switched
            # the aging bound off without a word (an outside probe)
            raise ValueError(f"scheduler option {key!r} must be a finite number, got {value!r}")
        # (aging_tokens_per_s is a rate, not a duration: the policy's own range bounds it.)
        if key.endswith("_s") and not key.endswith("_per_s") and kind is float and value > MAX_SECONDS:
            # As huge as off: max_wait_s = 1e300 switched the aging bound off as nan did.
            raise ValueError(f"scheduler option {key!r} is a duration in seconds: at most {MAX_SECONDS:g}, got {value!r}")
        values[key] = value
    options = cls(**values)
    options.validate()
    return options


def make_policy(name: str, raw_options: Mapping[str, Any] | None = None, *,
                length_model: LengthModel | None = None, tokenizer: TokenizerIdentity | None = None) -> SchedulingPolicy:
    """A policy by name; `length_model` replaces the one the options would build (simulator);
    `tokenizer`: whose token ids the served requests hold (a server's base model)."""
    options = parse_options(name, raw_options)
    policy: SchedulingPolicy
    if name == "fifo":
        policy = FifoPolicy(options)
    elif name == "inlaid":
        policy = InlaidPolicy(options, length_model or build_length_model(options, tokenizer))
    elif name == "mlfq":
        policy = MlfqPolicy(options)
    else:
        policy = VtcPolicy(options)
    return with_common_options(policy, raw_options)


def with_common_options(policy: SchedulingPolicy, raw_options: Mapping[str, Any] | None) -> SchedulingPolicy:
    """`policy` with the COMMON_OPTIONS of `raw_options` applied (any policy's, plug-ins' too)."""
    step_log = (raw_options or {}).get("step_log")
    return StepLogPolicy(policy, str(step_log)) if step_log else policy


def build_length_model(options: InlaidOptions, tokenizer: TokenizerIdentity | None = None) -> LengthModel:
    from inlaid.predictor import OnlineLengthPredictor, TaskMeanPredictor

    if options.predictor == "exact":
        raise ValueError("predictor 'exact' is the simulator's clairvoyant oracle: a server cannot know output lengths")
    if options.predictor == "task-mean":
        return TaskMeanPredictor()
    path = options.predictor_state or None
    if path and os.path.exists(path):
        loaded = OnlineLengthPredictor.load(path, refit_every=options.predictor_refit_every, state_path=path,
                                            tokenizer=tokenizer)
        # Which file the server learns from and how much it holds: a restart that starts
        # from nothing (a path typo, a wiped volume) is otherwise told apart only by worse JCT.
        log.info("length predictor state loaded", extra={"path": path, "records": loaded.size})
        if loaded.adopted:  # (one learned on another model before states named theirs passed unseen)
            log.warning("the length predictor state names no tokenizer (an older version's, or `python -m "
                        "inlaid.predictor train`'s): taken as learned on this server's model, and saved with its "
                        "tokenizer from now on; move it away if it was learned on another model",
                        extra={"path": path, "records": loaded.size, "model": tokenizer.model if tokenizer else ""})
        return loaded
    if path:
        log.info("length predictor starts untrained; its state will be saved", extra={"path": path})
    return OnlineLengthPredictor(refit_every=options.predictor_refit_every, state_path=path, tokenizer=tokenizer)


def describe_policy(policy: SchedulingPolicy) -> dict[str, Any]:
    """What the start-up log says of a serving policy: its name and, for the built-in ones,
    every option in force (the defaults filled in), so a log shows what really schedules."""
    inner = policy.inner if isinstance(policy, StepLogPolicy) else policy
    # The class too: a plug-in that does not set `name` inherits SchedulingPolicy's "fifo".
    described: dict[str, Any] = {"policy": inner.name, "class": f"{type(inner).__module__}.{type(inner).__qualname__}"}
    options = getattr(inner, "options", None)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        # Field by field, not dataclasses.asdict: that deep-copies, and a plug-in's options
        # holding a lock or a model raised TypeError, failing the start on a log line.
        values = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
        described["options"] = {name: value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
                                for name, value in values.items()}
    if isinstance(policy, StepLogPolicy):
        described["step_log"] = str(policy.path)
    return described


def retune_policy(policy: SchedulingPolicy, raw_options: Mapping[str, Any]) -> InlaidOptions | None:
    """A live re-tuning's `[scheduler]` options applied to a serving policy in place (the
    inlaid policy, inside a step log too; InlaidPolicy.retune says what stays): the options
    now in force, or None for a policy the tuning does not tune (left as it is). ValueError
    (nothing changed) for options the policy refuses."""
    inner = policy.inner if isinstance(policy, StepLogPolicy) else policy
    if not isinstance(inner, InlaidPolicy):
        return None
    return inner.retune(parse_options("inlaid", raw_options))
