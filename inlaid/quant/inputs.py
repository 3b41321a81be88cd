"""Checks of `inlaid quantize` / `quantize-add` inputs that run before the model loads.

Each refusal is one line naming the flag or file (QuantizationError): the task names, every
adapter (the server's own check, `check_servable_adapter`), and every line of every calibration
file. Without them a bad input surfaced after the
model had loaded, some only after the first layer, as a PEFT KeyError, a 400-line
size-mismatch dump or a "calibration forward overflowed".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from inlaid.quant.calibration import CalibrationTask, check_calibration_file
from inlaid.quant.errors import QuantizationError

# PEFT adapter names become module names, which may not hold '.': the server's rule
# (`check_task_name`) without the '.'.
_QUANT_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
# The quantizer runs every adapter through PEFT, not through the server's slot pool: no rank
# limit of its own (the server that serves the checkpoint checks its max_lora_rank).
_NO_RANK_LIMIT = 1 << 30


def task_name_problem(name: str) -> str | None:
    """Why `name` cannot name a quantization task, or None."""
    from inlaid.serve.config import ConfigError, check_task_name

    if not _QUANT_TASK_NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"
        return (f"--task name {shown}: use 1-128 ASCII letters, digits, '-' or '_', starting with a letter, "
                "a digit or '_' (no '.': PEFT adapter names cannot hold one)")
    try:
        check_task_name(name)  # the server's rule too (reserved '__name__' forms)
    except ConfigError as error:
        return f"--task {error}"
    return None


def check_tasks(tasks: Iterable[CalibrationTask], model_dir: Path) -> None:
    """Names, adapters and calibration files of the tasks, each refusal one line."""
    from inlaid.engine.adapter_config import AdapterError
    from inlaid.engine.adapter_weights import check_servable_adapter
    from inlaid.engine.config import ModelConfig

    model = None
    seen: set[str] = set()
    for task in tasks:
        problem = task_name_problem(task.name)
        if problem:
            raise QuantizationError(problem)
        if task.name in seen:
            raise QuantizationError(f"--task {task.name!r} is given twice")
        seen.add(task.name)
        if task.adapter_dir is not None:
            if model is None:
                try:
                    model = ModelConfig.from_dir(model_dir)
                except Exception as error:  # the model's own loader says it again, later
                    raise QuantizationError(f"--model {model_dir}: {error}") from None
            try:
                check_servable_adapter(task.name, str(task.adapter_dir), model, _NO_RANK_LIMIT)
            except AdapterError as error:
                raise QuantizationError(f"--task {task.name}: {error}") from None
        check_calibration_file(task.calib_path)
