"""SIGTERM as Ctrl-C for the commands that run to an end on their own (quantize, eval, ...).

A service manager, `timeout` or `kill` stops them with SIGTERM, which ended them at once with
exit status 143 and no word, leaving an unfinished --out behind. Raised as `Terminated` (a
KeyboardInterrupt) instead, every Ctrl-C clean-up and note runs, and the command says
`terminated (SIGTERM)` and exits with 143 still."""

from __future__ import annotations

import signal
import threading
from typing import Any

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (every handler of it runs)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def terminate_as_interrupt() -> Any:
    """Install the SIGTERM handler that raises `Terminated`, where SIGTERM is still the
    default; returns the handler to put back (None: none was installed, e.g. off the main
    thread, where Python cannot install one)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


def was_terminated(interrupt: BaseException) -> bool:
    """Whether an interrupt came from SIGTERM: a `Terminated`, or a wrapper of one that says
    so in its `terminated` attribute (`tasks.generation.GenerationInterrupted`)."""
    return isinstance(interrupt, Terminated) or bool(getattr(interrupt, "terminated", False))
