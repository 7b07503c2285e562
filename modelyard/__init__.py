"""modelyard: run many vision-language models over large image sets.

Each model runs in its own Ray actor with its own inference engine; unloading kills the actor
and the driver verifies through NVML that the GPU memory came back.
"""
__version__ = "0.1.0"


def pipeline(path, **options):
    """`with modelyard.pipeline(path) as pipe: pipe(images, prompt=...)` (see modelyard.pipeline)."""
    from .pipeline import pipeline as _pipeline
    return _pipeline(path, **options)


__all__ = ["pipeline", "__version__"]
