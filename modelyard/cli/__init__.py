"""The `modelyard` command: caption, compare, run, demo, doctor, make-model, build-kernels."""

from .commands import main

__all__ = ["main"]
