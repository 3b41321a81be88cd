"""Run this package's Triton kernels on the CPU (TRITON_INTERPRET=1), for tests.

Triton fixes its mode when it is imported: with TRITON_INTERPRET=1 every `@triton.jit`
function, its standard library included, becomes an interpreted Python function that runs
on CPU tensors. The mode is therefore per process. `enable_triton_interpreter()` switches it
on when that is still possible and harmless (triton not imported yet, no CUDA device whose
compiled kernels the switch would slow down); otherwise a test runs the interpreted kernels
in a child process (`python -m pytest FILE` with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import sys


def triton_interpreter_active() -> bool:
    """True when triton is (or will be, on import) in interpreter mode in this process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def enable_triton_interpreter() -> bool:
    """Turn the interpreter on for this process if still possible; True when it is active."""
    if triton_interpreter_active():
        return True
    import torch

    if "triton" in sys.modules or torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True
