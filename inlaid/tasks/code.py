"""Code generation: docstring + signature → Python function, mined from the standard library.

Pairs come from the running interpreter's stdlib (`ast`): public functions and methods with
a docstring whose body (docstring removed, formatted by `ast.unparse`) is 2–12 lines. The
committed splits were made with CPython 3.11; another interpreter may give other pairs,
which is why the eval and calibration splits are committed. Scored by ROUGE-L against the
reference function (code fences are stripped from the output first).
"""

from __future__ import annotations

import ast
import copy
import sys
import sysconfig
from pathlib import Path

from inlaid.tasks import metrics
from inlaid.tasks.base import CALIB_SIZE, EVAL_SIZE, SPLIT_SEED, Example, Task, make_example, seeded_split

NAME = "code"
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "ensurepip", "turtledemo", "tkinter", "__pycache__"}
MIN_LINES, MAX_LINES, MAX_CHARS = 2, 12, 480
MAX_TRAIN = 6000


def prompt_for(signature: str, docstring: str) -> str:
    return f"Write the Python function `{signature}`.\n\n{docstring}"


def _signature(node: ast.FunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _pairs_in(path: Path, module: str) -> list[tuple[str, str, str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or len(docstring.split()) < 4:
            continue
        summary = docstring.strip().split("\n\n")[0].strip()
        stripped = copy.deepcopy(node)
        stripped.body = stripped.body[1:]
        stripped.decorator_list = []
        if not stripped.body:
            continue
        source = ast.unparse(stripped)
        lines = source.count("\n")  # body lines: the def line is not counted
        if not MIN_LINES <= lines <= MAX_LINES or len(source) > MAX_CHARS:
            continue
        pairs.append((f"{module}:{node.lineno}:{node.name}", _signature(node), summary, source))
    return pairs


def build() -> dict[str, list[Example]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    seen_sources: set[str] = set()
    seen_prompts: set[str] = set()  # one implementation per (signature, docstring): no eval prompt in training
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if EXCLUDED_DIRS & set(relative.parts[:-1]):
            continue
        module = ".".join(relative.with_suffix("").parts)
        for key, signature, summary, source in _pairs_in(path, module):
            prompt = prompt_for(signature, summary)
            if source in seen_sources or prompt in seen_prompts:
                continue
            seen_sources.add(source)
            seen_prompts.add(prompt)
            examples.append(make_example(NAME, f"{NAME}-{key}", prompt, source))
    eval_split, calib_split, train_split = seeded_split(examples, SPLIT_SEED + 6, (EVAL_SIZE, CALIB_SIZE))
    return {"eval": eval_split, "calib": calib_split, "train": train_split[:MAX_TRAIN]}


def _rouge(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    return metrics.rouge([metrics.strip_code_fence(p) for p in predictions], [e["answers"] for e in examples])


TASK = Task(
    name=NAME,
    description=f"stdlib docstring + signature → function (CPython {sys.version_info.major}.{sys.version_info.minor} source)",
    metric_fn=_rouge,
    primary_metric="rougeL",
    max_new_tokens=128,
    source="Python standard library (PSF licence), mined with ast",
)
