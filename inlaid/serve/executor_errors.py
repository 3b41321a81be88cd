"""What running plans on a supervised executor can raise (`supervisor.py`), for the step
loop and the coordinator to tell apart. Torch-free."""

from __future__ import annotations


class ExecutorLostError(RuntimeError):
    """The executor died (or hung and was killed) while or before running a plan."""


class ExecutorStepError(RuntimeError):
    """The executor ran a plan and it raised; the executor itself is still alive."""


class ExecutorBindError(OSError):
    """The executor's socket could not be bound (server.executor_address in use or not local)."""
