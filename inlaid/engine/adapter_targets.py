"""The module-selection fields of a PEFT adapter_config.json (`target_modules`,
`exclude_modules`, `layers_to_transform` with `layers_pattern`), read as PEFT reads them and
checked (`AdapterSpec` matches them, layer by layer; docs/engine.md, Adapters)."""

from __future__ import annotations

import re
import time
from typing import Any

import regex

from inlaid.engine.adapter_config import PROJECTIONS, AdapterError, AdapterSpec, is_finite_number, module_name
from inlaid.engine.module_patterns import MATCH_TIMEOUT_S, PATTERN_BUDGET_S, check_pattern


# Every module of a Llama model that is not one of the projections (layer 0 stands for all):
# PEFT puts LoRA on an nn.Linear or nn.Embedding a pattern matches (lm_head, the embedding: not
# computed by the engine) and refuses any other module it matches ("LlamaAttention is not
# supported"), so a pattern matching one of these is refused here as well.
_OTHER_MODULES = ("", "model", "lm_head", "model.embed_tokens", "model.norm", "model.rotary_emb", "model.layers",
                  "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0.mlp.act_fn",
                  "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm")


def _check_readable(name: str, what: str, pattern: str, full: str | None = None,
                    problem: str = "is not a regular expression the engine reads as PEFT does") -> None:
    """AdapterError unless `full` (the pattern as PEFT matches it; default `pattern` itself)
    passes `check_pattern`."""
    try:
        check_pattern(pattern if full is None else full)
    except (re.error, RecursionError, FutureWarning) as error:
        raise AdapterError(f"adapter {name!r}: {what} {pattern!r:.80} {problem}: {error}") from None


def target_names(name: str, targets: Any, layer_options: bool) -> tuple[str, ...] | str | None:
    """target_modules where PEFT's name matching decides more than a projection list does: a
    regular expression, or a list with names qualified by their path (their last part must
    be a projection: LoRA elsewhere is refused as before). None for plain projection names.
    `layer_options`: layers_to_transform or layers_pattern is set (PEFT refuses those beside a
    regular expression)."""
    if isinstance(targets, str) and targets:
        _check_readable(name, "target_modules", targets)
        if layer_options:
            raise AdapterError(f"adapter {name!r}: target_modules is a regular expression and layers_to_transform or "
                               "layers_pattern is set: PEFT refuses the two together")
        for other in _OTHER_MODULES:  # timed, as every pattern: `re` would hold the interpreter for minutes
            try:
                matched = regex.fullmatch(targets, other, timeout=MATCH_TIMEOUT_S) is not None
            except TimeoutError:
                raise AdapterError(f"adapter {name!r}: target_modules {targets!r:.80} takes over {MATCH_TIMEOUT_S} s "
                                   "to match a module name (a regular expression that backtracks): simplify it"
                                   ) from None
            if matched:
                raise AdapterError(f"adapter {name!r}: LoRA on {other or 'the whole model'} (target_modules "
                                   f"{targets!r:.80} matches it; supported: {', '.join(PROJECTIONS)}) is not supported")
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        qualified = [t for t in targets if t not in PROJECTIONS]  # ("" entries: dropped by the caller)
        if qualified and all("." in t and t.rsplit(".", 1)[1] in PROJECTIONS for t in qualified):
            return tuple(targets)
    return None


def exclusions(name: str, exclude: Any) -> tuple[str, ...] | str:
    if exclude is None or exclude is False or exclude in ("", []):  # PEFT: nothing excluded
        return ()
    if isinstance(exclude, str):
        _check_readable(name, "exclude_modules", exclude)
        return exclude
    if isinstance(exclude, list) and all(isinstance(entry, str) for entry in exclude):
        return tuple(entry for entry in exclude if entry)  # "" matches no module name
    raise AdapterError(f"adapter {name!r}: adapter_config.json field 'exclude_modules' must be a list of module "
                       f"names or a regular expression, got {exclude!r:.80}")


