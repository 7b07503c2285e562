"""One process, one model. No Ray import anywhere in this package."""

from .config import EngineConfig
from .types import Output, Request, SamplingParams


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "Request", "SamplingParams", "Output"]
