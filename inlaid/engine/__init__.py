"""The in-process engine. Importing this package does not import torch."""

from inlaid.engine.config import EngineConfig, ModelConfig, ModelLoadError
from inlaid.engine.engine import Engine, GenerationOutput, InvalidRequestError, RequestOutput
from inlaid.protocol import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationOutput",
    "InvalidRequestError",
    "ModelConfig",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
