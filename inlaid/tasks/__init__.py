"""The task suite: real data from PyPI packages, one module per task, one registry.

`get_task(name)` returns a `Task` (name, metric, max_new_tokens, load_split); `TASK_NAMES`
lists them in suite order. `get_task("NAME=PATH.jsonl")`: a task of the user's own
(custom.py). Building splits (`inlaid tasks prepare`) lives in `prepare`.
"""

from __future__ import annotations

from inlaid.tasks.base import SPLIT_NAMES, Task, TaskError
from inlaid.tasks import code, math_word, reading_qa, sentiment, summarize, table_to_text, translation

_TASKS: dict[str, Task] = {
    task.name: task
    for task in [*translation.TASKS, summarize.TASK, table_to_text.TASK, math_word.TASK, reading_qa.TASK,
                 code.TASK, sentiment.TASK]
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> Task:
    """A task of the suite by its name, or one of your own as `NAME=PATH.jsonl` (custom.py)."""
    from inlaid.tasks.custom import file_task, split_task_spec

    if (spec := split_task_spec(name)) is not None:
        return file_task(*spec, suite_names=TASK_NAMES)
    try:
        return _TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task '{name}'; known tasks: {', '.join(TASK_NAMES)}, "
                        "or a task of your own as NAME=PATH.jsonl (docs/tasks.md)") from None


__all__ = ["TASK_NAMES", "SPLIT_NAMES", "Task", "TaskError", "get_task"]
