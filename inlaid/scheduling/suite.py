"""The task suite as a workload: per request its prompt, its output length, its budget.

`data/suite_lengths.jsonl` (written by `bench/sched_suite_lengths.py`) records, for every
eval and calib example of the nine suite tasks, the prompt length, the greedy output length
of the task's adapter on the default model, the reference answer's length and the task's
token budget. Traces draw requests from it; the prompt token ids themselves are rebuilt
from the suite's chat messages with the model's tokenizer (`prompt_token_ids`), the same
ids the real-server replay sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inlaid.engine.tokenizer import Tokenizer

SUITE_LENGTHS_FILE = Path(__file__).parent / "data" / "suite_lengths.jsonl"
# The same examples' greedy output lengths on the MLGPTQ 4-bit suite base (embedding/head in
# bf16), the base `make run` serves: only about a third equal the fp32 model's, so a
# simulation of a server on a quantized base draws on these (`lengths_file_for`).
SUITE_LENGTHS_4BIT_FILE = Path(__file__).parent / "data" / "suite_lengths_4bit.jsonl"
SPLITS = ("calib", "eval")


@dataclass(frozen=True)
class SuiteRecord:
    record_id: str  # "<task>/<split>/<example id>"
    task: str
    split: str
    prompt_tokens: int
    output_tokens: int  # greedy, with the task's adapter, default model, budget = max_tokens
    reference_tokens: int
    max_tokens: int
    finish_reason: str


_RECORD_FIELDS = tuple(field.name for field in fields(SuiteRecord))


def load_suite_lengths(path: str | Path = SUITE_LENGTHS_FILE) -> list[SuiteRecord]:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; name a JSONL file of recorded requests")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with `bench/sched_suite_lengths.py`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:  # (the codec's words alone named no file: an outside probe)
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); name a JSONL file of "
                         "recorded requests") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                values = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not a recorded request: not JSON ({error})") from None
            if not isinstance(values, dict) or set(values) != set(_RECORD_FIELDS):
                # "SuiteRecord.__init__() got an unexpected keyword argument" named a class, not the fields
                have = sorted(values) if isinstance(values, dict) else type(values).__name__
                raise ValueError(f"{path}:{number}: not a recorded request: a JSON object with exactly the fields "
                                 f"{', '.join(_RECORD_FIELDS)} (bench/sched_suite_lengths.py writes them), got {have}")
            record = SuiteRecord(**values)
            _check_record(record, f"{path}:{number}")
            records.append(record)
    return records


def _check_record(record: SuiteRecord, where: str) -> None:
    # Imported here: traces imports this module. The traces' bound, shared: a record of 10^12
    # prompt tokens loaded and the tuning's simulation grew to 18 GB before the kernel killed
    # it (an outside probe); a server's `autotune_lengths` reads this format too.
    from inlaid.scheduling.traces import MAX_REQUEST_TOKENS

    for name in ("prompt_tokens", "output_tokens", "max_tokens"):
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REQUEST_TOKENS:
            raise ValueError(f"{where}: {name} must be a positive integer <= {MAX_REQUEST_TOKENS} (2^24), "
                             f"got {value!r}")
    if record.output_tokens > record.max_tokens:
        raise ValueError(f"{where}: output_tokens {record.output_tokens} exceeds max_tokens {record.max_tokens}")
    if record.split not in SPLITS or not isinstance(record.task, str) or not record.task:
        raise ValueError(f"{where}: split must be one of {SPLITS} and task a name, "
                         f"got {record.split!r}, {record.task!r}")


def load_tuning_records(path: str | Path = SUITE_LENGTHS_FILE) -> list[SuiteRecord]:
    """`load_suite_lengths`, for the scheduler tuning: it needs both splits, 'calib' (what
    the predictor starts from) and 'eval' (the workloads); ValueError otherwise."""
    records = load_suite_lengths(path)
    if not {"calib", "eval"} <= {record.split for record in records}:
        raise ValueError(f"{path}: needs recorded requests of both splits, 'calib' (what the predictor starts "
                         "from) and 'eval' (the workloads)")
    return records


def lengths_file_for(quantized_dir: str | None) -> Path:
    """The packaged lengths closest to a server's base: the 4-bit suite base's for any
    quantized checkpoint, the fp32 model's otherwise."""
    return SUITE_LENGTHS_4BIT_FILE if quantized_dir else SUITE_LENGTHS_FILE


def write_suite_lengths(records: Iterable[SuiteRecord], path: str | Path = SUITE_LENGTHS_FILE) -> None:
    Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def suite_examples(tasks: Iterable[str] | None = None, splits: Iterable[str] = SPLITS) -> list[tuple[str, str, dict[str, Any]]]:
    """(record id, split, example) for each committed suite example."""
    from inlaid.tasks import TASK_NAMES, get_task

    examples = []
    for name in tasks or TASK_NAMES:
        task = get_task(name)
        for split in splits:
            for example in task.load_split(split):
                examples.append((f"{name}/{split}/{example['id']}", split, example))
    return examples


def prompt_token_ids(tokenizer: Any, example: dict[str, Any]) -> list[int]:
    """The prompt as the server sees it: the chat template rendered, then tokenized."""
    return tokenizer.encode(tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True))


def suite_prompts(model_dir: str | Path | None = None, tokenizer: Tokenizer | None = None) -> dict[str, list[int]]:
    """Prompt token ids of every suite record, by record id (about 2 s for the whole suite),
    with `tokenizer`, else the tokenizer of `model_dir` (None: the default model's)."""
    if tokenizer is None:
        from inlaid.engine.tokenizer import Tokenizer

        if model_dir is None:
            from inlaid.models.prepare import default_model_dir

            model_dir = default_model_dir()
        tokenizer = Tokenizer(model_dir)
    return {record_id: prompt_token_ids(tokenizer, example) for record_id, _, example in suite_examples()}
