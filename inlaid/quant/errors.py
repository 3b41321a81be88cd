"""Typed errors of the quantizer: every bad input gets its own, with a message that says what to fix."""

from __future__ import annotations


class QuantizationError(RuntimeError):
    """Base class of every error raised by `inlaid.quant`."""


class InvalidQuantSpecError(QuantizationError, ValueError):
    """Bits, group size or another quantization setting is out of range."""


class NonFiniteHessianError(QuantizationError):
    """A Hessian (or the weight) holds NaN/Inf: the calibration forward produced non-finite activations."""


class CholeskyFailedError(QuantizationError):
    """The damped Hessian stayed non positive-definite after every dampening increase."""


class CalibrationDataError(QuantizationError):
    """A calibration file is missing, empty or malformed."""


class AdapterMismatchError(QuantizationError):
    """An adapter was trained for another base model (shapes or module names do not fit)."""


class UnknownMethodError(QuantizationError, ValueError):
    """The quantization method name is not one of the known ones."""


class CheckpointError(QuantizationError):
    """A quantized checkpoint is missing files or is inconsistent."""
