"""What a unit of relative reconstruction error costs each task (mlgptq's `sensitivity`).

With `sensitivity="impurity"` a task's cost κ_t is the mean Gini impurity 1 − Σ_v p_v² of the
FLOAT model's distribution over its answer tokens, on the first `probe_samples` calibration
samples (at most as many as the calibration uses), the task's adapter on: to second order,
what noise on the logits costs that task's answer NLL. The aggregate weighs each task by
κ_t (λ_t ∝ κ_t / T for the task mean).

Only ratios between tasks matter (every aggregate normalises λ), so costs are used
normalised to mean 1; the RAW probes are what a later addition needs: they are kept in the
Hessian state directory (`task_costs.json`) beside the per-layer H_t, so adding a task
probes only that task and re-normalises over the new set — the costs a full run over every
task would have computed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

# DEFAULT_MAX_TOKENS bounds a caller that passes no max_tokens; one that calibrated with another
# --max-tokens must pass it, or its probe sees other tokens than its Hessians.
from inlaid.quant.calibration import DEFAULT_MAX_TOKENS, CalibrationTask, read_calibration_examples

COSTS_FILE = "task_costs.json"
log = logging.getLogger("inlaid.quant")


def probe_impurity(model: torch.nn.Module, tokenizer, peft_model: torch.nn.Module | None,
                   tasks: Iterable[CalibrationTask], probe_samples: int,
                   max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict[str, float]:
    """task -> mean Gini impurity per answer token of the float model (adapter on), raw.

    Each sample is its first `max_tokens` tokens (the run's --max-tokens), as the calibration
    passes see it: run whole, a 6,000-word sample took the probe 53 s with --max-tokens 64, and
    a 20 MB one 20 GB. Samples within the limit probe as before."""
    from inlaid.quant.nll import answer_nll

    raw: dict[str, float] = {}
    unscored: list[str] = []
    for task in tasks:
        examples = read_calibration_examples(Path(task.calib_path), limit=probe_samples)
        scored = answer_nll(model, tokenizer, examples, task.name if task.adapter_dir is not None else None, peft_model,
                            max_tokens=max_tokens)
        answer_tokens = sum(s.tokens for s in scored)
        if answer_tokens == 0:
            unscored.append(task.name)
        else:
            raw[task.name] = sum(s.impurity for s in scored) / answer_tokens
    # Every probed prompt filled max_tokens: no answer token to score. A raw cost of 0 would
    # weigh the task's Hessians at 0 (silently out of the aggregate): it weighs as the mean.
    neutral = sum(raw.values()) / len(raw) if raw else 0.0
    for name in unscored:
        log.warning("the cost probe scored no answer token (every probed prompt fills --max-tokens): the task "
                    "weighs as the mean", extra={"task": name, "max_tokens": max_tokens})
        raw[name] = neutral
    return raw


def probe_count(probe_samples: int, max_samples: int | None) -> int:
    """How many samples per task the probe reads: `probe_samples`, but never more than the
    calibration itself uses (a quick 2-sample build probes 2)."""
    return probe_samples if max_samples is None else max(1, min(probe_samples, max_samples))


def normalized(raw: dict[str, float]) -> dict[str, float] | None:
    """The costs scaled to mean 1 (None when every probe was 0: no task is costlier)."""
    mean = sum(raw.values()) / len(raw) if raw else 0.0
    return {name: value / mean for name, value in raw.items()} if mean > 0 else None


def save_raw_costs(state_dir: Path, raw: dict[str, float]) -> Path:
    path = Path(state_dir) / COSTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(raw, indent=1))
    temporary.replace(path)
    return path


def load_raw_costs(state_dirs: Iterable[Path]) -> dict[str, float] | None:
    """The raw costs from the first directory that has them (None: none has)."""
    for directory in state_dirs:
        path = Path(directory) / COSTS_FILE
        if path.is_file():
            return {str(name): float(value) for name, value in json.loads(path.read_text()).items()}
    return None


__all__ = ["COSTS_FILE", "load_raw_costs", "normalized", "probe_count", "probe_impurity", "save_raw_costs"]
