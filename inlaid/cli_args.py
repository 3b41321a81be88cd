"""Argument checks shared by the command lines (`inlaid quantize`, `quantize-add`, `eval`,
`tune-scheduler`, ...): each runs before any model loads or any simulation runs, so a wrong
number or path costs a one-line error, not a traceback (or a silently different run)
minutes later.

Light on purpose (no torch, no transformers): the parsers import it while they are built.
"""

from __future__ import annotations

import argparse
import os

# Every duration a config or command line takes: a finite number of seconds up to this (11.6
# days). Beyond it a timer is no longer a bound (and faulthandler's shutdown watchdog
# overflows); the server config, the scheduler's options and the HTTP front's timeouts share it.
MAX_SECONDS = 1e6
import tempfile
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type for counts where 0 or a negative number has no meaning (argparse then
    names the option in its usage error). Before this, `--max-samples 0` silently ran the
    default 128 samples (`or 128`), `--max-samples -3` ran 125 (a negative slice) and
    `--threads -2` ended in set_num_threads' RuntimeError."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type for a finite number > 0 (NaN and inf are refused too: they compare
    false against every bound further in)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got '{text}'") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type for a finite number >= 0 (NaN and inf refused, as by `positive_float`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got '{text}'") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type for a share in (0, 1] (a load as a fraction of saturation)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got '{text}'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def model_dir_problem(model: Path | None, weights: bool = True) -> str | None:
    """Why `--model` is not a model directory, or None (None when not given: the default
    model is the commands' own business). A missing path otherwise reached Hugging Face as
    a repo id and came back as "Repo id must use alphanumeric chars"."""
    if model is None:
        return None
    if problem := home_problem(Path(model), "model directory"):
        return problem
    model = Path(model).expanduser()
    if model.exists() and not model.is_dir():  # "not found" sent the user looking for a missing path
        return f"model directory {model} is a file, not a directory"
    if not model.is_dir():
        return f"model directory not found: {model}"
    from inlaid.quant.unfinished import unfinished_problem  # torch-free

    # before config.json: a quantize run stopped before writing it read "not a Hugging Face
    # model directory", and one stopped after it loaded for seconds before its refusal
    if problem := unfinished_problem(model):
        return problem
    if not (model / "config.json").is_file():
        return f"model directory {model} has no config.json: not a Hugging Face model directory"
    # A damaged weights file failed deep in each loader ("invalid header length", without the
    # file's name; under `inlaid serve`, three executor tracebacks): its header says it here.
    # Not `weights`: a quantized base is served, and this directory gives its tokenizer.
    for weights_file in sorted(model.glob("*.safetensors")) if weights else []:
        if problem := safetensors_problem(weights_file, ": the model's weights are damaged; prepare or copy it again"):
            return problem
    return None


def damaged_safetensors(path: Path, error: Exception, consequence: str = "") -> str:
    """The words for a safetensors file its library cannot read, wherever that is found."""
    return f"{path} is truncated or not a safetensors file ({error}){consequence}"


def safetensors_problem(path: Path, consequence: str = "") -> str | None:
    """What is wrong with a safetensors file by its header (read, not its tensors: cheap
    before any model loads), or None; `consequence` follows the words of a damaged file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except SafetensorError as error:
        return damaged_safetensors(path, error, consequence)
    except OSError as error:
        return f"cannot read {path}: {error}"
    return None


def home_problem(path: Path, option: str) -> str | None:
    """Why `path`'s leading ~user cannot be expanded (no such user, no home), or None:
    pathlib raises RuntimeError, which reached the user as a traceback."""
    try:
        path.expanduser()
    except RuntimeError as error:
        return f"{option} {path}: {error}"
    return None


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def writable_dir_problem(path: Path, option: str) -> str | None:
    """Why the directory `path` could not be created or written into, or None."""
    if problem := home_problem(Path(path), option):
        return problem
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{option} {path} is a file, not a directory"
    existing = nearest_existing(path)
    if not existing.is_dir():
        return f"{option} {path} lies under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {path}: {existing} is not writable"
    return _write_probe_problem(existing, path, option)


def writable_file_problem(path: Path, option: str) -> str | None:
    """Why the file `path` could not be written (its missing parents are created), or None:
    checked before a run whose results would otherwise be lost at the very end."""
    if problem := home_problem(Path(path), option):
        return problem
    path = Path(path).expanduser()
    if path.is_dir():
        return f"{option} {path} is a directory"
    if path.exists():
        if not os.access(path, os.W_OK):
            return f"{option} {path} is not writable"
        try:
            with path.open("a"):
                pass  # opened for append: nothing of it changes
        except OSError as error:
            return f"{option} {path} cannot be written: {error.strerror or error}"
        return None
    existing = nearest_existing(path.parent)
    if not existing.is_dir():
        return f"{option} {path} lies under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {path}: {existing} is not writable"
    return _write_probe_problem(existing, path, option)


def _write_probe_problem(directory: Path, path: Path, option: str) -> str | None:
    """A file really made (and removed) in `directory`: os.access says yes to root
    everywhere, a read-only or virtual file system included (`--out /proc/x` passed, and
    runs died at their end, their results lost; an outside probe)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".inlaid-write-probe-"):
            pass
    except OSError as error:
        return f"{option} {path} cannot be written: {error.strerror or error}"
    return None


def type_words(kind: type) -> str:
    """A Python type in an error message's words: `must be an integer`, not `must be a int`."""
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind,
                                                                                              f"a {kind.__name__}")
