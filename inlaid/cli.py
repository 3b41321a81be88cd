"""`inlaid` command line. Each subcommand lives in the module that owns its concern.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `inlaid client ...` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from inlaid.interrupts import EXIT_TERMINATED, Terminated, terminate_as_interrupt

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("inlaid.models.cli", "prepare or inspect base models"),
    "generate": ("inlaid.engine.cli", "generate with the in-process engine"),
    "tasks": ("inlaid.tasks.cli", "prepare the task suite data"),
    "train-adapter": ("inlaid.tasks.train_cli", "train a LoRA adapter on a task"),
    "eval": ("inlaid.tasks.evaluate", "evaluate a model/adapter on tasks"),
    "quantize": ("inlaid.quant.cli", "quantize a base model (MLGPTQ and baselines)"),
    "quantize-add": ("inlaid.quant.incremental_cli", "add a task to a quantized checkpoint incrementally"),
    "serve": ("inlaid.serve.cli", "run the server"),
    "tune-scheduler": ("inlaid.scheduling.tune_cli", "choose the inlaid policy's options on a fitted cost model"),
    "client": ("inlaid.client.cli", "talk to a running server"),
    "http": ("inlaid.http.cli", "run the OpenAI-compatible HTTP front alone"),
}

# Commands that run to an end on their own: SIGTERM stops them as Ctrl-C does
# (`inlaid.interrupts`). The server, the HTTP front and the client handle their signals.
TERMINATED_AS_INTERRUPTED = ("models", "generate", "tasks", "train-adapter", "eval", "quantize", "quantize-add",
                             "tune-scheduler")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="inlaid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        # A usage error, as argparse's own are (exit 2): a script that runs `inlaid $CMD` with
        # CMD empty must not read success.
        parser.print_help(sys.stderr)
        problem = f"unknown command '{argv[0]}'" if argv else "a command is required"
        print(f"\ninlaid: {problem}", file=sys.stderr)
        return 2
    name = argv[0]
    _pin_math_threads(argv[1:])
    module = importlib.import_module(SUBCOMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"inlaid {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    restore = terminate_as_interrupt() if name in TERMINATED_AS_INTERRUPTED else None
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at the exit's flush
        return code
    except Terminated:
        print(f"inlaid {name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"inlaid {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, BrokenPipeError) and stdout_closed():
            return end_on_closed_stdout()
        if os.environ.get("INLAID_DEBUG") or not is_input_error(error):
            raise  # a bug: its traceback is what a report needs
        print(f"inlaid {name}: {input_error_text(error)}", file=sys.stderr)
        return 2
    finally:
        if restore is not None:  # main() called in-process (tests, scripts) leaves SIGTERM as it was
            signal.signal(signal.SIGTERM, restore)  # type: ignore[arg-type]


# The exit status of a command the shell saw end by SIGPIPE (128 + 13), as `seq 1e6 | head` gives.
EXIT_STDOUT_CLOSED = 141


def stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone (`inlaid client metrics | head
    -5`): then a BrokenPipeError is that reader leaving, not a failure of the command (a broken
    connection elsewhere still gets its one-line error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no fd (captured output) or no poll (Windows)
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def end_on_closed_stdout() -> int:
    """End quietly once stdout's reader has gone: stdout goes to devnull (as Python's docs on
    SIGPIPE advise), so the exit's flush of what is still buffered raises nothing either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_STDOUT_CLOSED


def _pin_math_threads(arguments: list[str]) -> None:
    """A subcommand's `--threads N` also goes to OpenMP and MKL through the environment, before
    torch loads (the server starts its requantizer so): they read it then, and a later
    `torch.set_num_threads` alone does not give the same results: an offline `quantize-add
    --threads 1` differed from the live server's re-quantization of the same task in 622
    tensors, and equalled it once started with OMP_NUM_THREADS=1."""
    for index, argument in enumerate(arguments):
        if argument == "--threads" and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif argument.startswith("--threads="):
            value = argument.removeprefix("--threads=")
        else:
            continue
        # anything else ("²" is a digit to isdigit, not to int): the subcommand's parser says what is wrong
        if value.isascii() and value.isdigit() and int(value) > 0:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = value


# Errors that say what is wrong with the inputs (files, paths, values, addresses): one line
# and exit code 2, not a traceback (INLAID_DEBUG=1 shows it). Matched by name, so that
# checking costs no imports (torch, zmq, safetensors) a command did not make.
INPUT_ERRORS = {"OSError", "ValueError", "ZMQError", "SafetensorError", "ModelLoadError", "AdapterError",
                "QuantizationError", "ConfigError", "UnicodeDecodeError"}


def is_input_error(error: BaseException) -> bool:
    return any(cls.__name__ in INPUT_ERRORS for cls in type(error).__mro__)


def input_error_text(error: BaseException) -> str:
    """The one line an input error prints: the project's own errors say what is wrong in
    their words ("TaskError: unknown task" named a class to a user); others keep their class,
    which tells what failed (`FileNotFoundError: [Errno 2] ...`)."""
    if type(error).__module__.split(".")[0] == "inlaid" and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