def layer_selection(name: str, layers: Any, pattern: Any) -> dict[str, Any]:
    """layers_to_transform and layers_pattern as PEFT reads them (None or []: every layer)."""
    if layers is None or layers == []:
        return {}
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        raise AdapterError(f"adapter {name!r}: adapter_config.json field 'layers_to_transform' must be a layer index "
                           f"or a list of them, got {layers!r:.80}")
    patterns = [] if pattern in (None, "", []) else [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(f"adapter {name!r}: adapter_config.json field 'layers_pattern' must be a name or a list "
                           f"of names, got {pattern!r:.80}")
    for entry in patterns:
        _check_readable(name, "layers_pattern", entry, rf"(?:^|.*?\.){entry}\.(?P<idx>\d+)\.", "is not usable")
    return {"layers_to_transform": tuple(layers), "layers_pattern": tuple(patterns)}


# PEFT's conversions write one key per module (7 a layer); a key matching nothing is still tried
# on every module at a load: 20,000 such keys took ~30 s of an 80-layer model's first load (a reviewer)
MAX_MODULE_KEYS = 2048


def module_values(name: str, field: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """PEFT's rank_pattern (field "rank_pattern": ranks) or alpha_pattern (lora_alphas): a JSON
    object from module names or regular expressions to values, as (pattern, value) pairs in
    the file's order (PEFT takes the first that matches). Each pattern is checked as PEFT
    matches it: `(.*\\.)?(<pattern>)$` from the start of the module's name."""
    if value is None or value == {}:
        return ()
    wanted = "rank (an integer >= 1)" if field == "rank_pattern" else "lora_alpha (a finite number)"
    if not isinstance(value, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json field {field!r} must map module names or regular "
                           f"expressions to a {wanted}, got {value!r:.80}")
    if len(value) > MAX_MODULE_KEYS:  # each key is tried on every module name a load asks about
        raise AdapterError(f"adapter {name!r}: {field} holds {len(value)} keys; at most {MAX_MODULE_KEYS} are "
                           "accepted (one a module of a 128-layer model is 896)")
    pairs: list[tuple[str, Any]] = []
    for pattern, entry in value.items():
        if field == "rank_pattern":
            usable = isinstance(entry, int) and not isinstance(entry, bool) and entry >= 1
        else:
            usable = is_finite_number(entry)
        if not usable:
            raise AdapterError(f"adapter {name!r}: {field} gives {pattern!r:.80} {entry!r:.40}; each value must be a "
                               f"{wanted}")
        _check_readable(name, f"{field} key", pattern, rf"(.*\.)?({pattern})$")
        pairs.append((pattern, entry if field == "rank_pattern" else float(entry)))
    return tuple(pairs)


def time_module_values(spec: AdapterSpec) -> None:
    """Every rank_pattern / alpha_pattern key tried on 21 module names when the adapter is read,
    within a budget that grows with their count (PEFT's conversions write one literal key per
    module: hundreds, microseconds each); checked after each key, so that a backtracking one
    costs at most its own 21 matches' time limits past the budget."""
    keys = [(field, pattern) for field, pairs in (("rank_pattern", spec.rank_pattern),
                                                   ("alpha_pattern", spec.alpha_pattern)) for pattern, _ in pairs]
    names = [module_name(layer, projection) for layer in (0, 10, 100) for projection in PROJECTIONS]
    budget = max(PATTERN_BUDGET_S, _SECONDS_PER_MATCH * len(keys) * len(names))
    started = time.thread_time()  # this thread's CPU: a busy machine's waits do not count
    for field, pattern in keys:
        for key in names:
            spec._timed(field, pattern, spec._compiled_match, rf"(.*\.)?({pattern})$", key)
        if (spent := time.thread_time() - started) > budget:
            raise AdapterError(f"adapter {spec.name!r}: the keys of rank_pattern / alpha_pattern took {spent:.2f} s "
                               f"to match 21 module names, past {budget:.2f} s at {field} {pattern!r:.80} (a "
                               "regular expression that backtracks): simplify it")


_SECONDS_PER_MATCH = 1e-4  # a module name against a key: ~2 us, its compilation included
