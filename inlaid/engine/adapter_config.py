"""Reading and validating PEFT LoRA adapter directories. Torch-free.

Accepts the subset of PEFT's LoRA that the engine computes exactly: any subset of the
seven projections, any rank, lora_alpha scaling and rsLoRA, per-module ranks and alphas
(rank_pattern, alpha_pattern). Everything else (DoRA, embedding or lm_head LoRA, trained
biases, layer replication and the other variants of `adapter_variants`) is rejected with a
clear message rather than served wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, NoReturn

import regex  # patterns matched with a time limit (module_patterns.py)

from inlaid.bounded_files import TOO_LARGE, digest_bounded, read_bounded
from inlaid.engine.module_patterns import MATCH_TIMEOUT_S, PATTERN_BUDGET_S

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK_OF = {projection: "self_attn" if index < 4 else "mlp" for index, projection in enumerate(PROJECTIONS)}
# A LoRA tensor's key as PEFT saves it for a Llama-style causal LM. Whole, and each projection
# under its own block: a search for the tail served `mlp.q_proj` on the attention's q_proj and
# took keys without PEFT's prefix, neither of which PEFT itself loads (an outside probe).
_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.([0-9]+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight")
LORA_KEY_FORM = "base_model.model.model.layers.<i>.{self_attn,mlp}.<projection>.lora_{A,B}.weight"


def parse_lora_key(key: str) -> tuple[int, str, str] | None:
    """(layer, projection, "A" or "B") of a PEFT LoRA tensor key; None for any other key."""
    match = _LORA_KEY.fullmatch(key)
    if match is None or _BLOCK_OF.get(match.group(3)) != match.group(2):
        return None
    return int(match.group(1)), match.group(3), match.group(4)


class AdapterError(ValueError):
    """An adapter directory is missing, malformed or uses an unsupported PEFT feature."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    # PEFT's exclude_modules (a list of module names, or a regular expression): the target
    # projections it matches carry no LoRA (their tensors are absent from the file, and the
    # engine computes the base alone there, as PEFT does)
    exclude_modules: tuple[str, ...] | str = ()
    # PEFT's layers_to_transform and layers_pattern: only the layers listed carry LoRA
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    # target_modules as PEFT matches it where it is more than projection names: a regular
    # expression the whole module name must match, or names qualified by their path
    # ("self_attn.q_proj", "model.layers.3.mlp.down_proj"); `target_modules` then holds every
    # projection such a name can reach, and `excludes` decides layer by layer
    target_names: tuple[str, ...] | str | None = None
    # PEFT's rank_pattern and alpha_pattern, as (pattern, value) pairs in the file's order: the
    # first pattern matching a module's name gives its rank or lora_alpha (`rank_at`, `scale_at`)
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # their patterns compiled, and each module's value once found: PEFT's own conversions write
    # one literal key per module (EVA: 560 keys for 80 layers), past `regex`'s compile cache,
    # and a slot load asks every module's scale (13 s an adapter uncached: a reviewer)
    _compiled: dict[str, Any] = dataclass_field(default_factory=dict, init=False, compare=False, repr=False)
    _found: dict[tuple[str, str], Any] = dataclass_field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def rank_bound(self) -> int:
        """The largest rank the file names (`r`, rank_pattern's values): a bound of `rank_used`,
        which is what the checks read only when this one passes their limit (its scan costs
        ~1 s for PEFT's one key a module on a 128-layer model)."""
        return max((self.rank, *(rank for _, rank in self.rank_pattern)))

    def rank_used(self, num_layers: int) -> int:
        """The largest rank a module of a `num_layers`-layer model gets, as PEFT builds it (what
        the pools must hold): a rank_pattern key that matches no module counts for nothing (PEFT
        warns and serves the rest; it was refused here past max_lora_rank: an outside probe)."""
        if not self.rank_pattern:
            return self.rank
        return max((self.rank_at(layer, projection) for layer in range(num_layers)
                    for projection in self.target_modules if not self.excludes(layer, projection)), default=self.rank)

    def rank_at(self, layer: int, projection: str) -> int:
        return self._module_value("rank_pattern", self.rank_pattern, layer, projection, self.rank)

    def rank_words(self, rank: int) -> str:
        """What adapter_config.json says of a module's rank `rank`, for a message."""
        return f"r={rank}" if not self.rank_pattern else f"its rank there is {rank} (r, rank_pattern)"

    def alpha_at(self, layer: int, projection: str) -> float:
        return self._module_value("alpha_pattern", self.alpha_pattern, layer, projection, self.lora_alpha)

    def scale_at(self, layer: int, projection: str) -> float:
        """The module's LoRA scale, as PEFT computes it from its own rank and lora_alpha."""
        rank = self.rank_at(layer, projection)
        return self.alpha_at(layer, projection) / (math.sqrt(rank) if self.use_rslora else rank)

    def _module_value(self, field: str, pairs: tuple[tuple[str, Any], ...], layer: int, projection: str,
                      default: Any) -> Any:
        """PEFT's `get_pattern_key`: the first pattern that matches the module's whole name or
        its end after a "." (`re.match` of `(.*\\.)?(<pattern>)$`), timed as every pattern."""
        key = module_name(layer, projection)
        if (field, key) in self._found:
            return self._found[field, key]
        found = default
        for pattern, value in pairs:
            if self._timed(field, pattern, self._compiled_match, rf"(.*\.)?({pattern})$", key) is not None:
                found = value
                break
        self._found[field, key] = found
        return found

    def _compiled_match(self, full: str, key: str, timeout: float) -> Any:
        if (compiled := self._compiled.get(full)) is None:
            compiled = self._compiled[full] = regex.compile(full)
        return compiled.match(key, timeout=timeout)

    @property
    def has_exclusions(self) -> bool:
        return bool(self.exclude_modules) or self.layers_to_transform is not None or self.target_names is not None

    def excludes(self, layer: int, projection: str) -> bool:
        """Whether the projection carries no LoRA, by PEFT's rules (`check_target_module_exists`)
        on the module's name in the base model: exclude_modules must not match it (a string is
        a regular expression the whole name must match; a list matches a name equal to an entry
        or ending in "." + an entry); target_modules must: a regular expression the whole name,
        else an entry equal to the name, or one it ends in ("." + the entry), and then
        layers_to_transform (the layer index read from the name through layers_pattern) must
        list the layer."""
        key = module_name(layer, projection)
        if self._excluded_by_name(key):  # PEFT checks exclude_modules first
            return True
        if isinstance(self.target_names, str):  # a regular expression (never beside layers_to_transform)
            return self._timed("target_modules", self.target_names, regex.fullmatch, self.target_names, key) is None
        if self.target_names is not None:
            if key in self.target_names:  # named whole: no layer filter either
                return False
            if not any(key.endswith(f".{name}") for name in self.target_names):
                return True
        elif projection not in self.target_modules:
            return True
        if self.layers_to_transform is not None:
            match = None
            for pattern in self.layers_pattern or (None,):
                full = r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
                if match := self._timed("layers_pattern", pattern, regex.match, full, key):
                    break
            if match is None or int(match.group("idx")) not in self.layers_to_transform:
                return True
        return False

    def _excluded_by_name(self, key: str) -> bool:
        if not self.exclude_modules:
            return False
        if isinstance(self.exclude_modules, str):
            pattern = self.exclude_modules
            return self._timed("exclude_modules", pattern, regex.fullmatch, pattern, key) is not None
        return any(key == entry or key.endswith(f".{entry}") for entry in self.exclude_modules)

    def _timed(self, field: str, pattern: str | None, matcher: Any, full: str, key: str) -> Any:
        """`matcher(full, key)` within MATCH_TIMEOUT_S: a pattern that backtracks without end
        (`(.|.)*X`: ~150 s a module name under `re`, which holds the interpreter lock) froze
        the whole coordinator from one admin call (an outside probe)."""
        try:
            return matcher(full, key, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            raise AdapterError(f"adapter {self.name!r}: {field} {pattern!r:.80} takes over {MATCH_TIMEOUT_S} s to "
                               f"match the module name {key!r} (a regular expression that backtracks without "
                               "end): simplify it") from None
        except regex.error as error:  # `re` compiled it (checked when read); `regex` reads a few escapes apart
            raise AdapterError(f"adapter {self.name!r}: {field} {pattern!r:.80} is not usable: {error}") from None

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def module_name(layer: int, projection: str) -> str:
    """The projection's module name in the base model, as PEFT matches its patterns against it."""
    return f"model.layers.{layer}.{_BLOCK_OF[projection]}.{projection}"


# A PEFT adapter_config.json is a few hundred bytes; anything this large is not one.
MAX_CONFIG_BYTES = 1 << 20
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what defines an adapter: copied, compared, hashed

# The largest |LoRA scale| (lora_alpha / r, or / sqrt(r) with rsLoRA) accepted: float16's
# largest value. Trained adapters have scales of about 0.1-64; far beyond, the scale itself
# or scale * B overflows the pools' dtype (fp16/bf16 on a GPU, float32 at 1e38) and every
# request of the task fails (NaN logits) instead of the AddTask. Negative scales are kept:
# PEFT allows any lora_alpha, and a negated adapter is a real use (task arithmetic).
MAX_LORA_SCALE = 65504.0


def read_adapter_spec(name: str, path: str | Path) -> AdapterSpec:
    """The adapter's spec, or AdapterError (the only exception it raises) naming what is wrong.

    Every field the engine uses is type-checked: PEFT writes `r` as an integer,
    `target_modules` as a list of names, and so on; anything else is refused rather than
    coerced.
    """
    directory, raw = read_adapter_config(name, path)
    return spec_from_config_bytes(name, str(directory), raw)


def read_adapter_config(name: str, path: str | Path) -> tuple[Path, bytes]:
    """The adapter's directory and its adapter_config.json's bytes, once both files are
    there (AdapterError naming what is not)."""
    try:
        path = Path(path)
        is_dir = path.is_dir()
    except (TypeError, ValueError, OSError) as error:
        raise AdapterError(f"adapter {name!r}: bad directory {path!r}: {error}") from None
    if not is_dir:
        raise AdapterError(f"adapter {name!r}: {_not_there(path, 'directory', f'directory not found: {path}')}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        missing = f"{path} has no adapter_config.json (not a PEFT adapter)"
        raise AdapterError(f"adapter {name!r}: {_not_there(config_path, 'file', missing)}")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        missing = f"{path} has no adapter_model.safetensors"
        raise AdapterError(f"adapter {name!r}: {_not_there(weights_path, 'file', missing)}")
    try:
        raw = read_bounded(config_path, MAX_CONFIG_BYTES)
    except OSError as error:
        if error.errno == TOO_LARGE:
            raise AdapterError(f"adapter {name!r}: adapter_config.json is over {MAX_CONFIG_BYTES} bytes") from None
        raise AdapterError(f"adapter {name!r}: cannot read adapter_config.json: {error}") from None
    return path, raw


def spec_from_config_bytes(name: str, path: str, raw: bytes) -> AdapterSpec:
    """The spec of an adapter_config.json holding `raw` (AdapterError naming what is wrong)."""
    if len(raw) > MAX_CONFIG_BYTES:  # (outside the try: an AdapterError is a ValueError too)
        raise AdapterError(f"adapter {name!r}: adapter_config.json is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: also an integer of over 4,300 digits
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json must hold a JSON object, "
                           f"not {type(config).__name__}")
    return _spec_from_config(name, path, config)


def adapter_signature(path: str | Path, max_weights_bytes: int = 1 << 40) -> str:
    """What the adapter directory holds now: the sha256 of adapter_config.json and of
    adapter_model.safetensors. Registration records it (taken before the adapter's check and
    compared after it) and every load compares the bytes it reads with it, so that files
    replaced under a registered path are never served as the adapter checked at its
    registration (host copies and device slots were keyed by path alone: an outside probe
    re-registered a directory whose files had changed and got the old adapter's tokens).
    By content, not by stat: a chmod, a hard link or identical bytes copied again change
    nothing. "-" when a file cannot be read, is no regular file, or is larger than its bound
    (MAX_CONFIG_BYTES, max_weights_bytes): no adapter's files hash to it."""
    digests = []
    for file_name, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (WEIGHTS_FILE, max_weights_bytes)):
        try:
            digests.append(digest_bounded(Path(path) / file_name, limit))
        except (OSError, ValueError):
            return "-"
    return ":".join(digests)


def content_signature(config: bytes, weights: bytes) -> str:
    """`adapter_signature` of files holding these bytes."""
    return f"{hashlib.sha256(config).hexdigest()}:{hashlib.sha256(weights).hexdigest()}"


def _spec_from_config(name: str, path: str, config: dict[str, Any]) -> AdapterSpec:
    def reject(feature: str) -> NoReturn:
        raise AdapterError(f"adapter {name!r}: {feature} is not supported")

    def bad(field: str, expected: str) -> NoReturn:
        raise AdapterError(f"adapter {name!r}: adapter_config.json field {field!r} must be {expected}, "
                           f"got {config[field]!r:.80}")

    if config.get("peft_type", "LORA") != "LORA":
        reject(f"peft_type {config.get('peft_type')!r:.80} (only LORA)")
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            bad(flag, "true or false")
    # here, not at the top: these modules read AdapterError and PROJECTIONS from this one
    from inlaid.engine.adapter_targets import (exclusions, layer_selection, module_values, target_names,
                                               time_module_values)
    from inlaid.engine.adapter_variants import check_variant

    check_variant(name, config)
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT reads it in any case
        targets = list(PROJECTIONS)
    if isinstance(targets, list):
        targets = [t for t in targets if t != ""] or targets  # "" names no module (PEFT), as in exclude_modules
    layer_options = config.get("layers_to_transform") not in (None, []) or config.get("layers_pattern") not in (
        None, "", [])
    named = target_names(name, targets, layer_options)
    if named is not None:
        targets = list(PROJECTIONS)  # which of them, layer by layer: AdapterSpec.excludes
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        reject(f"target_modules={targets!r:.80} (give a list of module names or a regular expression)")
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        reject(f"LoRA on {unknown} (supported: {', '.join(PROJECTIONS)})")
    rank = config.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int):
        bad("r", "an integer")
    if rank < 1:
        raise AdapterError(f"adapter {name!r}: rank must be >= 1, got {rank}")
    alpha = config.get("lora_alpha", 8)
    if not is_finite_number(alpha):
        bad("lora_alpha", "a finite number")
    spec = AdapterSpec(
        name=name,
        path=path,
        rank=rank,
        lora_alpha=float(alpha),  # type: ignore[arg-type]
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=tuple(p for p in PROJECTIONS if p in targets),
        exclude_modules=exclusions(name, config.get("exclude_modules")),
        **layer_selection(name, config.get("layers_to_transform"), config.get("layers_pattern")),
        target_names=named,
        rank_pattern=module_values(name, "rank_pattern", config.get("rank_pattern")),
        alpha_pattern=module_values(name, "alpha_pattern", config.get("alpha_pattern")),
    )
    if spec.has_exclusions:  # each pattern timed on module names now, not first at a load
        started = time.thread_time()  # this thread's CPU: a busy machine's waits do not count
        for layer in (0, 10, 100):
            for projection in PROJECTIONS:
                spec.excludes(layer, projection)
        if (spent := time.thread_time() - started) > PATTERN_BUDGET_S:
            # each match under the limit, but a check matches ~600 names: a reviewer's
            # `.{15}(.|.)*\d{5}` took 13.9 s of one
            raise AdapterError(f"adapter {name!r}: target_modules / exclude_modules / layers_pattern took "
                               f"{spent:.2f} s to match 21 module names (a regular expression that backtracks): "
                               "simplify it")
    time_module_values(spec)
    # the largest scale any module can get: the largest |lora_alpha| over the smallest rank
    worst_alpha = max((spec.lora_alpha, *(alpha for _, alpha in spec.alpha_pattern)), key=abs)
    worst_rank = min((rank, *(value for _, value in spec.rank_pattern)))
    try:
        scale = worst_alpha / (math.sqrt(worst_rank) if spec.use_rslora else worst_rank)
    except OverflowError:  # a rank beyond float range (no str() of it either: it may have 10**5 digits)
        raise AdapterError(f"adapter {name!r}: rank is out of range") from None
    if not abs(scale) <= MAX_LORA_SCALE:
        divisor = "sqrt(r)" if spec.use_rslora else "r"
        which = (f"(lora_alpha {worst_alpha:.4g}, r {worst_rank})" if not (spec.rank_pattern or spec.alpha_pattern)
                 else f"(the largest |lora_alpha|, {worst_alpha:.4g}, over the smallest r, {worst_rank}, that "
                      "lora_alpha, r, alpha_pattern and rank_pattern give)")
        raise AdapterError(f"adapter {name!r}: LoRA scale lora_alpha / {divisor} = {scale:.4g} {which} is over "
                           f"{MAX_LORA_SCALE:.0f} in magnitude: its outputs would overflow (trained adapters' "
                           "scales are far smaller)")
    return spec


def is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _not_there(path: Path, wanted: str, missing: str) -> str:
    """Why `path` is not the `wanted` ('directory' or 'file') it should be: `missing` when
    nothing is there, else what is (a file, a broken link, a FIFO...)."""
    if not os.path.lexists(path):
        return missing
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link (or a loop of them)"
    if path.is_dir():
        return f"{path} is a directory, not a file"
    if path.is_file():
        return f"{path} is a file, not a directory"
    return f"{path} is not a regular {wanted} (a device, FIFO or socket?)"
