"""The task suite: real data from PyPI packages, one module per task, one registry.

`get_task(name)` returns a `Task` (name, metric, max_new_tokens, load_split); `TASK_NAMES`
lists them in suite order. Building splits (`inlaid tasks prepare`) lives in `prepare`.
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
    try:
        return _TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task '{name}'; known tasks: {', '.join(TASK_NAMES)}") from None


__all__ = ["TASK_NAMES", "SPLIT_NAMES", "Task", "TaskError", "get_task"]
